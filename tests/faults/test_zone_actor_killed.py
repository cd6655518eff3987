"""Fault 3: the zone actor is killed (ray.kill, SIGKILL of its process) while orders flow."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import ray
from redis.asyncio import Redis

from dispatcher.config import ResolvedSettings
from dispatcher.zoning import Zoning
from tests.faults.helpers import (
    assert_booking_invariants,
    mirror_diff,
    read_answer,
    wait_until,
    zone_actor_handle,
    zone_actor_pid,
)
from tests.support import BERLIN, Api, WebhookReceiver, offset

pytestmark = pytest.mark.integration

DRIVERS = 44
ORDERS = 40
KILL_AFTER_ORDERS = 12
TTL_S = 600.0
Point = tuple[float, float]


@dataclass(frozen=True)
class Try:
    order_id: str
    sent: float
    done: float
    status: int
    body: bytes
    retry_after: str | None
    replayed: str | None


def points_in_zone(zoning: Zoning, zone: str, n: int, seed: int) -> list[Point]:
    rng = random.Random(seed)
    out: list[Point] = []
    while len(out) < n:
        p = offset(*BERLIN, rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5))
        if zoning.zone_of(*p) == zone:
            out.append(p)
    return out


async def vendure(
    api: Api, order_id: str, pickup: Point, tries: list[Try], kill_now: asyncio.Event
) -> None:
    """Vendure's side: retry a retryable answer after Retry-After, then retry once more."""
    deadline = time.monotonic() + 40
    successes = 0
    while successes < 2:
        sent = time.monotonic()
        status, body, headers = await read_answer(await api.order(order_id, *pickup))
        tries.append(
            Try(
                order_id,
                sent,
                time.monotonic(),
                status,
                body,
                headers.get("Retry-After"),
                headers.get("Idempotent-Replayed"),
            )
        )
        if len(tries) >= KILL_AFTER_ORDERS:
            kill_now.set()
        if status == 200:
            successes += 1
            continue
        assert status == 503 and headers.get("Retry-After"), (order_id, status, body)
        assert time.monotonic() < deadline, f"{order_id} never succeeded"
        await asyncio.sleep(float(headers["Retry-After"]))


async def first_ping_ok(api: Api, probe: Any, at: Point, since: float) -> float:
    """Seconds from `since` until a ping (an actor call) sent after it succeeds."""
    while True:
        resp = await api.ping(probe, *at)
        await resp.read()
        if resp.status == 204:
            return time.monotonic() - since
        assert resp.status == 503, resp.status
        assert time.monotonic() - since < 30
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["ray_kill", "sigkill"])
async def test_zone_actor_killed_mid_assignment(
    how: str,
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
    receiver: WebhookReceiver,
    recovery: Callable[[str, float], None],
) -> None:
    api: Api = await start_api(make_settings(heartbeat_ttl_s=TTL_S))
    zoning = Zoning(api.settings.zone_resolution)
    zone = zoning.zone_of(*BERLIN)
    spots = points_in_zone(zoning, zone, DRIVERS, seed=3)
    drivers = list(
        await asyncio.gather(
            *(api.online_driver(*p, name=f"k{i}") for i, p in enumerate(spots))
        )
    )
    pickups = points_in_zone(zoning, zone, ORDERS, seed=4)
    epoch_before = await pg_pool.fetchval(
        "SELECT epoch FROM zones WHERE zone_id = $1", zone
    )
    namespace = api.settings.ray_namespace

    tries: list[Try] = []
    kill_now = asyncio.Event()
    # Every order at once: the actor works through a queue, so the kill lands while
    # some are mid-assignment and more wait behind them.
    orders = [
        asyncio.create_task(vendure(api, f"K-{n}", pickup, tries, kill_now))
        for n, pickup in enumerate(pickups)
    ]
    await kill_now.wait()
    if how == "ray_kill":
        handle = await asyncio.to_thread(zone_actor_handle, zone, namespace)
        killed_at = time.monotonic()
        await asyncio.to_thread(ray.kill, handle, no_restart=False)
    else:
        pid = await asyncio.to_thread(zone_actor_pid, zone, namespace)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
    probe = asyncio.create_task(first_ping_ok(api, drivers[0], spots[0], killed_at))
    await asyncio.gather(*orders)
    ping_recovery = await probe

    # Answers: 200, or 503 + Retry-After (retryable); never anything else.
    statuses = Counter(t.status for t in tries)
    in_flight = sum(1 for t in tries if t.sent <= killed_at <= t.done)
    first_order_ok = (
        min(t.done for t in tries if t.sent >= killed_at and t.status == 200)
        - killed_at
    )
    print(
        f"{how}: answers {dict(statuses)}, {in_flight} requests in flight at the kill"
    )
    recovery(f"zone_actor_{how}_to_first_ping_ok", ping_recovery)
    recovery(f"zone_actor_{how}_to_first_order_ok", first_order_ok)
    assert set(statuses) <= {200, 503}, statuses
    assert in_flight >= 1, "the kill should hit requests in flight"

    # Per order: the first 200 and its replay are byte-identical; the replay says so.
    by_order: dict[str, list[Try]] = {}
    for t in tries:
        by_order.setdefault(t.order_id, []).append(t)
    assigned: dict[str, str] = {}
    for order_id, attempts in by_order.items():
        ok = [t for t in attempts if t.status == 200]
        assert len(ok) == 2 and ok[0].body == ok[1].body, order_id
        assert ok[1].replayed == "true", order_id
        body = json.loads(ok[0].body)
        assert body["assigned"], body
        assigned[order_id] = body["driverId"]
    assert len(set(assigned.values())) == ORDERS, "a driver was assigned twice"
    # A first 200 that is already a replay: booked by the killed incarnation, answer lost.
    lost = sorted(
        o
        for o, a in by_order.items()
        if next(t for t in a if t.status == 200).replayed == "true"
    )
    print(
        f"{how}: {len(lost)} bookings committed before the kill whose answer was lost, replayed later: {lost}"
    )

    # PostgreSQL: one delivery per order, the answered driver, no double booking.
    rows = await pg_pool.fetch("SELECT seller_order_id, driver_id FROM deliveries")
    assert {r["seller_order_id"]: r["driver_id"] for r in rows} == assigned
    await assert_booking_invariants(pg_pool)
    epoch_after = await pg_pool.fetchval(
        "SELECT epoch FROM zones WHERE zone_id = $1", zone
    )
    assert epoch_after > epoch_before, "the new incarnation took a new epoch"

    # Webhooks: exactly one delivery.assigned per order, no duplicate.
    await receiver.wait_until(lambda: len(receiver.received) >= ORDERS, timeout=15)
    await asyncio.sleep(0.5)
    ids = Counter(d.webhook_id for d in receiver.received)
    per_order = Counter(d.body["data"]["sellerOrderId"] for d in receiver.received)
    assert len(ids) == ORDERS and set(ids.values()) == {1}, ids
    assert per_order == Counter(assigned.keys()), per_order

    # The restarted actor rebuilt its shard and mirror from PostgreSQL.
    async def mirror_ok() -> bool:
        return await mirror_diff(pg_pool, redis_client, TTL_S) == []

    await wait_until(
        mirror_ok, within_s=10, what="mirror rebuilt by the new incarnation"
    )
