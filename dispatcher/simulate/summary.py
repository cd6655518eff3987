"""What a run produced: one record per order, utilisation by hour, and the summary table."""

from __future__ import annotations

import hashlib
import math
from dataclasses import astuple, dataclass, field
from typing import Any

from dispatcher.simulate.city import DAY_S

OUTCOMES = ("delivered", "failed", "cancelled", "unassigned", "open")


@dataclass(slots=True)
class OrderRecord:
    """One order's story in simulated seconds; `outcome` is one of OUTCOMES."""

    number: int
    ready_s: float
    attempts: int = 0  # seller-order-ready calls (the shop retries `assigned: false`)
    offers: int = 0  # offers made (0 in auto mode)
    assigned_s: float | None = None
    driver_id: str | None = None
    distance_km: float | None = None
    picked_up_s: float | None = None
    done_s: float | None = None
    outcome: str = "open"


@dataclass(slots=True)
class Utilisation:
    """Busy and on-shift driver-seconds per hour of the day (all simulated days summed)."""

    busy_s: list[float] = field(default_factory=lambda: [0.0] * 24)
    shift_s: list[float] = field(default_factory=lambda: [0.0] * 24)

    def add(self, hours: list[float], t0: float, t1: float) -> None:
        """Spread the interval [t0, t1) over the hours of the day it covers."""
        t = t0
        while t < t1:
            hour_end = (math.floor(t / 3600.0) + 1) * 3600.0
            end = min(hour_end, t1)
            hours[int((t % DAY_S) // 3600)] += end - t
            t = end

    def total(self) -> float:
        shift = sum(self.shift_s)
        return sum(self.busy_s) / shift if shift > 0 else 0.0

    def by_hour(self) -> list[float | None]:
        return [
            b / s if s > 0 else None
            for b, s in zip(self.busy_s, self.shift_s, strict=True)
        ]


@dataclass(slots=True)
class RunResult:
    """Everything a run measured; `fingerprint()` is equal for equal runs, bit for bit."""

    mode: str  # "offline" or "live"
    scenario: str
    matcher: str
    seed: int
    hours: float
    drivers: int
    records: list[OrderRecord]
    utilisation: Utilisation
    wall_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(repr(astuple(record)).encode())
        digest.update(
            repr((self.utilisation.busy_s, self.utilisation.shift_s)).encode()
        )
        return digest.hexdigest()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(result: RunResult) -> dict[str, Any]:
    """The summary's numbers, by name (also what `--report` writes)."""
    records = result.records
    assigned = [r for r in records if r.assigned_s is not None]
    distances = [r.distance_km for r in assigned if r.distance_km is not None]
    waits = [r.assigned_s - r.ready_s for r in assigned if r.assigned_s is not None]
    counts = {o: sum(1 for r in records if r.outcome == o) for o in OUTCOMES}
    n = len(records)
    return {
        "orders": n,
        "assigned": len(assigned),
        **counts,
        "pickup_km_mean": mean(distances),
        "pickup_km_p95": percentile(distances, 95),
        "assign_s_mean": mean(waits),
        "assign_s_p95": percentile(waits, 95),
        "attempts_per_order": sum(r.attempts for r in records) / n if n else None,
        "offers_per_order": sum(r.offers for r in records) / n if n else None,
        "utilisation": result.utilisation.total(),
    }


def _fmt(value: float | None, digits: int, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _span(hours: float) -> str:
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:g} h"


def format_table(result: RunResult) -> str:
    """The plain-text summary printed at the end of every run."""
    s = summarize(result)
    n = s["orders"]

    def share(count: int) -> str:
        return f"{count} ({100.0 * count / n:.1f} %)" if n else str(count)

    rows = [
        (
            "scenario",
            f"{result.scenario} ({result.mode}, {result.matcher} mode, seed {result.seed})",
        ),
        ("simulated", f"{_span(result.hours)}, {result.drivers} drivers"),
        ("orders", str(n)),
        ("assigned", share(s["assigned"])),
        ("delivered / failed", f"{s['delivered']} / {s['failed']}"),
        ("cancelled by shop", str(s["cancelled"])),
        ("never assigned", share(s["unassigned"])),
        ("still open at the end", str(s["open"])),
        (
            "pickup distance",
            f"mean {_fmt(s['pickup_km_mean'], 3, ' km')}, p95 {_fmt(s['pickup_km_p95'], 3, ' km')}",
        ),
        (
            "time to assign",
            f"mean {_fmt(s['assign_s_mean'], 1, ' s')}, p95 {_fmt(s['assign_s_p95'], 1, ' s')}",
        ),
        ("ready events per order", _fmt(s["attempts_per_order"], 2)),
        (
            "offers per order",
            _fmt(s["offers_per_order"], 2)
            + (" (auto mode books at once)" if result.matcher == "auto" else ""),
        ),
        (
            "driver utilisation",
            f"{100.0 * s['utilisation']:.1f} % of on-shift time busy",
        ),
    ]
    for key, value in result.notes.items():
        rows.append((key, str(value)))
    if result.wall_s > 0:
        rows.append(("wall time", f"{result.wall_s:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
