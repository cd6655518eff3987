"""The operator page's snapshot (GET /ops/snapshot): wire models, camelCase as the API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from dispatcher.models import ResponseModel

DriverState = Literal["available", "offered", "busy", "stale"]
QueueState = Literal["waiting", "offered", "unassigned"]


class OpsZone(ResponseModel):
    zone_id: str
    # The H3 cell's boundary as [lat, lon] pairs, in order, not closed.
    outline: list[tuple[float, float]]
    drivers: int


class OpsDriver(ResponseModel):
    driver_id: str
    name: str
    lat: float
    lon: float
    state: DriverState
    zone_id: str | None
    last_seen_at: datetime | None
    # The order the driver carries (busy) or is offered (offered).
    seller_order_id: str | None = None


class OpsOffer(ResponseModel):
    offer_id: str
    driver_id: str
    expires_at: datetime


class OpsOrder(ResponseModel):
    seller_order_id: str
    zone_id: str
    state: QueueState
    mode: str
    attempt: int
    round: int
    pickup_lat: float
    pickup_lon: float
    # When the dispatch gives up (waiting, offered) or gave up (unassigned).
    deadline_at: datetime
    reason: str | None
    since: datetime
    # Open offers, soonest expiry first: the page counts down to the first.
    offers: list[OpsOffer]


class OpsDelivery(ResponseModel):
    seller_order_id: str
    driver_id: str
    zone_id: str
    status: Literal["ASSIGNED", "PICKED_UP"]
    pickup_lat: float
    pickup_lon: float
    drop_lat: float | None
    drop_lon: float | None
    assigned_at: datetime
    picked_up_at: datetime | None


class OpsCounts(ResponseModel):
    drivers: int
    available: int
    offered: int
    busy: int
    stale: int
    offline: int
    waiting: int
    offered_orders: int
    unassigned: int
    assigned: int
    picked_up: int


class OpsMap(ResponseModel):
    # Base-map tiles only when configured (DISPATCHER_MAP_TILE_URL): no internet needed.
    tile_url: str | None
    tile_attribution: str | None


class OpsQueue(ResponseModel):
    waiting: list[OpsOrder]
    offered: list[OpsOrder]
    # The newest that gave up (at most 100); counts.unassigned has them all.
    unassigned: list[OpsOrder]


class OpsSnapshot(ResponseModel):
    # PostgreSQL's clock when the snapshot was read: countdowns run against it.
    at: datetime
    heartbeat_ttl_s: float
    offer_mode: str
    map: OpsMap
    counts: OpsCounts
    zones: list[OpsZone]
    drivers: list[OpsDriver]
    queue: OpsQueue
    deliveries: list[OpsDelivery]
