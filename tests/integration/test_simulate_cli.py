"""The newcomer's demo: `dispatcher simulate` with no settings starts its own service and plays a city."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# A cold start runs initdb, starts PostgreSQL, Redis and a Ray; then 20 s of orders.
RUN_WITHIN_S = 420.0


def clean_env(data_dir: Path) -> dict[str, str]:
    """Only defaults: no DISPATCHER_* or RAY_* settings except where the data lives."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "RAY_"))
    }
    env["DISPATCHER_DATA_DIR"] = str(data_dir)
    return env


@pytest.mark.timeout(RUN_WITHIN_S + 60)
async def test_simulate_with_embedded_defaults_plays_and_summarises(
    tmp_path: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        "simulate",
        "--minutes",
        "0.33",
        "--speed",
        "10",
        "--drivers",
        "12",
        "--seed",
        "2",
        "--open",
        env=clean_env(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_WITHIN_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text, log = out.decode(), err.decode()
    assert proc.returncode == 0, log[-3000:]
    lines = text.splitlines()
    assert lines[0].startswith("operator page: http://127.0.0.1:") and lines[
        0
    ].endswith("/ops")
    assert (
        lines[1].startswith("scenario")
        and "manhattan (live, auto mode, seed 2)" in lines[1]
    )
    assert "dispatcher listening on http://127.0.0.1:" in log
    orders = int(next(line for line in lines if line.startswith("orders")).split()[-1])
    assert orders > 0
    assert "unexpected answers" not in text, text
    # The service it started kept its state under the data dir's simulator/ folder, so a
    # `dispatcher serve` on the same data dir keeps its own servers and secrets.
    assert (tmp_path / "simulator" / "secrets.json").exists()
    assert (tmp_path / "simulator" / "postgres").is_dir()
    assert "delivery.assigned" in text


@pytest.mark.timeout(RUN_WITHIN_S + 60)
async def test_simulate_starts_its_service_in_the_offer_mode_asked_for(
    tmp_path: Path,
) -> None:
    # --offer-mode cascade sets the started service's DISPATCHER_OFFER_MODE: drivers are
    # offered jobs on their event streams and accept them.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        "simulate",
        "--scenario",
        "synthetic",
        "--minutes",
        "0.33",
        "--speed",
        "10",
        "--drivers",
        "12",
        "--offer-mode",
        "cascade",
        env=clean_env(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_WITHIN_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text, log = out.decode(), err.decode()
    assert proc.returncode == 0, log[-3000:]
    assert "synthetic (live, cascade mode, seed 1)" in text, text
    events = next(
        line for line in text.splitlines() if line.startswith("driver events received")
    )
    assert "offer.created" in events, text
    answers = next(
        line for line in text.splitlines() if line.startswith("offer answers")
    )
    assert "accepted" in answers, text
    assert "unexpected answers" not in text, text
