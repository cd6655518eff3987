"""Scale figure: assignments/s and pings/s with 1, 2, 3 worker nodes of a local Ray cluster."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass

import aiohttp

from benchmarks.options import Options
from benchmarks.progress import Progress
from benchmarks.report import Report, markdown_table
from benchmarks.runner import LoadRunner
from benchmarks.scenarios import ADMIN_TIMEOUT, PICKUPS, Bench
from benchmarks.stack import RAY_NAMESPACE, Stack
from benchmarks.stats import median
from benchmarks.workload import (
    ORDER_CITIES,
    Driver,
    make_drivers,
    zone_centres,
    zoned_points,
)
from tests.support.raycluster import LocalRayCluster, ray_auth_env

# Replaces the section between these markers in docs/PERFORMANCE.md; a full bench run
# keeps it, so neither run erases the other's figures.
# The driver event stream's section (bench/stream.py) is kept the same way.
STREAM_BEGIN = "<!-- stream: begin -->"
STREAM_END = "<!-- stream: end -->"
OFFERS_BEGIN = "<!-- offers: begin -->"
OFFERS_END = "<!-- offers: end -->"
BEGIN = "<!-- scale-out: begin -->"
END = "<!-- scale-out: end -->"


@dataclass(frozen=True)
class ScaleRow:
    workers: int
    # One value per repeat; the table shows their median and lists them.
    assignments_per_s: tuple[float, ...]
    pings_per_s: tuple[float, ...]
    double_bookings: int
    # Zone actors per worker node, as `dispatcher zones list` saw them after the runs.
    zones_per_node: tuple[int, ...]


def plan_scale_steps(options: Options) -> int:
    """Progress steps of a scale run (servers, seeding, per count: cluster, serve, runs, listing, stop)."""
    return 1 + 1 + len(options.workers) * (3 + 2 * options.sizes.repeats) + 1


async def zones_per_node(ray_address: str) -> tuple[int, ...]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "RAY_"))
    }
    env.update(
        {
            "DISPATCHER_RAY_ADDRESS": ray_address,
            "DISPATCHER_RAY_NAMESPACE": RAY_NAMESPACE,
        }
    )
    env.update(ray_auth_env())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        "zones",
        "list",
        "--json",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        return ()
    zones = json.loads(out)["zones"]
    return tuple(sorted(Counter(z["node_id"] for z in zones).values(), reverse=True))


async def run_scale(
    options: Options,
    stack: Stack,
    runner: LoadRunner,
    progress: Progress,
    report: Report,
) -> list[ScaleRow]:
    """For each worker count: a fresh cluster and `dispatcher serve` on it, then orders
    and batched pings at saturation over the eight-zone fleet (seeded once)."""
    s = options.sizes
    rows: list[ScaleRow] = []
    fleet: list[Driver] | None = None
    async with progress.ticking():
        progress.step("starting PostgreSQL and Redis")
        await asyncio.to_thread(stack.start_servers)
        centres = zone_centres(ORDER_CITIES)
        for count in options.workers:
            progress.step(f"scale: a Ray cluster with {count} worker node(s)")
            # Raylets start from the main thread: this blocks the loop for a few seconds.
            cluster = LocalRayCluster()
            try:
                for _ in range(count):
                    cluster.add_worker()
                progress.step(f"scale: dispatcher serve on {count} worker node(s)")
                await asyncio.to_thread(
                    stack.start_service,
                    ray_address=cluster.address,
                    extra_env={
                        **dict(options.service_env),
                        "DISPATCHER_ZONE_RESOURCE_UNITS": "1",
                    },
                )
                async with aiohttp.ClientSession(timeout=ADMIN_TIMEOUT) as session:
                    bench = Bench(options, stack, runner, progress, session, report)
                    pickups = zoned_points(bench.rng, centres, PICKUPS)
                    if fleet is None:
                        progress.step(
                            f"scale: seeding {s.drivers:,} drivers over {len(centres)} zones"
                        )
                        fleet = await bench._seed(
                            make_drivers(zoned_points(bench.rng, centres, s.drivers))
                        )
                    _, per_s, doubled = await bench.orders_saturation(
                        fleet,
                        pickups,
                        f"scale {count}: orders",
                        id_prefix=f"scale{count}-sat",
                    )
                    _, pings_per_s, _ = await bench.batched_pings(
                        fleet, f"scale {count}: pings"
                    )
                progress.step(f"scale: where the zones ran on {count} worker node(s)")
                spread = await zones_per_node(cluster.address)
                rows.append(
                    ScaleRow(count, tuple(per_s), tuple(pings_per_s), doubled, spread)
                )
            finally:
                await asyncio.to_thread(stack.stop_service)
                await asyncio.to_thread(cluster.shutdown)
    return rows


def scale_table(rows: list[ScaleRow]) -> list[list[str]]:
    """Each row's medians (and runs) with their ratio to the one-node row of the same run."""
    base = rows[0] if rows else None

    def ratio(value: float, of: float) -> str:
        return f"{value / of:.2f}" if of else "—"

    def runs(values: tuple[float, ...]) -> str:
        return " / ".join(f"{v:,.0f}" for v in values)

    out = []
    for r in rows:
        assigned, pinged = (
            median(list(r.assignments_per_s)),
            median(list(r.pings_per_s)),
        )
        out.append(
            [
                str(r.workers),
                f"{assigned:,.0f}",
                runs(r.assignments_per_s),
                ratio(assigned, median(list(base.assignments_per_s))) if base else "—",
                f"{pinged:,.0f}",
                runs(r.pings_per_s),
                ratio(pinged, median(list(base.pings_per_s))) if base else "—",
                "/".join(map(str, r.zones_per_node)) or "?",
                str(r.double_bookings),
            ]
        )
    return out


SCALE_HEADERS = (
    "worker nodes",
    "assignments/s",
    "runs",
    "x 1 node",
    "batched pings/s",
    "runs",
    "x 1 node",
    "zones per node",
    "double bookings",
)


def scale_section(rows: list[ScaleRow], report: Report) -> str:
    s = report.options.sizes
    lines = [
        BEGIN,
        "## Scale-out",
        "",
        f"Generated on {report.started:%Y-%m-%d %H:%M %Z} by `{report.command}`: for each count, a local Ray "
        "cluster of a head (no zone room) and that many worker raylets on this machine "
        "(`ray.cluster_utils.Cluster`), `dispatcher serve` joined to it with "
        "`DISPATCHER_ZONE_RESOURCE_UNITS=1`, and the orders fleet "
        f"({s.drivers:,} drivers over the eight order zones). Each figure is the median of {s.repeats} "
        f"saturation runs of {s.duration_s:g} s ({s.connections} connections; batched pings 8).",
        "",
        markdown_table(SCALE_HEADERS, scale_table(rows)),
        "",
        "All nodes share this machine's 2 cores: another node adds processes (a raylet, its "
        "share of Ray's background work) but no CPU, so the figure cannot grow here. What it shows "
        "is whether anything serializes globally: zones spread over the workers (SPREAD), each "
        "serializes only its own bookings, and the ingress calls each zone directly. On machines "
        "of their own, each node brings its cores; the ingress is then the shared stage (add "
        "replicas). See the analysis above for this run.",
        END,
    ]
    return "\n".join(lines) + "\n"


def merge_section(
    existing: str | None, section: str, *, begin: str = BEGIN, end: str = END
) -> str:
    """`existing` with its section between `begin` and `end` (by default the scale-out
    one) replaced by `section` (appended if none)."""
    if not existing:
        return "# Performance\n\n" + section
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(existing):
        return pattern.sub(lambda _: section, existing)
    return existing.rstrip("\n") + "\n\n" + section


# Hand-written findings between these markers survive every regeneration too.
ANALYSIS_BEGIN = "<!-- analysis: begin -->"
ANALYSIS_END = "<!-- analysis: end -->"


def kept_section(existing: str | None) -> str | None:
    """The hand-written analysis and the scale-out section of an existing report, to
    carry over a full rewrite (None when it has neither)."""
    if not existing:
        return None
    kept = [
        match.group(0)
        for begin, end in (
            (ANALYSIS_BEGIN, ANALYSIS_END),
            (BEGIN, END),
            (STREAM_BEGIN, STREAM_END),
            (OFFERS_BEGIN, OFFERS_END),
        )
        if (
            match := re.search(
                re.escape(begin) + r".*?" + re.escape(end) + r"\n?", existing, re.DOTALL
            )
        )
    ]
    return "\n".join(kept) if kept else None
