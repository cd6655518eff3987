"""Bench options: the target sizes, the --quick smoke sizes, and the command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SCENARIOS = ("pings", "orders", "lookup", "memory")
DEFAULT_OUTPUT = Path("docs/PERFORMANCE.md")


@dataclass(frozen=True)
class Sizes:
    # The target sizes: 20,000 drivers for pings and orders, 50,000 for lookup/memory.
    drivers: int = 20_000
    lookup_drivers: int = 50_000
    duration_s: float = 10.0
    # The wrk setting the reference figures in docs/PERFORMANCE.md used.
    connections: int = 32
    # Medians over 3 runs smooth a busy 2-core machine without taking all day.
    repeats: int = 3
    # The fixed offered rates of the targets.
    ping_rate: float = 3000.0
    order_rate: float = 200.0
    # Orders on the lookup city, where the nearest-driver search is hardest.
    lookup_order_rate: float = 50.0
    # Lookups timed one at a time per repeat: enough samples for a stable p99.
    lookup_samples: int = 2000


# --quick: a smoke run of a few seconds of load per step; proves every path works.
QUICK = Sizes(
    drivers=200,
    lookup_drivers=500,
    duration_s=2.0,
    connections=8,
    repeats=1,
    ping_rate=200.0,
    order_rate=20.0,
    lookup_order_rate=10.0,
    lookup_samples=200,
)


@dataclass(frozen=True)
class Options:
    quick: bool
    sizes: Sizes
    scenarios: tuple[str, ...]
    output: Path | None
    use_wrk: bool
    fsync: bool
    profile: bool
    keep: bool
    seed: int
    note: str
    # Worker-node counts of the scale-out scenario (`--scenario scale`).
    workers: tuple[int, ...] = (1, 2, 3)
    # DISPATCHER_* settings for the measured service (`--set NAME=VALUE`).
    service_env: tuple[tuple[str, str], ...] = ()
    # Driver sockets held open by the stream scenario (`--scenario stream`).
    sockets: int = 1000


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the dispatcher against a bare aiohttp ceiling and a naive Redis baseline.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny sizes, 2 s runs, Python generator, no file",
    )
    p.add_argument(
        "--scenario",
        choices=(*SCENARIOS, "all", "scale", "stream", "offers"),
        default="all",
        help="one scenario, all four, the scale-out figure (a local multi-node Ray "
        "cluster), the driver event stream's figures, or the offer modes' figures "
        "(the last three are not part of 'all')",
    )
    p.add_argument(
        "--sockets",
        type=int,
        default=1000,
        help="driver sockets for --scenario stream (default 1000)",
    )
    p.add_argument(
        "--workers",
        default="1,2,3",
        help="worker-node counts for --scenario scale (default 1,2,3)",
    )
    p.add_argument(
        "--drivers", type=int, help="drivers for pings and orders (default 20000)"
    )
    p.add_argument(
        "--lookup-drivers",
        type=int,
        help="drivers for lookup and memory (default 50000)",
    )
    p.add_argument("--duration", type=float, help="seconds per load run (default 10)")
    p.add_argument(
        "--connections",
        type=int,
        help="keep-alive connections at saturation (default 32)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="runs per figure; the median is reported (default 3)",
    )
    p.add_argument(
        "--ping-rate",
        type=float,
        help="fixed offered rate for single pings (default 3000/s)",
    )
    p.add_argument(
        "--order-rate", type=float, help="fixed offered rate for orders (default 200/s)"
    )
    p.add_argument(
        "--output",
        type=Path,
        help=f"Markdown report (default {DEFAULT_OUTPUT}; none with --quick)",
    )
    p.add_argument(
        "--no-wrk",
        action="store_true",
        help="use the Python generator even where wrk is installed",
    )
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="PostgreSQL without fsync (default: durable, like serve)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one extra single-ping run under py-spy; top frames in the report",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temp dir (logs, request files)"
    )
    p.add_argument(
        "--seed", type=int, default=4, help="random seed for driver positions"
    )
    p.add_argument(
        "--note", default="", help="a sentence added to the report (e.g. machine load)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        dest="settings",
        help="a setting of the measured service, e.g. --set PING_FLUSH_INTERVAL_MS=100 "
        "(DISPATCHER_ is added; repeatable; named in the report)",
    )
    return p


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise SystemExit(f"--{name} must be positive")


def from_args(argv: Sequence[str] | None = None) -> Options:
    args = parser().parse_args(argv)
    base = QUICK if args.quick else Sizes()
    sizes = Sizes(
        drivers=args.drivers or base.drivers,
        lookup_drivers=args.lookup_drivers or base.lookup_drivers,
        duration_s=args.duration or base.duration_s,
        connections=args.connections or base.connections,
        repeats=args.repeats or base.repeats,
        ping_rate=args.ping_rate or base.ping_rate,
        order_rate=args.order_rate or base.order_rate,
        lookup_order_rate=base.lookup_order_rate,
        lookup_samples=base.lookup_samples,
    )
    for name, value in (
        ("drivers", sizes.drivers),
        ("lookup-drivers", sizes.lookup_drivers),
        ("duration", sizes.duration_s),
        ("connections", sizes.connections),
        ("repeats", sizes.repeats),
        ("ping-rate", sizes.ping_rate),
        ("order-rate", sizes.order_rate),
    ):
        _positive(name, value)
    _positive("sockets", args.sockets)
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    output = (
        args.output
        if args.output is not None
        else (None if args.quick else DEFAULT_OUTPUT)
    )
    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        raise SystemExit("--workers takes counts like 1,2,3") from None
    if not workers or min(workers) < 1:
        raise SystemExit("--workers takes counts of at least 1")
    service_env = []
    for item in args.settings:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--set takes NAME=VALUE, not {item!r}")
        service_env.append(
            ("DISPATCHER_" + name.strip().upper().removeprefix("DISPATCHER_"), value)
        )
    return Options(
        quick=args.quick,
        sizes=sizes,
        scenarios=scenarios,
        output=output,
        use_wrk=not (args.no_wrk or args.quick),
        fsync=not (args.no_fsync or args.quick),
        profile=args.profile,
        keep=args.keep,
        seed=args.seed,
        note=args.note,
        workers=workers,
        service_env=tuple(service_env),
        sockets=args.sockets,
    )
