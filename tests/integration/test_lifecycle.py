"""Delivery lifecycle: drivers freed and reassigned, webhook sequences, and the mirror invariant."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import h3
import pytest
from redis.asyncio import Redis

from dispatcher.config import ResolvedSettings
from dispatcher.store import keys
from dispatcher.zoning import Zoning
from tests.support import BERLIN, Api, Driver, WebhookReceiver, geo_members, offset

pytestmark = pytest.mark.integration

Point = tuple[float, float]


def as_text(values: Any) -> set[str]:
    """Members of a bytes-mode Redis reply as strings."""
    return {v.decode() if isinstance(v, bytes) else str(v) for v in values}


async def driver_status(pg_pool: asyncpg.Pool, driver: Driver) -> str:
    status: str = await pg_pool.fetchval(
        "SELECT status FROM drivers WHERE id = $1", driver.driver_id
    )
    return status


async def assign(api: Api, seller_order_id: str, pickup: Point) -> dict[str, Any]:
    resp = await api.order(seller_order_id, *pickup)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def finish(api: Api, driver: Driver, seller_order_id: str, how: str) -> str:
    """End a delivery the way `how` says; returns the webhook type it must send."""
    if how == "delivered":
        assert (await api.step(driver, seller_order_id, "picked-up")).status == 200
        resp = await api.step(driver, seller_order_id, "delivered")
    elif how == "failed":
        resp = await api.step(
            driver, seller_order_id, "failed", {"reason": "customer not at home"}
        )
    else:
        resp = await api.cancel(seller_order_id)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["status"] == how.upper()
    return f"delivery.{how}"


@pytest.mark.parametrize("how", ["delivered", "failed", "cancelled"])
async def test_freed_driver_is_available_and_assigned_again_after_its_next_ping(
    api: Api,
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
    receiver: WebhookReceiver,
    how: str,
) -> None:
    at = offset(*BERLIN, 0.3, 0.2)
    zone = Zoning(api.settings.zone_resolution).zone_of(*at)
    driver = await api.online_driver(*at)
    first = await assign(api, "SO-first", BERLIN)
    assert first["assigned"] is True and first["driverId"] == driver.driver_id
    assert await driver_status(pg_pool, driver) == "BUSY"
    assert driver.driver_id not in await geo_members(redis_client, zone)
    # Busy: a second order finds nobody, even though the driver keeps pinging.
    assert (await api.ping(driver, *offset(*at, 0.05, 0.0))).status == 204
    assert (await assign(api, "SO-waiting", BERLIN))["assigned"] is False
    assert (await api.set_status(driver, "AVAILABLE")).status == 409
    assert driver.driver_id not in await geo_members(redis_client, zone)

    event_type = await finish(api, driver, "SO-first", how)
    # Repeating the final step (a retried request) is a silent no-op.
    repeat = await (
        api.cancel("SO-first")
        if how == "cancelled"
        else api.step(
            driver,
            "SO-first",
            how,
            {"reason": "customer not at home"} if how == "failed" else None,
        )
    )
    assert repeat.status == 200, await repeat.text()

    # Freed at once by the step itself; the app never sent AVAILABLE.
    assert await driver_status(pg_pool, driver) == "AVAILABLE"
    row = await pg_pool.fetchrow(
        "SELECT status FROM deliveries WHERE seller_order_id = 'SO-first'"
    )
    assert row is not None and row["status"] == how.upper()
    view = await (
        await api.client.get(f"/drivers/{driver.driver_id}", headers=driver.auth)
    ).json()
    assert (view["status"], view["activeDelivery"]) == ("AVAILABLE", None)
    # Its heartbeat is fresh, so it is back in the mirror.
    assert driver.driver_id in await geo_members(redis_client, zone)

    assert (await api.ping(driver, *offset(*at, 0.1, 0.0))).status == 204
    second = await assign(api, "SO-waiting", BERLIN)
    assert second["assigned"] is True and second["driverId"] == driver.driver_id
    assert await driver_status(pg_pool, driver) == "BUSY"
    assert (
        await pg_pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE driver_id = $1 AND status IN ('ASSIGNED', 'PICKED_UP')",
            driver.driver_id,
        )
        == 1
    )

    expected = (
        ["delivery.assigned"]
        + (["delivery.picked_up"] if how == "delivered" else [])
        + [event_type]
    )
    await receiver.wait_until(lambda: len(receiver.received) >= len(expected) + 1)
    await asyncio.sleep(0.3)
    assert [h.body["type"] for h in receiver.for_order("SO-first")] == expected
    assert [h.body["type"] for h in receiver.for_order("SO-waiting")] == [
        "delivery.assigned"
    ]


async def test_webhook_sequences_count_up_per_order_independently(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    a_driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.0), name="a")
    a = await assign(api, "SO-A", offset(*BERLIN, 0.2, 0.0))
    b_driver = await api.online_driver(*offset(*BERLIN, -0.2, 0.0), name="b")
    b = await assign(api, "SO-B", offset(*BERLIN, -0.2, 0.0))
    assert (a["driverId"], b["driverId"]) == (a_driver.driver_id, b_driver.driver_id)

    # Interleaved steps, with repeats that must be silent no-ops.
    for driver, order, step in (
        (b_driver, "SO-B", "picked-up"),
        (a_driver, "SO-A", "picked-up"),
        (a_driver, "SO-A", "picked-up"),
        (b_driver, "SO-B", "delivered"),
        (b_driver, "SO-B", "delivered"),
        (a_driver, "SO-A", "delivered"),
    ):
        resp = await api.step(driver, order, step)
        assert resp.status == 200, await resp.text()
    # Illegal steps are refused and send nothing either.
    assert (await api.step(a_driver, "SO-A", "picked-up")).status == 409
    assert (await api.cancel("SO-B")).status in (200, 409)
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM deliveries WHERE seller_order_id = 'SO-B'"
        )
        == "DELIVERED"
    )

    await receiver.wait_until(lambda: len(receiver.received) >= 6)
    await asyncio.sleep(0.5)
    for order, body in (("SO-A", a), ("SO-B", b)):
        hooks = receiver.for_order(order)
        assert [h.body["type"] for h in hooks] == [
            "delivery.assigned",
            "delivery.picked_up",
            "delivery.delivered",
        ]
        assert [h.body["data"]["sequence"] for h in hooks] == [1, 2, 3]
        assert len({h.webhook_id for h in hooks}) == 3
        assert {h.body["data"]["assignmentId"] for h in hooks} == {body["assignmentId"]}
        assert {h.body["data"]["driverId"] for h in hooks} == {body["driverId"]}
        history = await pg_pool.fetch(
            "SELECT status FROM delivery_history WHERE seller_order_id = $1 ORDER BY id",
            order,
        )
        assert [h["status"] for h in history] == ["ASSIGNED", "PICKED_UP", "DELIVERED"]
    assert Counter(h.body["type"] for h in receiver.received) == {
        "delivery.assigned": 2,
        "delivery.picked_up": 2,
        "delivery.delivered": 2,
    }
    assert await pg_pool.fetchval("SELECT count(*) FROM webhook_outbox") == 6


def across_border(zoning: Zoning, a: str, b: str) -> tuple[Point, Point]:
    """Two points about 0.1 km apart, the first in zone `a`, the second in zone `b`."""
    (alat, alon), (blat, blon) = h3.directed_edge_to_boundary(
        h3.cells_to_directed_edge(a, b)
    )
    mid = ((float(alat) + float(blat)) / 2, (float(alon) + float(blon)) / 2)
    ca, cb = zoning.centre_of(a), zoning.centre_of(b)

    # Step 50 m from the border midpoint towards each centre.
    def toward(centre: Point) -> Point:
        dn, de = centre[0] - mid[0], centre[1] - mid[1]
        scale = 0.05 / max(1e-9, (dn**2 + de**2) ** 0.5 * 111.195)
        return mid[0] + dn * scale, mid[1] + de * scale

    pa, pb = toward(ca), toward(cb)
    assert (zoning.zone_of(*pa), zoning.zone_of(*pb)) == (a, b)
    return pa, pb


async def dispatchable_by_zone(
    pg_pool: asyncpg.Pool, ttl_s: float
) -> dict[str, set[str]]:
    rows = await pg_pool.fetch(
        """SELECT zone_id, id FROM drivers
           WHERE status = 'AVAILABLE' AND is_active AND lat IS NOT NULL AND lon IS NOT NULL
             AND last_seen_at > now() - make_interval(secs => $1)""",
        ttl_s,
    )
    found: dict[str, set[str]] = {}
    for r in rows:
        found.setdefault(r["zone_id"], set()).add(r["id"])
    return found


async def ping_all(api: Api, drivers: Sequence[tuple[Driver, Point]]) -> None:
    for driver, at in drivers:
        resp = await api.ping(driver, *at)
        assert resp.status == 204, await resp.text()


async def test_mirror_equals_dispatchable_drivers_after_a_mixed_workload(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
    receiver: WebhookReceiver,
) -> None:
    ttl, sweep = 4.0, 0.5
    # No periodic rebuild during the test: the mirror must be right through its
    # incremental writes and the heartbeat sweep alone.
    api: Api = await start_api(
        make_settings(
            heartbeat_ttl_s=ttl, sweep_interval_s=sweep, reconcile_interval_s=600
        )
    )
    zoning = Zoning(api.settings.zone_resolution)
    home = zoning.zone_of(*BERLIN)
    ring = [str(c) for c in h3.grid_disk(home, 1) if c != home]
    west = min(ring, key=lambda c: zoning.centre_of(c)[1])
    north = max(ring, key=lambda c: zoning.centre_of(c)[0])
    assert len({home, west, north}) == 3
    h_at = [offset(*zoning.centre_of(home), 0.3 * n, 0.2) for n in range(4)]
    w_at = [offset(*zoning.centre_of(west), 0.3 * n, -0.2) for n in range(3)]
    border_home, border_west = across_border(zoning, home, west)

    fresh: list[tuple[Driver, Point]] = []
    idle = [await api.online_driver(*p, name="idle") for p in h_at[:2]]
    fresh += list(zip(idle, h_at[:2], strict=True))
    west_idle = await api.online_driver(*w_at[0], name="west idle")
    fresh.append((west_idle, w_at[0]))
    north_idle = await api.online_driver(*zoning.centre_of(north), name="north idle")
    fresh.append((north_idle, zoning.centre_of(north)))
    # Moves from home to west while AVAILABLE.
    mover = await api.online_driver(*border_home, name="mover")
    await asyncio.sleep(0.1)
    assert (await api.ping(mover, *border_west)).status == 204
    fresh.append((mover, border_west))
    # Goes OFFLINE, keeps pinging.
    offline = await api.online_driver(*h_at[2], name="offline")
    assert (await api.set_status(offline, "OFFLINE")).status == 200
    fresh.append((offline, h_at[2]))
    # Registered and pinging but never AVAILABLE.
    never = await api.create_driver("never available")
    assert (await api.ping(never, *h_at[3])).status == 204
    fresh.append((never, h_at[3]))
    # AVAILABLE without any location.
    nowhere = await api.create_driver("no location")
    assert (await api.set_status(nowhere, "AVAILABLE")).status == 200
    # Deactivated by an operator; its pings are refused.
    banned = await api.online_driver(*w_at[1], name="banned")
    resp = await api.client.patch(
        f"/drivers/{banned.driver_id}", json={"isActive": False}, headers=api.admin
    )
    assert resp.status == 200, await resp.text()
    assert (await api.ping(banned, *w_at[1])).status == 403
    # Deactivated, then reactivated.
    back = await api.online_driver(*w_at[2], name="reactivated")
    for active in (False, True):
        resp = await api.client.patch(
            f"/drivers/{back.driver_id}", json={"isActive": active}, headers=api.admin
        )
        assert resp.status == 200, await resp.text()
    fresh.append((back, w_at[2]))
    # Goes silent.
    silent = await api.online_driver(
        *offset(*zoning.centre_of(north), 0.5, 0.5), name="silent"
    )

    # Orders: a cross-zone assignment that stays busy, then delivered, failed, cancelled.
    busy_at = offset(*border_west, 0.0, -0.3)
    busy = await api.online_driver(*busy_at, name="busy")
    fresh.append((busy, busy_at))
    taken = await assign(api, "SO-x", offset(*border_home, 0.0, 0.05))
    assert taken["assigned"] is True and taken["driverId"] in {
        mover.driver_id,
        busy.driver_id,
    }
    taken_by = mover if taken["driverId"] == mover.driver_id else busy
    assert zoning.zone_of(*offset(*border_home, 0.0, 0.05)) == home
    assert (
        await pg_pool.fetchval(
            "SELECT zone_id FROM drivers WHERE id = $1", taken_by.driver_id
        )
        == west
    )
    finishers: list[tuple[Driver, Point]] = []
    for n, how in enumerate(("delivered", "failed", "cancelled")):
        at = offset(*zoning.centre_of(north), -1.0 - n, 0.0)
        d = await api.online_driver(*at, name=how)
        got = await assign(api, f"SO-{how}", at)
        assert got["driverId"] == d.driver_id
        await finish(api, d, f"SO-{how}", how)
        finishers.append((d, at))
    fresh += finishers
    # Busy and silent for longer than the TTL, then delivers: AVAILABLE but stale.
    stale_at = offset(*zoning.centre_of(west), -1.5, 0.0)
    stale_free = await api.online_driver(*stale_at, name="stale when freed")
    got = await assign(api, "SO-stale", stale_at)
    assert got["driverId"] == stale_free.driver_id

    # Keep the fresh ones pinging while the silent ones expire.
    deadline = time.monotonic() + ttl + sweep + 0.5
    while time.monotonic() < deadline:
        await ping_all(api, fresh)
        await asyncio.sleep(0.8)
    await finish(api, stale_free, "SO-stale", "delivered")
    await ping_all(api, fresh)
    await asyncio.sleep(sweep + 0.5)

    # Invariant 3, zone by zone, read twice around the mirror so nothing moved meanwhile.
    zones = [r["zone_id"] for r in await pg_pool.fetch("SELECT zone_id FROM zones")]
    assert {home, west, north} <= set(zones)
    before = await dispatchable_by_zone(pg_pool, ttl)
    mirror = {z: await geo_members(redis_client, z) for z in zones}
    seen = {
        z: as_text(await redis_client.zrange(keys.zone_seen(z), 0, -1)) for z in zones
    }
    after = await dispatchable_by_zone(pg_pool, ttl)
    assert before == after
    for zone in zones:
        assert mirror[zone] == before.get(zone, set()), f"zone {zone}"
        assert seen[zone] == mirror[zone], f"zone {zone} heartbeat set"

    expected_in = {
        d.driver_id
        for d in (*idle, west_idle, north_idle, back, *(f for f, _ in finishers))
    }
    expected_in.add(busy.driver_id if taken_by is mover else mover.driver_id)
    assert set().union(*mirror.values()) == expected_in
    assert mover.driver_id not in mirror[home]
    for gone in (offline, never, nowhere, banned, silent, stale_free, taken_by):
        assert all(gone.driver_id not in m for m in mirror.values()), gone
    await receiver.wait_until(lambda: len(receiver.of_type("delivery.assigned")) == 5)
