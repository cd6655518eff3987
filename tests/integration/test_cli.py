"""The newcomer's path: `dispatcher serve` with embedded defaults, `migrate`, and Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from pathlib import Path

import aiohttp
import psutil  # type: ignore[import-untyped]
import pytest

from dispatcher.embedded import free_port

pytestmark = pytest.mark.integration

# A cold start runs initdb, starts PostgreSQL, Redis and a local Ray.
START_WITHIN_S = 120.0
STOP_WITHIN_S = 60.0


def clean_env(data_dir: Path, port: int) -> dict[str, str]:
    """Only defaults: no DISPATCHER_* settings except where the data lives."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "RAY_"))
    }
    env.update({"DISPATCHER_DATA_DIR": str(data_dir), "DISPATCHER_PORT": str(port)})
    return env


def processes_using(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(data_dir) in part for part in cmdline):
            found.append(proc)
    return found


async def test_serve_with_embedded_defaults_then_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        "serve",
        env=clean_env(data_dir, port),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(START_WITHIN_S):
            while not printed or not printed[-1].startswith("dispatcher listening on"):
                line = await proc.stdout.readline()
                assert line, "serve exited early:\n" + "".join(printed)
                printed.append(line.decode())
        assert printed[-1].strip() == f"dispatcher listening on http://127.0.0.1:{port}"
        assert printed[-2].startswith(f"operator page: http://127.0.0.1:{port}/ops ")

        # Secrets were generated, stored privately, and printed once each.
        stored = json.loads((data_dir / "secrets.json").read_text())
        assert stat.S_IMODE((data_dir / "secrets.json").stat().st_mode) == 0o600
        output = "".join(printed)
        for name, var in (
            ("admin_token", "DISPATCHER_ADMIN_TOKEN"),
            ("inbound_secret", "DISPATCHER_INBOUND_SECRET"),
            ("vendure_webhook_secret", "DISPATCHER_VENDURE_WEBHOOK_SECRET"),
        ):
            assert f"{var}={stored[name]}" in output
        assert stored["inbound_secret"].startswith("whsec_")

        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/health")).status == 200
            ready = await http.get("/ready")
            assert ready.status == 200
            assert (await ready.json())["postgres"] == "ok"
            created = await http.post(
                "/drivers",
                json={"name": "Ada"},
                headers={"Authorization": f"Bearer {stored['admin_token']}"},
            )
            assert created.status == 201
        assert processes_using(data_dir), (
            "embedded servers should run under the data dir"
        )

        # Ctrl-C: a clean exit that stops everything serve started.
        os.kill(proc.pid, signal.SIGINT)
        async with asyncio.timeout(STOP_WITHIN_S):
            code = await proc.wait()
        assert code == 0
        for _ in range(50):  # PostgreSQL's backends may take a moment to exit
            if not processes_using(data_dir):
                break
            await asyncio.sleep(0.2)
        assert processes_using(data_dir) == []
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        for leftover in processes_using(data_dir):
            leftover.kill()


async def test_migrate_is_harmless_twice_and_reuses_secrets(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = clean_env(data_dir, free_port())
    outputs = []
    for _ in range(2):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatcher.cli",
            "migrate",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(START_WITHIN_S):
            out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()
        outputs.append(out.decode())
    assert "001_init.sql" in outputs[0]
    assert "none (up to date)" in outputs[1]
    assert processes_using(data_dir) == []


async def run_cli(env: dict[str, str], *args: str) -> tuple[int | None, bytes]:
    """A short `dispatcher` command that must exit on its own: its exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(STOP_WITHIN_S):
        _, err = await proc.communicate()
    return proc.returncode, err


async def test_invalid_configuration_exits_2_with_a_clear_message(
    tmp_path: Path,
) -> None:
    env = clean_env(tmp_path, free_port())
    env["DISPATCHER_SEARCH_RADIUS_KM"] = "-1"
    returncode, err = await run_cli(env, "serve")
    assert returncode == 2
    assert b"search_radius_km" in err


@pytest.mark.parametrize(
    "command",
    [
        ["zones", "list"],
        ["zones", "rebalance", "--dry-run"],
        ["zones", "drain", "abc123"],
        ["zones", "reopen", "abc123"],
    ],
)
async def test_zone_commands_without_a_cluster_exit_2_and_start_nothing(
    tmp_path: Path, command: list[str]
) -> None:
    returncode, err = await run_cli(clean_env(tmp_path, free_port()), *command)
    assert returncode == 2
    assert b"DISPATCHER_RAY_ADDRESS" in err
    assert not (tmp_path / "postgres").exists() and not processes_using(tmp_path)
