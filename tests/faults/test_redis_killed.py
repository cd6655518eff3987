"""Fault 1: Redis SIGKILLed under load, then restarted empty; the mirror rebuilds itself."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.config import ResolvedSettings
from dispatcher.geo import haversine_km, round_km
from tests.faults.conftest import OwnServers
from tests.support import BERLIN, WAIT_CEILING_S, Api, Driver, WebhookReceiver, offset
from tests.support.faults import (
    assert_booking_invariants,
    background,
    mirror_diff,
    wait_until,
    zones_built,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRIVERS = 24
TTL_S = 600.0
# Production sweeps every 5 s; 2 s keeps the window between "Redis is back" and
# "the zone is rebuilt" wide enough for orders to land in it.
SWEEP_S = 2.0
# Each driver pings about this often, as a phone would (not in lockstep).
PING_PERIOD_S = 1.2
KEEP_AT_MOST = 8
Point = tuple[float, float]


@dataclass
class Load:
    """What the load saw, by phase ("up", "down", "back")."""

    phase: str = "up"
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    wrong_driver: list[str] = field(default_factory=list)
    wrong_at: list[float] = field(default_factory=list)
    assigned: dict[str, str] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    ready: list[tuple[str, int, str]] = field(default_factory=list)


async def pinger(
    api: Api, drivers: list[tuple[Driver, Point]], load: Load, seed: int
) -> None:
    rng = random.Random(seed)
    while not load.stop.is_set():
        for driver, at in rng.sample(drivers, len(drivers)):
            resp = await api.ping(driver, *at)
            load.statuses[(load.phase, "ping", resp.status)] += 1
            await resp.read()
            await asyncio.sleep(PING_PERIOD_S / len(drivers))
            if load.stop.is_set():
                return


async def orderer(api: Api, positions: dict[str, Point], load: Load) -> None:
    """Sequential orders, so the nearest free driver is known; most are then cancelled."""
    rng = random.Random(7)
    busy: set[str] = set()
    n = 0
    while not load.stop.is_set():
        pickup = offset(*BERLIN, rng.uniform(-1.2, 1.2), rng.uniform(-1.2, 1.2))
        free = {d: p for d, p in positions.items() if d not in busy}
        expected = min(free, key=lambda d: (haversine_km(*pickup, *free[d]), d))
        order_id = f"R-{n}"
        phase = load.phase
        resp = await api.order(order_id, *pickup)
        load.statuses[(phase, "order", resp.status)] += 1
        body: dict[str, Any] = json.loads(await resp.read())
        n += 1
        if resp.status != 200 or not body.get("assigned"):
            load.wrong_driver.append(f"{phase} {order_id}: {resp.status} {body}")
            continue
        driver = body["driverId"]
        load.assigned[order_id] = driver
        if driver != expected:
            load.wrong_at.append(time.monotonic())
            got, want = (
                haversine_km(*pickup, *positions[driver]),
                haversine_km(*pickup, *free[expected]),
            )
            load.wrong_driver.append(
                f"{phase} {order_id}: got {driver} at {got:.3f} km, nearest {expected} at {want:.3f} km"
            )
        elif body["distanceKm"] != round_km(haversine_km(*pickup, *free[expected])):
            load.wrong_driver.append(
                f"{phase} {order_id}: distanceKm {body['distanceKm']}"
            )
        if n % 3 == 0 and len(busy) < KEEP_AT_MOST:
            busy.add(driver)
            continue
        resp = await api.cancel(order_id)
        load.statuses[(phase, "cancel", resp.status)] += 1
        await resp.read()
        load.cancelled.add(order_id)


async def ready_watch(api: Api, load: Load) -> None:
    while not load.stop.is_set():
        resp = await api.client.get("/ready")
        body = await resp.json()
        load.ready.append((load.phase, resp.status, body["redis"]))
        await asyncio.sleep(0.1)


async def fallback_assignments(api: Api) -> float:
    text = await (await api.client.get("/metrics")).text()
    prefix = 'dispatcher_assignments_total{outcome="assigned",path="postgres"} '
    return sum(
        float(line[len(prefix) :])
        for line in text.splitlines()
        if line.startswith(prefix)
    )


async def test_redis_killed_under_load_then_restarted_empty(
    start_api: Callable[[ResolvedSettings], Any],
    fault_settings: Callable[..., ResolvedSettings],
    fault_stack: OwnServers,
    own_pool: asyncpg.Pool,
    own_redis: Redis,
    scripted_receiver: WebhookReceiver,
    recovery: Callable[[str, float], None],
) -> None:
    api: Api = await start_api(
        fault_settings(heartbeat_ttl_s=TTL_S, sweep_interval_s=SWEEP_S)
    )
    rng = random.Random(1)
    spots = [
        offset(*BERLIN, rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5))
        for _ in range(DRIVERS)
    ]
    drivers = list(
        await asyncio.gather(
            *(api.online_driver(*p, name=f"r{i}") for i, p in enumerate(spots))
        )
    )
    positions = {d.driver_id: p for d, p in zip(drivers, spots, strict=True)}
    assert await mirror_diff(own_pool, own_redis, TTL_S) == []

    load = Load()
    pairs = list(zip(drivers, spots, strict=True))
    async with background(
        pinger(api, pairs[0::2], load, 1),
        pinger(api, pairs[1::2], load, 2),
        orderer(api, positions, load),
        ready_watch(api, load),
    ):
        await asyncio.sleep(1.5)
        fallback_before = await fallback_assignments(api)

        fault_stack.redis.kill()
        load.phase = "down"
        await asyncio.sleep(2.5)
        fallback_during = await fallback_assignments(api) - fallback_before

        await asyncio.to_thread(fault_stack.redis.start)
        restarted = time.monotonic()
        load.phase = "back"

        async def rebuilt() -> bool:
            return (
                await zones_built(own_pool, own_redis)
                and await mirror_diff(own_pool, own_redis, TTL_S) == []
            )

        async def ready_ok() -> bool:
            return any(p == "back" and redis == "ok" for p, _, redis in load.ready)

        # Load keeps flowing while the zones rebuild themselves; nothing is restarted.
        ready_s = await wait_until(
            ready_ok, within_s=WAIT_CEILING_S, what="/ready redis ok"
        )
        await wait_until(
            rebuilt,
            within_s=SWEEP_S + 5,
            interval_s=0.02,
            what="mirror rebuilt under load",
        )
        rebuilt_s = time.monotonic() - restarted
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - restarted)))
        load.stop.set()
    recovery("redis_restart_to_ready_ok", ready_s)
    recovery("redis_restart_to_mirror_rebuilt", rebuilt_s)
    print("load by (phase, kind, status):", dict(load.statuses))

    # No request failed because of Redis, in any phase.
    failed = {k: n for k, n in load.statuses.items() if k[2] not in (200, 204)}
    assert not failed, failed
    for phase in ("up", "down", "back"):
        assert load.statuses[(phase, "order", 200)] >= 3, (phase, dict(load.statuses))
        assert load.statuses[(phase, "ping", 204)] >= 5, (phase, dict(load.statuses))
    assert fallback_during >= 3, (
        "orders during the outage should take the PostgreSQL path"
    )
    # /ready: 200 throughout, degraded while Redis was dead, ok again after.
    assert all(status == 200 for _, status, _ in load.ready), load.ready
    assert any(p == "down" and r == "degraded" for p, _, r in load.ready), load.ready
    assert load.ready[-1][2] == "ok", load.ready[-1]

    # The mirror equals the dispatchable set per zone, quiescent, no stale, none missing.
    await wait_until(
        lambda: _no_diff(own_pool, own_redis),
        within_s=WAIT_CEILING_S,
        what="quiescent mirror",
    )
    assert await mirror_diff(own_pool, own_redis, TTL_S) == []

    # No double booking; one webhook per event.
    await assert_booking_invariants(own_pool)
    rows = await own_pool.fetch(
        "SELECT seller_order_id, driver_id, status FROM deliveries"
    )
    assert {r["seller_order_id"]: r["driver_id"] for r in rows} == load.assigned
    assert {
        r["seller_order_id"] for r in rows if r["status"] == "CANCELLED"
    } == load.cancelled
    expected_events = len(load.assigned) + len(load.cancelled)
    await wait_until(
        lambda: _delivered_at_least(scripted_receiver, expected_events),
        within_s=WAIT_CEILING_S,
        what="webhooks",
    )
    await asyncio.sleep(0.3)
    delivered = scripted_receiver.delivered()
    assert len(delivered) == expected_events and set(delivered.values()) == {1}

    # Same nearest-driver answers on every path (docs/API.md#seller-order-ready), before, during and after.
    if load.wrong_at:
        print(
            f"{len(load.wrong_driver)} non-nearest answers, from {min(load.wrong_at) - restarted:.2f} s "
            f"to {max(load.wrong_at) - restarted:.2f} s after Redis came back"
        )
    assert load.wrong_driver == [], "\n".join(load.wrong_driver)


async def _no_diff(pool: asyncpg.Pool, redis: Redis) -> bool:
    return await mirror_diff(pool, redis, TTL_S) == []


async def _delivered_at_least(receiver: WebhookReceiver, n: int) -> bool:
    return len(receiver.delivered()) >= n
