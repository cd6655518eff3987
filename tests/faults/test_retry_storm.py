"""Fault 8: a retry storm: 1,000 seller-order-ready requests for 100 orders, shuffled and concurrent."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from dispatcher.config import ResolvedSettings
from dispatcher.webhooks.signing import sign
from dispatcher.zoning import Zoning
from tests.faults.helpers import assert_booking_invariants
from tests.support import BERLIN, Api, WebhookReceiver, offset

pytestmark = pytest.mark.integration

ORDERS = 100
DUPLICATES = 10
CONCURRENCY = 100
# Fewer drivers than orders: 80 orders are assigned, 20 answered "nobody" (and may retry).
DRIVERS = 80
Point = tuple[float, float]


def points_in_zone(zoning: Zoning, n: int, seed: int) -> list[Point]:
    rng = random.Random(seed)
    zone = zoning.zone_of(*BERLIN)
    out: list[Point] = []
    while len(out) < n:
        p = offset(*BERLIN, rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5))
        if zoning.zone_of(*p) == zone:
            out.append(p)
    return out


async def test_retry_storm_books_each_order_once(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
    recovery: Callable[[str, float], None],
) -> None:
    api: Api = await start_api(make_settings(heartbeat_ttl_s=600))
    zoning = Zoning(api.settings.zone_resolution)
    spots = points_in_zone(zoning, DRIVERS, seed=8)
    await asyncio.gather(
        *(api.online_driver(*p, name=f"s{i}") for i, p in enumerate(spots))
    )
    pickups = {
        f"S-{n}": p for n, p in enumerate(points_in_zone(zoning, ORDERS, seed=9))
    }

    # Vendure redelivers an event under its original webhook-id, each time freshly signed.
    event_ids = {order_id: "evt_" + uuid.uuid4().hex for order_id in pickups}
    requests = [order_id for order_id in pickups for _ in range(DUPLICATES)]
    random.Random(10).shuffle(requests)
    gate = asyncio.Semaphore(CONCURRENCY)
    answers: dict[str, list[tuple[int, bytes, str | None]]] = {o: [] for o in pickups}

    async def send(order_id: str) -> None:
        lat, lon = pickups[order_id]
        raw = json.dumps(
            {"sellerOrderId": order_id, "pickupLat": lat, "pickupLon": lon}
        ).encode()
        ts = int(time.time())
        headers = {
            "webhook-id": event_ids[order_id],
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(
                api.settings.inbound_secret, event_ids[order_id], ts, raw
            ),
            "content-type": "application/json",
        }
        async with gate:
            resp = await api.client.post(
                "/events/seller-order-ready", data=raw, headers=headers
            )
            answers[order_id].append(
                (
                    resp.status,
                    await resp.read(),
                    resp.headers.get("Idempotent-Replayed"),
                )
            )

    started = time.monotonic()
    await asyncio.gather(*(send(o) for o in requests))
    storm_s = time.monotonic() - started
    print(
        f"{len(requests)} requests in {storm_s:.2f} s ({len(requests) / storm_s:.0f}/s)"
    )
    recovery("retry_storm_1000_requests_duration", storm_s)

    # Identical answers per order; one first answer, nine replays, for every assigned order.
    statuses = Counter(status for a in answers.values() for status, _, _ in a)
    assert statuses == Counter({200: ORDERS * DUPLICATES}), statuses
    assigned: dict[str, str] = {}
    for order_id, got in answers.items():
        bodies = {body for _, body, _ in got}
        assert len(bodies) == 1, (order_id, bodies)
        body = json.loads(bodies.pop())
        replayed = Counter(flag for _, _, flag in got)
        if body["assigned"]:
            assigned[order_id] = body["driverId"]
            assert replayed == Counter({"true": DUPLICATES - 1, None: 1}), (
                order_id,
                replayed,
            )
        else:
            assert replayed == Counter({None: DUPLICATES}), (order_id, replayed)
    assert len(assigned) == min(ORDERS, DRIVERS), len(assigned)
    assert len(set(assigned.values())) == len(assigned), "a driver was booked twice"

    # PostgreSQL: at most one delivery per order (exactly the answered ones), no double booking.
    rows = await pg_pool.fetch("SELECT seller_order_id, driver_id FROM deliveries")
    assert len(rows) <= ORDERS
    assert {r["seller_order_id"]: r["driver_id"] for r in rows} == assigned
    await assert_booking_invariants(pg_pool)

    # Exactly one webhook per assigned order.
    await receiver.wait_until(
        lambda: len(receiver.received) >= len(assigned), timeout=20
    )
    await asyncio.sleep(0.5)
    ids = Counter(d.webhook_id for d in receiver.received)
    per_order = Counter(d.body["data"]["sellerOrderId"] for d in receiver.received)
    assert len(ids) == len(assigned) and set(ids.values()) == {1}
    assert per_order == Counter(assigned.keys())
