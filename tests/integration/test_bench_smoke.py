"""`python -m dispatcher.bench --quick` end to end: own servers, service, references, every scenario."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Embedded PostgreSQL, a local Ray and every scenario at smoke sizes: about a minute
# idle, several on a busy 2-core CI machine.
SMOKE_TIMEOUT_S = 900

pytestmark = pytest.mark.integration


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 60)
def test_quick_bench_runs_every_scenario_and_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dispatcher.bench", "--quick"],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    report = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    assert "FAILED" not in done.stdout, report
    header = next(
        line for line in done.stdout.splitlines() if line.startswith("scenario")
    )
    for column in ("figure", "median", "x ceiling", "x naive", "target", "met"):
        assert column in header, report
    for row in (
        "ceiling: single ping, saturation",
        "single PATCH …/location, saturation",
        "batched POST /drivers/locations",
        "assignments at saturation",
        "double bookings",
        "Redis mirror lookup",
        "ingress RSS",
        "ray::ZoneActor",
    ):
        assert row in done.stdout, report
    # The progress bar goes to stderr, the table to stdout.
    assert "[" in done.stderr and "done" in done.stderr, report


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 60)
def test_quick_scale_bench_measures_each_worker_count() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dispatcher.bench",
            "--scenario",
            "scale",
            "--quick",
            "--workers",
            "1,2",
        ],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    report = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    assert "FAILED" not in done.stdout, report
    rows = [
        line.split("|")[1:-1]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and "worker" not in line
    ]
    assert [r[0].strip() for r in rows] == ["1", "2"], report
    for row in rows:
        assert (
            float(row[1].replace(",", "")) > 0 and float(row[4].replace(",", "")) > 0
        ), report
        assert row[8].strip() == "0", "double bookings"
    # The zones spread over both workers of the second cluster.
    assert sorted(rows[1][7].strip().split("/")) == ["4", "4"], report


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 60)
def test_quick_stream_bench_measures_sockets_and_latency() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dispatcher.bench",
            "--scenario",
            "stream",
            "--quick",
            "--sockets",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    report = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, report
    assert "FAILED" not in done.stdout, report
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in done.stdout.splitlines()
        if line.startswith("| ")
    }
    assert rows["sockets held by the ingress"].startswith("100 of 100"), report
    # Under load a warm-up order may displace a driver, so a few measured orders can
    # book a warm-up driver, which has no socket: those are counted apart, not missing.
    received, wrong, missing = (
        int(n) for n in rows["events received / wrong socket / missing"].split(" / ")
    )
    assert received > 0 and (wrong, missing) == (0, 0), report
    assert "ms" in rows["commit → receipt p50 / p99"], report
