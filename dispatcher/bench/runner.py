"""Runs one load in a separate process, wrk or the Python generator, and returns its RunResult."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dispatcher.bench.loadgen import RESULT_MARKER, Count, LoadPlan
from dispatcher.bench.reqfile import RequestSpec, write_requests
from dispatcher.bench.stats import RunResult
from dispatcher.bench.wrk import lua_script, parse_wrk_output, wrk_command

# Beyond the planned duration: process start-up, connecting, draining, printing.
CHILD_GRACE_S = 60.0
# wrk threads: one per core of this 2-core machine; more only contend.
WRK_THREADS = 2


class LoadError(RuntimeError):
    """A load generator process failed."""


class LoadRunner:
    """Writes the request file, starts the generator process, parses what it prints."""

    def __init__(self, workdir: Path, wrk: str | None) -> None:
        self.workdir = workdir
        self.wrk = wrk
        self._ids = itertools.count(1)

    def write(self, name: str, specs: Sequence[RequestSpec]) -> Path:
        path = self.workdir / f"{next(self._ids):03d}-{name}.requests"
        write_requests(path, specs)
        return path

    async def saturate(
        self,
        base_url: str,
        requests: Path,
        *,
        connections: int,
        duration_s: float,
        count: Count = "none",
        max_requests: int = 0,
        python_only: bool = False,
    ) -> RunResult:
        """As fast as `connections` keep-alive connections allow: wrk if present.

        wrk does not read answers: its results carry no `items`, whatever `count` says.
        """
        if self.wrk is not None and not max_requests and not python_only:
            return await self._wrk(base_url, requests, connections, duration_s)
        plan = LoadPlan(
            base_url,
            str(requests),
            "closed",
            connections,
            duration_s,
            max_requests=max_requests,
            count=count,
        )
        return await self._python(plan)

    async def fixed_rate(
        self,
        base_url: str,
        requests: Path,
        *,
        rate: float,
        duration_s: float,
        count: Count = "none",
    ) -> RunResult:
        """Open loop at `rate` requests/s: the Python generator (wrk2 is not packaged)."""
        plan = LoadPlan(
            base_url, str(requests), "open", 1, duration_s, rate=rate, count=count
        )
        return await self._python(plan)

    async def _python(self, plan: LoadPlan) -> RunResult:
        path = self.workdir / f"{next(self._ids):03d}-plan.json"
        path.write_text(json.dumps(plan.to_json()))
        out = await _run(
            [sys.executable, "-m", "dispatcher.bench.loadgen", str(path)],
            plan.duration_s,
        )
        for line in out.splitlines():
            if line.startswith(RESULT_MARKER):
                return RunResult.from_json(json.loads(line[len(RESULT_MARKER) :]))
        raise LoadError(f"the Python load generator printed no result:\n{out[-2000:]}")

    async def _wrk(
        self, base_url: str, requests: Path, connections: int, duration_s: float
    ) -> RunResult:
        assert self.wrk is not None
        threads = max(1, min(WRK_THREADS, connections))
        script = requests.with_suffix(".lua")
        script.write_text(lua_script(requests, threads))
        cmd = wrk_command(self.wrk, script, base_url, connections, duration_s, threads)
        try:
            return parse_wrk_output(await _run(cmd, duration_s))
        except ValueError as exc:
            raise LoadError(str(exc)) from None


async def _run(cmd: list[str], duration_s: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(duration_s + CHILD_GRACE_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LoadError(
            f"{cmd[0]} did not finish within {duration_s + CHILD_GRACE_S:.0f} s"
        ) from None
    except BaseException:
        # Interrupted (Ctrl-C): the generator is ours, it must not outlive the bench.
        if proc.returncode is None:
            proc.kill()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise LoadError(
            f"{' '.join(cmd[:3])} exited with {proc.returncode}:\n{text[-2000:]}"
        )
    return text
