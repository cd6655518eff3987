"""`python -m benchmarks --scenario offers` end to end at smoke size: auto, cascade and wave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Embedded PostgreSQL and three `dispatcher serve` starts (each its own local Ray).
SMOKE_TIMEOUT_S = 900

pytestmark = [pytest.mark.integration, pytest.mark.bench]


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 60)
def test_the_offers_bench_measures_every_mode_and_writes_its_section(
    tmp_path: Path,
) -> None:
    output = tmp_path / "PERFORMANCE.md"
    output.write_text("# Performance\n\nkept text\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--scenario",
            "offers",
            "--quick",
            "--duration",
            "3",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    report = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| mode")
    }
    assert set(rows) == {"auto", "cascade", "wave"}, report
    for mode, (orders, accepted, _, offers, _, ratio) in rows.items():
        # Every driver accepts every offer: every order is accepted.
        assert int(orders) == 15 and int(accepted) == 15, (mode, report)
        if mode == "auto":
            assert float(offers) == 0 and ratio == "1.00", report
        else:
            assert float(offers) >= 1.0, (mode, report)
    # Wave offers up to 5 drivers per order, cascade one at a time.
    assert float(rows["wave"][3]) > float(rows["cascade"][3]), report
    text = output.read_text()
    assert "kept text" in text and "<!-- offers: begin -->" in text, text
