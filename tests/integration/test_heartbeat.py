"""Heartbeat: silent drivers are never dispatched (Redis and fallback paths) and leave the mirror."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.config import ResolvedSettings
from dispatcher.store import keys
from dispatcher.zoning import Zoning
from tests.support import (
    BERLIN,
    WAIT_CEILING_S,
    Api,
    Driver,
    WebhookReceiver,
    as_text,
    geo_members,
    offset,
)

pytestmark = pytest.mark.integration

# Long enough that a driver pinging every 0.4 s stays fresh however starved the machine
# (a ping's own round trip and write-behind must fit in it), short enough to wait out.
TTL_S = 4.0
SWEEP_S = 0.5
# A TTL no step of a test comes near: silence is then made by dating the heartbeat back
# in PostgreSQL, not by waiting (mirror test).
LONG_TTL_S = 120.0


def free_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def keep_pinging(api: Api, driver: Driver, at: tuple[float, float]) -> None:
    """Heartbeats every 0.4 s until cancelled (recordedAt = now, no movement). A `503`
    (the zone did not answer in time, on a starved machine) is retried, as a driver
    app does; any other answer fails the test."""
    while True:
        resp = await api.ping(driver, *at)
        assert resp.status in (204, 503), await resp.text()
        await asyncio.sleep(0.4)


async def until_stale(pg_pool: asyncpg.Pool, driver: Driver) -> None:
    """Wait until PostgreSQL's heartbeat of `driver` is older than TTL_S: bounded by
    the condition, not by a guess of how long the machine takes."""
    deadline = time.monotonic() + TTL_S + WAIT_CEILING_S
    while not await pg_pool.fetchval(
        "SELECT last_seen_at < now() - make_interval(secs => $2) FROM drivers "
        "WHERE id = $1",
        driver.driver_id,
        TTL_S,
    ):
        assert time.monotonic() < deadline, f"{driver.driver_id} never went stale"
        await asyncio.sleep(0.1)


async def assignments_by_path(api: Api, path: str) -> float:
    """The `dispatcher_assignments_total` count of assigned answers found on `path`."""
    text = await (await api.client.get("/metrics")).text()
    prefix = f'dispatcher_assignments_total{{outcome="assigned",path="{path}"}} '
    return sum(
        float(line[len(prefix) :])
        for line in text.splitlines()
        if line.startswith(prefix)
    )


async def silent_is_skipped(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver, tag: str, path: str
) -> None:
    """The scenario of both paths: a silent near driver, a fresh far one."""
    pickup = BERLIN
    fresh_at = offset(*pickup, 0.0, 2.0)
    silent = await api.online_driver(*offset(*pickup, 0.2, 0.0), name="silent")
    fresh = await api.online_driver(*fresh_at, name="fresh")
    # The fresh driver keeps pinging through every order below, so it is fresh when its
    # order is decided however long that takes; the silent one is waited out.
    pinging = asyncio.create_task(keep_pinging(api, fresh, fresh_at))
    try:
        await until_stale(pg_pool, silent)
        await asyncio.sleep(SWEEP_S * 2)  # the sweep may drop it from the mirror
        await silent_then_fresh(api, pg_pool, tag, path, silent, fresh, pickup)
    finally:
        pinging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinging

    # Its next ping makes it dispatchable again.
    assert (await api.ping(silent, *offset(*pickup, 0.2, 0.0))).status == 204
    again = await (await api.order(f"SO-{tag}-2", *pickup)).json()
    assert again["assigned"] is True and again["driverId"] == silent.driver_id

    await receiver.wait_until(lambda: len(receiver.of_type("delivery.assigned")) == 2)
    assert {h.body["data"]["driverId"] for h in receiver.received} == {
        fresh.driver_id,
        silent.driver_id,
    }


async def silent_then_fresh(
    api: Api,
    pg_pool: asyncpg.Pool,
    tag: str,
    path: str,
    silent: Driver,
    fresh: Driver,
    pickup: tuple[float, float],
) -> None:
    silent_row = await pg_pool.fetchrow(
        "SELECT status, last_seen_at < now() - make_interval(secs => $2) AS stale "
        "FROM drivers WHERE id = $1",
        silent.driver_id,
        TTL_S,
    )
    assert silent_row is not None and tuple(silent_row) == ("AVAILABLE", True)

    body = await (await api.order(f"SO-{tag}-1", *pickup)).json()
    assert body["assigned"] is True
    assert body["driverId"] == fresh.driver_id, (
        "a driver silent for longer than the TTL was assigned"
    )
    assert await assignments_by_path(api, path) == 1

    # Only the silent driver is left: nobody is assigned and nothing is written.
    alone = await (await api.order(f"SO-{tag}-2", *pickup)).json()
    assert alone == {
        "assigned": False,
        "sellerOrderId": f"SO-{tag}-2",
        "reason": "NO_DRIVER_AVAILABLE",
    }
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", silent.driver_id
        )
        == "AVAILABLE"
    )
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 1
    assert await pg_pool.fetchval("SELECT driver_id FROM deliveries") == fresh.driver_id


async def test_silent_driver_is_not_assigned_on_the_redis_path(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api: Api = await start_api(
        make_settings(heartbeat_ttl_s=TTL_S, sweep_interval_s=SWEEP_S)
    )
    await silent_is_skipped(api, pg_pool, receiver, "redis", "redis")


async def test_silent_driver_still_in_the_mirror_is_not_assigned(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
) -> None:
    # No sweep runs during the test: the Redis answer still offers the silent driver,
    # and the final check in PostgreSQL must refuse it.
    api: Api = await start_api(
        make_settings(
            heartbeat_ttl_s=LONG_TTL_S, sweep_interval_s=300, reconcile_interval_s=300
        )
    )
    zone = Zoning(api.settings.zone_resolution).zone_of(*BERLIN)
    silent = await api.online_driver(*offset(*BERLIN, 0.2, 0.0), name="silent")
    await api.settle()
    # Silent for longer than the TTL by PostgreSQL's clock, which decides: its heartbeat
    # dated back rather than waited out, so the fresh driver below has the whole long TTL
    # to be booked in, on any machine. The mirror still lists the silent one.
    await pg_pool.execute(
        "UPDATE drivers SET last_seen_at = now() - make_interval(secs => $2) "
        "WHERE id = $1",
        silent.driver_id,
        LONG_TTL_S + 1,
    )
    assert silent.driver_id in await geo_members(redis_client, zone)

    alone = await (await api.order("SO-mirror-1", *BERLIN)).json()
    assert alone["assigned"] is False
    fresh = await api.online_driver(*offset(*BERLIN, 0.0, 3.0), name="fresh")
    body = await (await api.order("SO-mirror-2", *BERLIN)).json()
    assert body["assigned"] is True and body["driverId"] == fresh.driver_id
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 1


async def test_silent_driver_is_not_assigned_on_the_postgres_fallback_path(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
    receiver: WebhookReceiver,
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    api: Api = await start_api(
        make_settings(
            redis_url=dead_redis, heartbeat_ttl_s=TTL_S, sweep_interval_s=SWEEP_S
        )
    )
    ready = await api.client.get("/ready")
    assert ready.status == 200
    assert (await ready.json())["redis"] == "degraded"

    await silent_is_skipped(api, pg_pool, receiver, "pg", "postgres")
    # Nothing reached the session's (healthy, unrelated) Redis.
    assert await redis_client.keys(keys.PREFIX + "*") == []


async def test_silent_driver_leaves_the_mirror_within_ttl_and_returns_on_ping(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
) -> None:
    api: Api = await start_api(
        make_settings(heartbeat_ttl_s=TTL_S, sweep_interval_s=SWEEP_S)
    )
    at = offset(*BERLIN, 0.4, 0.4)
    zone = Zoning(api.settings.zone_resolution).zone_of(*at)
    # The steady driver comes first: its first ping starts the zone's actor, which under
    # load can take longer than the whole TTL, so the silent driver's clock starts after.
    steady_at = offset(*BERLIN, -0.4, -0.4)
    steady = await api.online_driver(*steady_at, name="steady")
    silent = await api.online_driver(*at, name="silent")
    # The heartbeat starts at the ping's own time.
    pinged: float = await pg_pool.fetchval(
        "SELECT extract(epoch FROM last_seen_at)::float8 FROM drivers WHERE id = $1",
        silent.driver_id,
    )
    assert await geo_members(redis_client, zone) == {silent.driver_id, steady.driver_id}

    # Fresh for the whole TTL, then gone (after TTL + one sweep interval on an idle
    # machine; the ceiling only bounds the wait, a starved machine sweeps late).
    gone_after: float | None = None
    while time.time() - pinged < TTL_S + SWEEP_S + WAIT_CEILING_S:
        members = await geo_members(redis_client, zone)
        if silent.driver_id not in members:
            gone_after = time.time() - pinged
            break
        assert (await api.ping(steady, *steady_at)).status == 204
        await asyncio.sleep(0.05)
    assert gone_after is not None, (
        f"still in the mirror {TTL_S + SWEEP_S + WAIT_CEILING_S:.0f}s after its last ping"
    )
    print(f"silent driver left the mirror {gone_after:.2f} s after its last ping")
    assert gone_after >= TTL_S, (
        f"dropped after {gone_after:.2f}s, before its heartbeat expired"
    )
    assert steady.driver_id in await geo_members(redis_client, zone)
    assert silent.driver_id not in as_text(
        await redis_client.zrange(keys.zone_seen(zone), 0, -1)
    )
    # PostgreSQL keeps the truth: still AVAILABLE, only the heartbeat is old.
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", silent.driver_id
        )
        == "AVAILABLE"
    )

    # A sweep or a rebuild later, it stays out.
    await asyncio.sleep(api.settings.reconcile_interval_s)
    assert silent.driver_id not in await geo_members(redis_client, zone)

    # Its next ping brings it straight back.
    assert (await api.ping(silent, *at)).status == 204
    assert silent.driver_id in await geo_members(redis_client, zone)
    await asyncio.sleep(SWEEP_S * 2)
    assert silent.driver_id in await geo_members(redis_client, zone)
