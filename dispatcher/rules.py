"""Pure rules, no I/O: which driver is dispatchable, whether a fix is plausible, replays, search circles."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from dispatcher.geo import haversine_km
from dispatcher.messages import AssignRequest, AssignResult, Ping, PingVerdict

# GPS fixes jitter by tens of metres; below this jump no speed check applies.
SPEED_CHECK_MIN_KM = 0.2
# Dense cities have many drivers within a few hundred metres: start there (a 0.5 km
# GEOSEARCH ran about 20x faster than a 5 km one among 10,000 drivers).
WIDENING_STEPS_KM = (0.1, 0.25, 0.5, 1.0, 2.0)


class DriverState(Protocol):
    """What the dispatchable rule reads of a driver (store/drivers.py MirrorEntry has it)."""

    @property
    def dispatchable_status(self) -> bool: ...  # AVAILABLE and active
    @property
    def lat(self) -> float | None: ...
    @property
    def lon(self) -> float | None: ...
    @property
    def seen_epoch_s(self) -> float | None: ...


def is_dispatchable(entry: DriverState, now_s: float, ttl_s: float) -> bool:
    """In the mirror iff AVAILABLE and active, located, heartbeat fresh (docs/API.md#invariants, 3).

    The same rule is written in SQL (store/deliveries.py `_pick_sql`) and in the mirror's
    Lua (store/geo.py `UPSERT_LUA` keeps only what this says); tests/integration/
    test_rule_copies.py runs the same cases through all three.
    """
    return (
        entry.dispatchable_status
        and entry.lat is not None
        and entry.lon is not None
        and entry.seen_epoch_s is not None
        and entry.seen_epoch_s > now_s - ttl_s
    )


@dataclass(frozen=True, slots=True)
class LastFix:
    """What PostgreSQL (or this ingress, since) holds as a driver's newest fix."""

    is_active: bool
    lat: float | None
    lon: float | None
    recorded_at: datetime | None


def judge_fix(last: LastFix | None, ping: Ping, max_speed_kmh: float) -> PingVerdict:
    """The verdict of one fix against the driver's newest stored fix.

    The same rule as the ping statement in PostgreSQL (store/drivers.py PING_SQL).
    """
    if last is None:
        return PingVerdict.UNKNOWN_DRIVER
    if not last.is_active:
        return PingVerdict.INACTIVE
    previous = last.recorded_at
    if previous is not None and previous >= ping.recorded_at:
        return PingVerdict.STALE
    if last.lat is not None and last.lon is not None and previous is not None:
        jump = haversine_km(last.lat, last.lon, ping.lat, ping.lon)
        hours = (ping.recorded_at - previous).total_seconds() / 3600.0
        if jump > max(SPEED_CHECK_MIN_KM, max_speed_kmh * hours):
            return PingVerdict.TOO_FAST
    return PingVerdict.ACCEPTED


@dataclass(frozen=True, slots=True)
class Assignment:
    """A driver booked for an order: what its first answer (and every replay) says."""

    seller_order_id: str
    driver_id: str
    assignment_id: str
    distance_km: float
    zone_id: str


# The caller's rendering of an assignment's first answer: stored with the booking so every
# replay sends the same bytes (the store itself knows no HTTP; models.assigned_body).
RenderAnswer = Callable[[Assignment], str]


def new_assignment_id() -> str:
    return "asg_" + uuid.uuid4().hex[:20]


@dataclass(frozen=True, slots=True)
class ExistingOrder:
    """The stored first answer of a booked sellerOrderId, and the pickup it was for."""

    response_body: str
    pickup_lat: float
    pickup_lon: float


def replay(req: AssignRequest, existing: ExistingOrder) -> AssignResult:
    """The stored first answer, or a conflict when the pickup moved."""
    if (existing.pickup_lat, existing.pickup_lon) != (req.pickup_lat, req.pickup_lon):
        return AssignResult("conflict", existing.response_body, "none")
    return AssignResult("replayed", existing.response_body, "none")


def search_steps(radius_km: float) -> list[float]:
    """Widening search radii, ending at the full radius."""
    return [r for r in WIDENING_STEPS_KM if r < radius_km] + [radius_km]
