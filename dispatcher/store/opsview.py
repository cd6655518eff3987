"""What the operator page shows, read from PostgreSQL in one snapshot transaction.

One read-only REPEATABLE READ transaction runs five small statements, so a driver, its
offer and its delivery are seen at one instant: a driver is never drawn busy while its
delivery is missing from the list. Every statement is bounded by the number of drivers
(at most one open offer and one active delivery each) or by a LIMIT.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from dispatcher.store.pg import connection

# Orders that gave up are kept until someone acts; the page lists the newest of them.
UNASSIGNED_LIMIT = 100


@dataclass(frozen=True, slots=True)
class OpsDriverRow:
    driver_id: str
    name: str
    status: str
    lat: float
    lon: float
    zone_id: str | None
    last_seen_at: datetime | None
    open_offer_id: str | None


@dataclass(frozen=True, slots=True)
class OpsDispatchRow:
    seller_order_id: str
    zone_id: str
    mode: str
    status: str
    attempt: int
    round: int
    pickup_lat: float
    pickup_lon: float
    deadline_at: datetime
    reason: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class OpsOfferRow:
    offer_id: str
    seller_order_id: str
    driver_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class OpsDeliveryRow:
    seller_order_id: str
    driver_id: str
    zone_id: str
    status: str
    pickup_lat: float
    pickup_lon: float
    drop_lat: float | None
    drop_lon: float | None
    assigned_at: datetime
    picked_up_at: datetime | None


@dataclass(frozen=True, slots=True)
class OpsRows:
    now: datetime
    zone_ids: list[str]
    drivers: list[OpsDriverRow]
    offline_drivers: int
    open_dispatches: list[OpsDispatchRow]
    unassigned: list[OpsDispatchRow]
    unassigned_total: int
    open_offers: list[OpsOfferRow]
    deliveries: list[OpsDeliveryRow]


# Drivers an operator can see on a map: active, on shift and with a known position.
DRIVERS_SQL = """
SELECT id, name, status, lat, lon, zone_id, last_seen_at, open_offer_id
FROM drivers
WHERE is_active AND status <> 'OFFLINE' AND lat IS NOT NULL
ORDER BY id
"""
OFFLINE_SQL = """
SELECT count(*) FILTER (WHERE status = 'OFFLINE' OR lat IS NULL)
FROM drivers WHERE is_active
"""
DISPATCH_COLUMNS = """seller_order_id, zone_id, mode, status, attempt, round,
    pickup_lat, pickup_lon, deadline_at, reason, created_at, updated_at"""
# dispatches_open_idx covers the open ones.
OPEN_DISPATCHES_SQL = f"""
SELECT {DISPATCH_COLUMNS} FROM dispatches
WHERE status IN ('PENDING', 'OFFERED')
ORDER BY created_at, seller_order_id
"""
UNASSIGNED_SQL = f"""
SELECT {DISPATCH_COLUMNS}, count(*) OVER () AS total FROM dispatches
WHERE status = 'UNASSIGNED'
ORDER BY updated_at DESC, seller_order_id
LIMIT $1
"""
# offers_one_open_per_driver bounds these by the number of drivers.
OPEN_OFFERS_SQL = """
SELECT offer_id, seller_order_id, driver_id, expires_at FROM offers
WHERE status = 'OPEN'
ORDER BY expires_at, offer_id
"""
# deliveries_one_active_per_driver: at most one row per driver.
DELIVERIES_SQL = """
SELECT seller_order_id, driver_id, zone_id, status, pickup_lat, pickup_lon,
       drop_lat, drop_lon, assigned_at, picked_up_at
FROM deliveries
WHERE status IN ('ASSIGNED', 'PICKED_UP')
ORDER BY assigned_at, seller_order_id
"""


def _dispatch(r: asyncpg.Record) -> OpsDispatchRow:
    return OpsDispatchRow(
        r["seller_order_id"],
        r["zone_id"],
        r["mode"],
        r["status"],
        r["attempt"],
        r["round"],
        r["pickup_lat"],
        r["pickup_lon"],
        r["deadline_at"],
        r["reason"],
        r["created_at"],
        r["updated_at"],
    )


async def read_ops_rows(
    pool: asyncpg.Pool, *, unassigned_limit: int = UNASSIGNED_LIMIT
) -> OpsRows:
    async with (
        connection(pool) as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        # clock_timestamp, not now(): the page counts down offers against this instant.
        now: datetime = await conn.fetchval("SELECT clock_timestamp()")
        zones = await conn.fetch("SELECT zone_id FROM zones ORDER BY zone_id")
        drivers = await conn.fetch(DRIVERS_SQL)
        offline: int = await conn.fetchval(OFFLINE_SQL)
        open_dispatches = await conn.fetch(OPEN_DISPATCHES_SQL)
        unassigned = await conn.fetch(UNASSIGNED_SQL, unassigned_limit)
        offers = await conn.fetch(OPEN_OFFERS_SQL)
        deliveries = await conn.fetch(DELIVERIES_SQL)
    return OpsRows(
        now=now,
        zone_ids=[r["zone_id"] for r in zones],
        drivers=[
            OpsDriverRow(
                r["id"],
                r["name"],
                r["status"],
                r["lat"],
                r["lon"],
                r["zone_id"],
                r["last_seen_at"],
                r["open_offer_id"],
            )
            for r in drivers
        ],
        offline_drivers=offline or 0,
        open_dispatches=[_dispatch(r) for r in open_dispatches],
        unassigned=[_dispatch(r) for r in unassigned],
        unassigned_total=unassigned[0]["total"] if unassigned else 0,
        open_offers=[
            OpsOfferRow(
                r["offer_id"], r["seller_order_id"], r["driver_id"], r["expires_at"]
            )
            for r in offers
        ],
        deliveries=[
            OpsDeliveryRow(
                r["seller_order_id"],
                r["driver_id"],
                r["zone_id"],
                r["status"],
                r["pickup_lat"],
                r["pickup_lon"],
                r["drop_lat"],
                r["drop_lon"],
                r["assigned_at"],
                r["picked_up_at"],
            )
            for r in deliveries
        ],
    )
