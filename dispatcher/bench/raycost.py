"""CPU cost of one Ray actor call on this machine (caller and actor side), for PERFORMANCE.md.

    python -m dispatcher.bench.raycost [--actors 8] [--calls 2000]

Starts a local Ray, creates `--actors` async actors shaped like zone actors (num_cpus=0,
max_concurrency=8) whose method does nothing, measures their idle CPU, then makes
`--calls` calls spread over them from an asyncio caller and divides the CPU time each
side used by the number of calls. Every order costs one such call, and every ping batch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import psutil  # type: ignore[import-untyped]
import ray

IDLE_WINDOW_S = 5.0


class _Echo:
    async def pid(self) -> int:
        return os.getpid()

    async def echo(self, value: int) -> int:
        return value


# Shaped like a zone actor (actors/options.py): no CPU asked, up to 8 calls at once.
EchoRemote = ray.remote(_Echo).options(num_cpus=0, max_concurrency=8)


def _cpu_s(procs: Sequence[Any]) -> float:
    return float(sum(p.cpu_times().user + p.cpu_times().system for p in procs))


async def _calls(handles: Sequence[Any], per_actor: int) -> None:
    async def one(handle: Any) -> None:
        for i in range(per_actor):
            await handle.echo.remote(i)

    await asyncio.gather(*(one(h) for h in handles))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher.bench.raycost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--actors", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        handles = [EchoRemote.remote() for _ in range(args.actors)]
        pids: list[int] = ray.get([h.pid.remote() for h in handles])  # type: ignore[attr-defined]
        actors = [psutil.Process(pid) for pid in pids]
        caller = [psutil.Process()]
        time.sleep(1.0)
        before = _cpu_s(actors)
        time.sleep(IDLE_WINDOW_S)
        idle_pct = (_cpu_s(actors) - before) / IDLE_WINDOW_S / len(actors) * 100
        per_actor = max(1, args.calls // len(handles))
        calls = per_actor * len(handles)
        actor_before, caller_before, started = (
            _cpu_s(actors),
            _cpu_s(caller),
            time.perf_counter(),
        )
        asyncio.run(_calls(handles, per_actor))
        elapsed = time.perf_counter() - started
        actor_ms = (_cpu_s(actors) - actor_before) / calls * 1000
        caller_ms = (_cpu_s(caller) - caller_before) / calls * 1000
    finally:
        ray.shutdown()
    print(
        f"{calls} calls over {len(handles)} actors in {elapsed:.2f} s ({calls / elapsed:,.0f} calls/s)"
    )
    print(f"CPU per call: actor side {actor_ms:.2f} ms, caller side {caller_ms:.2f} ms")
    print(f"idle CPU per actor: {idle_pct:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
