"""The dispatchable rule's three copies agree: Python (rules.py), SQL (PICK_SQL) and the mirror's Lua."""

from __future__ import annotations

import itertools
import time

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.geo import bounding_box
from dispatcher.rules import is_dispatchable
from dispatcher.store.deliveries import PICK_SQL
from dispatcher.store.drivers import DriverStore
from dispatcher.store.geo import GeoMirror, connect_redis
from dispatcher.store.pg import activate_zone
from dispatcher.zoning import Zoning
from tests.support import BERLIN, geo_members

pytestmark = pytest.mark.integration

TTL_S = 60.0
RADIUS_KM = 5.0
ZONE = Zoning(5).zone_of(*BERLIN)
# Every combination of what the rule reads: status, activity, a location, heartbeat age.
CASES = list(
    itertools.product(
        ("AVAILABLE", "BUSY", "OFFLINE"),
        (True, False),
        (True, False),
        (5.0, TTL_S + 5.0, None),
    )
)


def case_id(status: str, active: bool, located: bool, age_s: float | None) -> str:
    return f"{status}-{'active' if active else 'inactive'}-{'located' if located else 'nowhere'}-{age_s}"


async def put_driver(
    pg_pool: asyncpg.Pool, status: str, active: bool, located: bool, age_s: float | None
) -> str:
    driver_id = f"drv_{case_id(status, active, located, age_s)}"
    await pg_pool.execute(
        """INSERT INTO drivers (id, name, token_hash, status, is_active, lat, lon,
               location_recorded_at, last_seen_at, zone_id)
           VALUES ($1, 'rule', $2, $3, $4, $5, $6,
               now() - make_interval(secs => $7), now() - make_interval(secs => $7), $8)""",
        driver_id,
        driver_id.encode(),
        status,
        active,
        BERLIN[0] if located else None,
        BERLIN[1] if located else None,
        age_s,
        ZONE,
    )
    return driver_id


async def picked_by_sql(pg_pool: asyncpg.Pool, epoch: int) -> str | None:
    """PICK_SQL's choice near the driver, rolled back so nothing is booked."""
    async with pg_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            row = await conn.fetchrow(
                PICK_SQL,
                *BERLIN,
                TTL_S,
                *bounding_box(*BERLIN, RADIUS_KM),
                None,
                RADIUS_KM,
                [],
                ZONE,
                epoch,
            )
        finally:
            await tx.rollback()
    assert row is not None and row["epoch"] == epoch
    picked: str | None = row["id"]
    return picked


@pytest.mark.parametrize(
    ("status", "active", "located", "age_s"), CASES, ids=[case_id(*c) for c in CASES]
)
async def test_python_sql_and_lua_agree(
    pg_pool: asyncpg.Pool,
    redis_url: str,
    redis_client: Redis,
    status: str,
    active: bool,
    located: bool,
    age_s: float | None,
) -> None:
    epoch = await activate_zone(pg_pool, ZONE)
    driver_id = await put_driver(pg_pool, status, active, located, age_s)
    entries = await DriverStore(pg_pool).zone_entries(ZONE)
    assert [e.driver_id for e in entries] == [driver_id]

    in_python = is_dispatchable(entries[0], time.time(), TTL_S)
    in_sql = await picked_by_sql(pg_pool, epoch) == driver_id
    mirror = GeoMirror(connect_redis(redis_url, 2.0), 2.0)
    try:
        await mirror.rebuild(ZONE, entries, time.time(), TTL_S)
    finally:
        await mirror.client.aclose()
    in_lua = driver_id in await geo_members(redis_client, ZONE)

    expected = (
        status == "AVAILABLE"
        and active
        and located
        and age_s is not None
        and age_s < TTL_S
    )
    assert (in_python, in_sql, in_lua) == (expected, expected, expected)
