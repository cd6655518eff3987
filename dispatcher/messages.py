"""Plain, picklable values passed between the ingress and zone actors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Literal


@dataclass(frozen=True, slots=True)
class Ping:
    driver_id: str
    lat: float
    lon: float
    recorded_at: datetime


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class PingBatch:
    """Pings in columns: what a flush sends to a zone actor.

    Lists of plain numbers and strings pickle at C speed; one `Ping` object (with its
    datetime) per fix cost the ingress and the actor microseconds each.
    """

    driver_ids: list[str]
    lats: list[float]
    lons: list[float]
    recorded_us: list[int]  # recordedAt, microseconds since the Unix epoch (exact)

    @classmethod
    def of(cls, pings: Sequence[Ping]) -> PingBatch:
        return cls(
            [p.driver_id for p in pings],
            [p.lat for p in pings],
            [p.lon for p in pings],
            [(p.recorded_at - EPOCH) // MICROSECOND for p in pings],
        )

    def pings(self) -> list[Ping]:
        return [
            Ping(driver_id, lat, lon, EPOCH + timedelta(microseconds=us))
            for driver_id, lat, lon, us in zip(
                self.driver_ids, self.lats, self.lons, self.recorded_us, strict=True
            )
        ]


class PingVerdict(StrEnum):
    ACCEPTED = "accepted"
    # Older than the newest accepted fix: ignored, still answered 204 (docs/API.md#location-pings).
    STALE = "stale"
    UNKNOWN_DRIVER = "unknown-driver"
    INACTIVE = "inactive"
    TOO_FAST = "too-fast"


@dataclass(frozen=True, slots=True)
class AssignRequest:
    seller_order_id: str
    pickup_lat: float
    pickup_lon: float
    drop_lat: float | None = None
    drop_lon: float | None = None


# "awaiting": cascade and wave, offers are out (or the dispatch waits between rounds).
AssignKind = Literal["assigned", "unassigned", "replayed", "conflict", "awaiting"]
LookupPath = Literal["redis", "postgres", "none"]


@dataclass(frozen=True, slots=True)
class AssignResult:
    """`body` is the exact JSON answered; for "replayed" it is the stored first answer."""

    kind: AssignKind
    body: str
    path: LookupPath
    driver_id: str | None = None


@dataclass(frozen=True, slots=True)
class ZoneStats:
    zone_id: str
    epoch: int
    drivers: int
    available: int


ZoneState = Literal["idle", "active", "fenced", "draining", "unreachable"]


@dataclass(frozen=True, slots=True)
class ZonePlacement:
    """Where a zone's actor runs and what it holds (operators, rebalancing).

    `idle`: the process exists but has not taken the zone yet (no call arrived, or it
    is the zone's standby); `fenced`: a newer incarnation took the zone from it;
    `draining`: it handed the zone over and refuses calls; `unreachable`: it did not
    answer (its node may be lost; Ray restarts it elsewhere once the loss is detected).
    `started_at` / `active_at`: Unix times this incarnation's constructor began and it
    took the zone (0 if not yet): the parts of a restart's time, as operators measure it.
    """

    zone_id: str
    node_id: str
    pid: int
    state: ZoneState
    epoch: int
    drivers: int
    started_at: float = 0.0
    active_at: float = 0.0
    # Which of the zone's two incarnations this is (`b` exists with standbys only).
    slot: str = "a"
