"""Builds the operator page's snapshot from one read of PostgreSQL (store/opsview.py)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from functools import lru_cache

import asyncpg
import h3

from dispatcher.api.opsmodels import (
    DriverState,
    OpsCounts,
    OpsDelivery,
    OpsDriver,
    OpsMap,
    OpsOffer,
    OpsOrder,
    OpsQueue,
    OpsSnapshot,
    OpsZone,
    QueueState,
)
from dispatcher.config import ResolvedSettings
from dispatcher.store.opsview import (
    OpsDispatchRow,
    OpsDriverRow,
    OpsOfferRow,
    OpsRows,
    read_ops_rows,
)

# Zones are few and never change shape: their outlines are computed once.
OUTLINE_CACHE = 4096


@lru_cache(maxsize=OUTLINE_CACHE)
def zone_outline(zone_id: str) -> tuple[tuple[float, float], ...]:
    return tuple((float(lat), float(lon)) for lat, lon in h3.cell_to_boundary(zone_id))


def driver_state(row: OpsDriverRow, now: datetime, ttl: timedelta) -> DriverState:
    """Stale first: a silent driver's dot is where he was, not where he is."""
    if row.last_seen_at is None or now - row.last_seen_at > ttl:
        return "stale"
    if row.status == "BUSY":
        return "busy"
    if row.open_offer_id is not None:
        return "offered"
    return "available"


def _order(
    row: OpsDispatchRow, state: QueueState, offers: list[OpsOfferRow]
) -> OpsOrder:
    return OpsOrder(
        seller_order_id=row.seller_order_id,
        zone_id=row.zone_id,
        state=state,
        mode=row.mode,
        attempt=row.attempt,
        round=row.round,
        pickup_lat=row.pickup_lat,
        pickup_lon=row.pickup_lon,
        deadline_at=row.deadline_at,
        reason=row.reason,
        since=row.created_at if state != "unassigned" else row.updated_at,
        offers=[
            OpsOffer(
                offer_id=o.offer_id, driver_id=o.driver_id, expires_at=o.expires_at
            )
            for o in offers
        ],
    )


def build_snapshot(rows: OpsRows, settings: ResolvedSettings) -> OpsSnapshot:
    ttl = timedelta(seconds=settings.heartbeat_ttl_s)
    offers_of: dict[str, list[OpsOfferRow]] = {}
    offered_order_of: dict[str, str] = {}
    for offer in rows.open_offers:
        offers_of.setdefault(offer.seller_order_id, []).append(offer)
        offered_order_of[offer.driver_id] = offer.seller_order_id
    carried = {d.driver_id: d.seller_order_id for d in rows.deliveries}

    drivers: list[OpsDriver] = []
    for row in rows.drivers:
        state = driver_state(row, rows.now, ttl)
        order = carried.get(row.driver_id) or offered_order_of.get(row.driver_id)
        drivers.append(
            OpsDriver(
                driver_id=row.driver_id,
                name=row.name,
                lat=row.lat,
                lon=row.lon,
                state=state,
                zone_id=row.zone_id,
                last_seen_at=row.last_seen_at,
                seller_order_id=order,
            )
        )
    states = Counter(d.state for d in drivers)
    per_zone = Counter(d.zone_id for d in drivers)

    waiting: list[OpsOrder] = []
    offered: list[OpsOrder] = []
    for dispatch in rows.open_dispatches:
        offers = offers_of.get(dispatch.seller_order_id, [])
        # OFFERED with every offer answered is waiting for the next round.
        if offers:
            offered.append(_order(dispatch, "offered", offers))
        else:
            waiting.append(_order(dispatch, "waiting", offers))
    unassigned = [_order(d, "unassigned", []) for d in rows.unassigned]

    deliveries = [
        OpsDelivery(
            seller_order_id=d.seller_order_id,
            driver_id=d.driver_id,
            zone_id=d.zone_id,
            status="PICKED_UP" if d.status == "PICKED_UP" else "ASSIGNED",
            pickup_lat=d.pickup_lat,
            pickup_lon=d.pickup_lon,
            drop_lat=d.drop_lat,
            drop_lon=d.drop_lon,
            assigned_at=d.assigned_at,
            picked_up_at=d.picked_up_at,
        )
        for d in rows.deliveries
    ]
    statuses = Counter(d.status for d in deliveries)
    return OpsSnapshot(
        at=rows.now,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
        offer_mode=settings.offer_mode,
        map=OpsMap(
            tile_url=settings.map_tile_url,
            tile_attribution=settings.map_tile_attribution,
        ),
        counts=OpsCounts(
            drivers=len(drivers),
            available=states["available"],
            offered=states["offered"],
            busy=states["busy"],
            stale=states["stale"],
            offline=rows.offline_drivers,
            waiting=len(waiting),
            offered_orders=len(offered),
            unassigned=rows.unassigned_total,
            assigned=statuses["ASSIGNED"],
            picked_up=statuses["PICKED_UP"],
        ),
        zones=[
            OpsZone(
                zone_id=z, outline=list(zone_outline(z)), drivers=per_zone.get(z, 0)
            )
            for z in rows.zone_ids
        ],
        drivers=drivers,
        queue=OpsQueue(waiting=waiting, offered=offered, unassigned=unassigned),
        deliveries=deliveries,
    )


class OpsView:
    """The snapshot behind GET /ops/snapshot: one read, then pure assembly."""

    def __init__(self, pool: asyncpg.Pool, settings: ResolvedSettings) -> None:
        self.pool = pool
        self.settings = settings

    async def snapshot(self) -> OpsSnapshot:
        return build_snapshot(await read_ops_rows(self.pool), self.settings)
