"""The printed table and docs/PERFORMANCE.md: figures, ratios, targets, machine, method."""

from __future__ import annotations

import math
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dispatcher.bench.memory import ProcessMemory
from dispatcher.bench.options import Options
from dispatcher.bench.results import Figure
from dispatcher.bench.workload import (
    CITY_RADIUS_KM,
    DENSE_SHARE,
    DENSE_SIGMA_KM,
    ORDER_WARMUP_S,
)

THROUGHPUT_UNITS = ("req/s", "pings/s", "orders/s", "assignments/s")
RESULT_HEADERS = (
    "scenario",
    "figure",
    "median",
    "unit",
    "runs",
    "x ceiling",
    "x naive",
    "target",
    "met",
)


@dataclass
class Report:
    started: datetime
    command: str
    options: Options
    machine: dict[str, str]
    figures: list[Figure] = field(default_factory=list)
    memory: list[ProcessMemory] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Process label -> its top frames by own samples.
    profile: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


# ---- formatting -----------------------------------------------------------------------


def format_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit in THROUGHPUT_UNITS or unit in ("count", "MB"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{value:.3g}"


def format_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def format_met(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "—"}[met]


_NUMERIC = re.compile(r"^[-+]?[\d,.]+x?( / [-+]?[\d,.]+)*$")


def _is_numeric(cell: str) -> bool:
    return cell in ("n/a", "—") or bool(_NUMERIC.match(cell))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text columns: numbers right-aligned, text left-aligned."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
        for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if _is_numeric(c) else c.ljust(w)
            for c, w in zip(cells, widths, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join(
        [
            line(headers),
            "|" + "|".join("---" for _ in headers) + "|",
            *(line(r) for r in rows),
        ]
    )


def figure_row(fig: Figure) -> list[str]:
    runs = " / ".join(format_value(v, fig.unit) for v in fig.values)
    return [
        fig.scenario,
        fig.name,
        format_value(fig.value, fig.unit),
        fig.unit,
        runs,
        format_ratio(fig.vs_ceiling),
        format_ratio(fig.vs_naive),
        fig.target.text if fig.target else "",
        format_met(fig.met),
    ]


def memory_rows(memory: Sequence[ProcessMemory]) -> list[list[str]]:
    order = {"ingress": 0, "zone actor": 1, "ray": 2, "postgres": 3, "redis": 4}
    rows = []
    for m in sorted(memory, key=lambda m: (order.get(m.role, 9), -m.rss_mb)):
        uss = "n/a" if m.uss_mb is None else f"{m.uss_mb:,.0f}"
        rows.append(
            [m.role, m.name, m.zone_id or "", str(m.pid), f"{m.rss_mb:,.0f}", uss]
        )
    return rows


MEMORY_HEADERS = ("role", "process", "zone", "pid", "RSS MB", "USS MB")


def text_report(report: Report) -> str:
    parts = ["", format_table(RESULT_HEADERS, [figure_row(f) for f in report.figures])]
    if report.memory:
        parts += ["", format_table(MEMORY_HEADERS, memory_rows(report.memory))]
    for note in report.notes:
        parts.append(f"note: {note}")
    for failure in report.failed:
        parts.append(f"FAILED: {failure}")
    return "\n".join(parts) + "\n"


# ---- machine --------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    mem_kb = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    ram = f"{int(mem_kb) / 1024 / 1024:.1f} GiB" if mem_kb.isdigit() else "unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "CPU": _proc_field("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "RAM": ram,
        "kernel": f"{platform.system()} {platform.release()}",
        "load average at start (1, 5, 15 min)": load,
        "Python": platform.python_version(),
        "Ray": _version("ray"),
        "aiohttp": _version("aiohttp"),
        "asyncpg": _version("asyncpg"),
        "pydantic": _version("pydantic"),
    }


# ---- Markdown -------------------------------------------------------------------------


def _method(o: Options) -> str:
    s = o.sizes
    generator = (
        "wrk (2 threads) at saturation, the Python open-loop generator at fixed rates"
        if o.use_wrk
        else (
            "the Python generator only (closed loop at saturation, open loop at fixed rates)"
        )
    )
    generator += (
        " (the Python generator is asyncio with a minimal keep-alive HTTP/1.1 client: about a third"
        " of a core at 3,000 requests/s here)"
    )
    return f"""\
- One run of `python -m dispatcher.bench` starts everything it measures, in a temp dir: an embedded
  PostgreSQL ({"fsync on, as `dispatcher serve` runs it" if o.fsync else "fsync off"}) and Redis,
  `dispatcher serve` as a subprocess (it starts its own local Ray), and the two references, each its
  own aiohttp process. The load generator is yet another process: {generator}.
- **Ceiling**: a bare aiohttp handler for `PATCH /drivers/{{id}}/location` that validates the body with
  the service's own `LocationPing` model and answers 204, no I/O. **Naive baseline**: the same
  handler plus one Redis pipeline per request (GEOADD + HSET status + SET heartbeat EX 60), the
  seed's design: no actors, no PostgreSQL. Both get the same request file as the service.
- Throughput figures are compared with the references' saturation throughput; latency figures with
  the references' latency under the same load (same percentile, same offered rate or same
  saturation). A ratio of orders or lookups to a ping handler says how far a request is from "free".
- Saturation: {s.connections} keep-alive connections for {s.duration_s:g} s. Fixed rate: requests scheduled
  at exact times (open loop); latency counts from the scheduled time, so a generator or server that
  falls behind shows up instead of hiding (no coordinated omission).
- Every figure is the median over {s.repeats} run(s); the runs are listed.
- Pings: {s.drivers:,} drivers over a {CITY_RADIUS_KM:g} km disc around Berlin (several zones); single pings rotate over
  every driver with its own token; batched pings carry as many pings as fit the 64 KiB body limit.
  Before measuring, every driver pings once (the ingress's token cache is warm, as in production).
- Orders: {s.drivers:,} AVAILABLE drivers in 8 zones (8 German cities), pickups near them, every order a
  new `sellerOrderId` signed with the inbound secret. Before each run every driver's heartbeat is
  renewed; after it, double bookings are counted in PostgreSQL (drivers with two of the run's
  deliveries), then all drivers are freed by SQL. Before the first run, {ORDER_WARMUP_S:g} s of orders at the
  fixed rate (not measured; double bookings still counted) warm each zone's connections, prepared
  statements and scripts, as a service that has been up a while has them.
- Lookup: {s.lookup_drivers:,} drivers around Paris, {DENSE_SHARE:.0%} of them in a Gaussian centre (sigma {DENSE_SIGMA_KM:g} km). Three figures:
  the Redis lookup exactly as the zone actor runs it (`nearest_widening`: circles of 0.1, 0.25, 0.5, 1, 2, then
  5 km until one holds drivers, 8 candidates, widened inside Redis by one script call), timed one call at a time from the bench process; the PostgreSQL fallback
  (`PICK_SQL` without candidates, rolled back); and the whole assignment path
  (`seller-order-ready` over HTTP at a fixed rate, pickups drawn from the same dense distribution).
- Memory: RSS and USS (pages no other process shares) of the ingress, each zone actor and each Ray
  daemon at {s.lookup_drivers:,} drivers, after each of them pinged once; PostgreSQL and Redis for scale.
  It runs first, so no other scenario's drivers are in the service yet; lookup reuses its fleet.
"""


PROFILE_HOWTO = """\
Profile before optimizing. While a load runs (for instance `python -m dispatcher.bench --scenario
pings --keep`), attach py-spy (installed in the dev venv) to the ingress; its pid is in the memory
table or `pgrep -f 'dispatcher.cli serve'`:

```sh
py-spy record -o profile.svg --pid <ingress pid> --duration 10          # flame graph
py-spy top --pid <ingress pid>                                          # live view
py-spy record -o actor.svg --pid <zone actor pid> --duration 10         # a zone actor (ray::ZoneActor)
```

`python -m dispatcher.bench --profile` does one extra single-ping saturation run under
`py-spy record --format raw --nonblocking` on the ingress and on the zone actor that had used the
most CPU, and lists below the frames where each spent its samples (idle waits excluded).
"""


def markdown_report(report: Report) -> str:
    o = report.options
    out = [
        "# Performance",
        "",
        f"Generated by `python -m dispatcher.bench` on {report.started:%Y-%m-%d %H:%M %Z}. Command:",
        "",
        f"```sh\n{report.command}\n```",
        "",
    ]
    if o.note:
        out += [f"> {o.note}", ""]
    out += [
        "## Machine",
        "",
        markdown_table(("what", "value"), list(report.machine.items())),
        "",
    ]
    out += ["## How it is measured", "", _method(o)]
    ran = sorted({f.scenario for f in report.figures})
    out += ["## Results", "", f"Scenarios in this run: {', '.join(ran) or 'none'}.", ""]
    out += [markdown_table(RESULT_HEADERS, [figure_row(f) for f in report.figures]), ""]
    judged = [f for f in report.figures if f.target is not None]
    if judged:
        out += ["## Targets (issue 4)", ""]
        out += [
            f"- {format_met(f.met)}: {f.scenario} — {f.name}: {format_value(f.value, f.unit)} {f.unit}"
            f" (target {f.target.text if f.target else ''})"
            for f in judged
        ]
        out += [
            "- by design, not a figure: no per-ping Ray round trip (pings are written behind, one"
            " `apply_ping_batch` call per zone per flush window, see docs/ARCHITECTURE.md); `last_seen_at` writes"
            " are coalesced (the newest queued fix per driver): the batched-ping note gives the fixes"
            " written per second and how long the queues took to drain, i.e. how stale PostgreSQL was.",
            "",
        ]
    if report.memory:
        out += [
            "## Memory",
            "",
            markdown_table(MEMORY_HEADERS, memory_rows(report.memory)),
            "",
        ]
    notes = [
        f"{f.scenario} — {f.name}: {n}" for f in report.figures for n in f.notes
    ] + report.notes
    if notes or report.failed:
        out += (
            ["## Notes", ""]
            + [f"- {n}" for n in notes]
            + [f"- FAILED: {x}" for x in report.failed]
            + [""]
        )
    out += ["## Profile", "", PROFILE_HOWTO]
    for label, frames in report.profile.items():
        out += [
            f"Top frames of the {label} by own samples (share of its samples), single pings at saturation:",
            "",
        ]
        out += [
            markdown_table(
                ("frame", "share"), [[name, f"{share:.1%}"] for name, share in frames]
            ),
            "",
        ]
    if not report.profile:
        out += ["_No profile in this run (add `--profile`)._", ""]
    return "\n".join(out)
