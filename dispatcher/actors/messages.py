"""Plain, picklable values passed between the ingress and zone actors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal


@dataclass(frozen=True, slots=True)
class Ping:
    driver_id: str
    lat: float
    lon: float
    recorded_at: datetime


class PingVerdict(StrEnum):
    ACCEPTED = "accepted"
    # Older than the newest accepted fix: ignored, still answered 204 (CONTRACT §4).
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


AssignKind = Literal["assigned", "unassigned", "replayed", "conflict"]
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


ZoneState = Literal["idle", "active", "draining", "unreachable"]


@dataclass(frozen=True, slots=True)
class ZonePlacement:
    """Where a zone's actor runs and what it holds (operators, rebalancing).

    `idle`: the process exists but has not taken the zone yet (no call arrived);
    `draining`: it handed the zone over and refuses calls; `unreachable`: it did not
    answer (its node may be lost; Ray restarts it elsewhere once the loss is detected).
    """

    zone_id: str
    node_id: str
    pid: int
    state: ZoneState
    epoch: int
    drivers: int
