"""Fault 4: two incarnations of one zone at once; the zone epoch fences the stale one."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.actors.messages import AssignRequest, Ping
from dispatcher.errors import StaleEpochError
from dispatcher.geo import haversine_km
from dispatcher.store import keys
from tests.faults.helpers import assert_booking_invariants
from tests.service_fixtures import MakeCore
from tests.support import BERLIN, located_drivers, offset

pytestmark = pytest.mark.integration

TTL_S = 600.0
Point = tuple[float, float]


async def written(pool: asyncpg.Pool) -> tuple[int, int, int, int]:
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM deliveries), (SELECT count(*) FROM delivery_history),
                  (SELECT count(*) FROM webhook_outbox), (SELECT count(*) FROM drivers WHERE status = 'BUSY')"""
    )
    assert row is not None
    return row[0], row[1], row[2], row[3]


async def test_stale_incarnations_cannot_commit(
    zone_cores: MakeCore, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    a = await zone_cores()
    await a.start()
    spots = [offset(*BERLIN, 0.2 * n, 0.1) for n in range(3)]
    ids = await located_drivers(a, spots)

    # B then C take the zone: A and B are zombies that still believe they own it.
    b = await zone_cores()
    await b.start()
    c = await zone_cores()
    await c.start()
    assert (a.epoch, b.epoch, c.epoch) == (1, 2, 3)
    assert (
        await pg_pool.fetchval("SELECT epoch FROM zones WHERE zone_id = $1", a.zone_id)
        == 3
    )
    before = await written(pg_pool)
    geo_before = await redis_client.geopos(keys.zone_geo(a.zone_id), ids[0])

    # Zombie A moves a driver; zombie B books an order. PostgreSQL refuses both.
    later = datetime.now(UTC) + timedelta(seconds=1)
    with pytest.raises(StaleEpochError):
        await a.apply_pings([Ping(ids[0], *offset(*spots[0], 0.1, 0), later)])
    with pytest.raises(StaleEpochError):
        await b.assign(AssignRequest("Z-1", *BERLIN))
    assert await written(pg_pool) == before, "a stale incarnation committed something"
    row = await pg_pool.fetchrow(
        "SELECT lat, lon, location_recorded_at FROM drivers WHERE id = $1", ids[0]
    )
    assert row is not None and haversine_km(row["lat"], row["lon"], *spots[0]) < 1e-9
    assert row["location_recorded_at"] < later
    geo_after = await redis_client.geopos(keys.zone_geo(a.zone_id), ids[0])
    assert geo_after == geo_before, "the refused ping reached the mirror"

    # Fenced for good: every further call fails before touching PostgreSQL.
    for call in (
        a.assign(AssignRequest("Z-2", *BERLIN)),
        b.apply_pings([Ping(ids[1], *spots[1], later)]),
        a.refresh(ids),
        b.sweep_once(),
    ):
        with pytest.raises(StaleEpochError):
            await call
    assert a.fenced and b.fenced and not c.fenced
    assert await written(pg_pool) == before

    # The current incarnation works: the order gets exactly one delivery.
    result = await c.assign(AssignRequest("Z-1", *BERLIN))
    assert result.kind == "assigned"
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 1
    assert await pg_pool.fetchval("SELECT count(*) FROM webhook_outbox") == 1
    await assert_booking_invariants(pg_pool)


async def test_zombie_assigning_in_a_loop_stops_at_the_new_activation(
    zone_cores: MakeCore, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    """A new incarnation starts while the zombie is booking: nothing the zombie tries
    after the activation committed is written; everything before it is."""
    zombie = await zone_cores()
    await zombie.start()
    spots = [offset(*BERLIN, 0.05 * (n % 6), 0.05 * (n // 6)) for n in range(30)]
    await located_drivers(zombie, spots)
    answered: list[str] = []
    refused: list[str] = []
    under_way = asyncio.Event()

    async def book_forever() -> None:
        for n in range(30):
            order_id = f"ZB-{n}"
            try:
                result = await zombie.assign(AssignRequest(order_id, *BERLIN))
            except StaleEpochError:
                refused.append(order_id)
                return
            assert result.kind == "assigned"
            answered.append(order_id)
            if len(answered) >= 5:
                under_way.set()

    booking = asyncio.create_task(book_forever())
    await asyncio.wait_for(under_way.wait(), 10)
    successor = await zone_cores()
    await successor.start()
    at_activation = {
        r["seller_order_id"]
        for r in await pg_pool.fetch("SELECT seller_order_id FROM deliveries")
    }
    await asyncio.wait_for(booking, 10)

    assert refused, "the zombie kept booking after the new activation"
    assert set(answered) == at_activation, (
        "PostgreSQL and the zombie's answers disagree"
    )
    assert refused[0] not in at_activation
    await asyncio.sleep(0.2)
    rows = {
        r["seller_order_id"]
        for r in await pg_pool.fetch("SELECT seller_order_id FROM deliveries")
    }
    assert rows == at_activation, "the zombie wrote after the activation"
    # The successor books the refused order; one delivery and one event, as ever.
    assert (
        await successor.assign(AssignRequest(refused[0], *BERLIN))
    ).kind == "assigned"
    await assert_booking_invariants(pg_pool)
    assert (
        await pg_pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE seller_order_id = $1", refused[0]
        )
        == 1
    )
