"""The seed's flows end to end: happy path, Redis down, no driver, and retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.config import ResolvedSettings
from dispatcher.embedded import EmbeddedRedis
from dispatcher.geo import haversine_km, round_km
from dispatcher.zoning import Zoning
from tests.support import BERLIN, Api, WebhookReceiver, geo_members, offset

pytestmark = pytest.mark.integration


async def test_happy_path_assigns_nearest_and_sends_one_signed_webhook(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    pickup = BERLIN
    near = await api.online_driver(*offset(*pickup, 0.3, 0.0), name="near")
    mid = await api.online_driver(*offset(*pickup, 0.0, 1.0), name="mid")
    await api.online_driver(*offset(*pickup, 6.0, 0.0), name="outside radius")

    resp = await api.order("SO-1001", *pickup)
    assert resp.status == 200
    body = await resp.json()
    lat, lon = offset(*pickup, 0.3, 0.0)
    assert body == {
        "assigned": True,
        "sellerOrderId": "SO-1001",
        "driverId": near.driver_id,
        "assignmentId": body["assignmentId"],
        "distanceKm": round_km(haversine_km(*pickup, lat, lon)),
        "zoneId": Zoning(api.settings.zone_resolution).zone_of(*pickup),
    }
    assert "Idempotent-Replayed" not in resp.headers

    # PostgreSQL holds the assignment, the busy driver, its history and one outbox row.
    row = await pg_pool.fetchrow(
        "SELECT * FROM deliveries WHERE seller_order_id = 'SO-1001'"
    )
    assert row is not None
    assert (row["driver_id"], row["status"], row["assignment_id"]) == (
        near.driver_id,
        "ASSIGNED",
        body["assignmentId"],
    )
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", near.driver_id
        )
        == "BUSY"
    )
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", mid.driver_id
        )
        == "AVAILABLE"
    )
    history = await pg_pool.fetch(
        "SELECT status FROM delivery_history WHERE seller_order_id = 'SO-1001'"
    )
    assert [h["status"] for h in history] == ["ASSIGNED"]
    assert await pg_pool.fetchval("SELECT count(*) FROM webhook_outbox") == 1

    # The mirror no longer offers the busy driver; the other stays.
    for driver, expected in ((near, False), (mid, True)):
        zone = await pg_pool.fetchval(
            "SELECT zone_id FROM drivers WHERE id = $1", driver.driver_id
        )
        assert (driver.driver_id in await geo_members(redis_client, zone)) is expected

    # Vendure gets exactly one signed delivery.assigned (verified by the reference library).
    await receiver.wait_until(lambda: len(receiver.received) >= 1)
    [hook] = receiver.received
    assert hook.body["type"] == "delivery.assigned"
    assert hook.body["data"] == {
        "sellerOrderId": "SO-1001",
        "driverId": near.driver_id,
        "assignmentId": body["assignmentId"],
        "distanceKm": body["distanceKm"],
        "sequence": 1,
    }
    assert receiver.rejected == 0


async def test_retries_replay_identical_bytes_and_send_no_second_webhook(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    await api.online_driver(*offset(*BERLIN, 0.5, 0.5))
    first = await api.order("42", *BERLIN)
    first_bytes = await first.read()
    for _ in range(3):
        again = await api.order("42", *BERLIN)
        assert again.status == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await again.read() == first_bytes
    # Vendure's integer ids name the same order as their string form.
    numeric = await api.signed_post(
        "/events/seller-order-ready",
        {"sellerOrderId": 42, "pickup": {"lat": BERLIN[0], "lon": BERLIN[1]}},
    )
    assert await numeric.read() == first_bytes

    await receiver.wait_until(lambda: len(receiver.received) >= 1)
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 1
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 1
    assert await pg_pool.fetchval("SELECT count(*) FROM webhook_outbox") == 1

    moved = await api.order("42", BERLIN[0] + 0.01, BERLIN[1])
    assert moved.status == 409
    assert moved.headers["Content-Type"].startswith("application/problem+json")


async def test_no_driver_answers_unassigned_and_writes_nothing(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    far = await api.online_driver(*offset(*BERLIN, 8.0, 0.0))
    busy_before = await pg_pool.fetch("SELECT id, status FROM drivers ORDER BY id")

    resp = await api.order("SO-none", *BERLIN)
    assert resp.status == 200
    assert await resp.json() == {
        "assigned": False,
        "sellerOrderId": "SO-none",
        "reason": "NO_DRIVER_AVAILABLE",
    }
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM webhook_outbox") == 0
    assert (
        await pg_pool.fetch("SELECT id, status FROM drivers ORDER BY id") == busy_before
    )

    # A retry of an unassigned order tries again: a driver came online nearby.
    near = await api.online_driver(*offset(*BERLIN, 1.0, 0.0))
    retry = await api.order("SO-none", *BERLIN)
    body = await retry.json()
    assert body["assigned"] is True and body["driverId"] == near.driver_id
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", far.driver_id
        )
        == "AVAILABLE"
    )
    assert "Idempotent-Replayed" not in retry.headers
    await receiver.wait_until(lambda: len(receiver.received) == 1)


async def test_order_far_from_every_zone_needs_no_actor(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    resp = await api.order("SO-nowhere", -33.86, 151.21)
    assert (await resp.json())["assigned"] is False
    assert await pg_pool.fetchval("SELECT count(*) FROM zones") == 0


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def test_redis_down_falls_back_to_postgres_with_the_same_answer(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    own_redis: EmbeddedRedis,
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api: Api = await start_api(make_settings(redis_url=own_redis.url))
    drivers = [
        await api.online_driver(*offset(*BERLIN, n * 0.4, -n * 0.3), name=f"d{n}")
        for n in range(1, 5)
    ]

    with_redis = await (await api.order("SO-up", *BERLIN)).json()
    assert with_redis["assigned"] is True
    assert (await api.cancel("SO-up")).status == 200  # frees the driver again

    own_redis.kill()
    ready = await api.client.get("/ready")
    assert ready.status == 200
    assert (await ready.json())["redis"] == "degraded"

    without_redis = await (await api.order("SO-down", *BERLIN)).json()
    assert without_redis["assigned"] is True
    assert without_redis["driverId"] == with_redis["driverId"] == drivers[0].driver_id
    assert without_redis["distanceKm"] == with_redis["distanceKm"]
    row = await pg_pool.fetchrow(
        "SELECT driver_id, status FROM deliveries WHERE seller_order_id = 'SO-down'"
    )
    assert row is not None and tuple(row) == (drivers[0].driver_id, "ASSIGNED")

    # Pings keep working without Redis (PostgreSQL is the truth).
    moved_to = offset(*BERLIN, 0.7, -0.5)
    assert (await api.ping(drivers[1], *moved_to)).status == 204
    stored = await pg_pool.fetchrow(
        "SELECT lat, lon FROM drivers WHERE id = $1", drivers[1].driver_id
    )
    assert stored is not None and (stored["lat"], stored["lon"]) == pytest.approx(
        moved_to
    )
    second = await (await api.order("SO-down-2", *BERLIN)).json()
    assert second["driverId"] == drivers[1].driver_id
    assert second["distanceKm"] == round_km(haversine_km(*BERLIN, *moved_to))

    await receiver.wait_until(lambda: len(receiver.of_type("delivery.assigned")) == 3)
