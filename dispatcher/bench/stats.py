"""Percentiles, medians and the per-run result record every figure is built from."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, like numpy's default; nan if empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    weight = rank - low
    return float(ordered[low] * (1.0 - weight) + ordered[high] * weight)


def median(values: Sequence[float]) -> float:
    """Median of the finite values; nan when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return percentile(finite, 50.0)


def ratio(value: float, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is not positive."""
    if (
        reference is None
        or math.isnan(value)
        or math.isnan(reference)
        or reference <= 0
    ):
        return None
    return value / reference


@dataclass(frozen=True)
class RunResult:
    """One load run as a load generator saw it; latencies in milliseconds."""

    generator: str
    ok: int
    errors: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    # Pings accepted (batched) or orders assigned, when the generator read the answers.
    items: int = 0
    offered_rate: float | None = None
    # Open loop only: how late requests left the generator (its own saturation).
    lag_p99_ms: float | None = None
    status_counts: dict[str, int] = field(default_factory=dict)
    cpu_s: float | None = None

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResult:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def latency_summary(latencies_s: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p99, max) in milliseconds of latencies given in seconds."""
    if not latencies_s:
        return math.nan, math.nan, math.nan
    ms = [x * 1000.0 for x in latencies_s]
    return percentile(ms, 50.0), percentile(ms, 99.0), max(ms)
