"""Offer faults: the zone actor killed with 50 open offers; PostgreSQL stopped mid-cascade."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from dispatcher.config import ResolvedSettings
from dispatcher.offers.policy import OFFER_GRACE_S
from dispatcher.zoning import Zoning
from tests.faults.conftest import OwnServers
from tests.faults.test_zone_actor_killed import points_in_zone
from tests.integration.test_offers import answer, assert_offer_invariants, open_offers
from tests.support import BERLIN, Api, WebhookReceiver
from tests.support.faults import wait_until, zone_actor_pid

pytestmark = pytest.mark.integration

TTL_S = 600.0
OPEN_OFFERS = 50
ACCEPT_WHILE_DEAD = 10
# The zone actor is killed this many times, each time once its last incarnation is up.
KILLS = 3
DEADLINE_S = 16.0
# Long enough that the accepts made right after the kill are in time on a slow machine.
TIMEOUT_S = 12.0
# "Deadline + grace + one zone restart": the restart is Ray's (about a second here),
# plus the backstop's slack and period when no call reaches the zone first. A generous
# ceiling, not a budget: the measured figure is printed.
RESTART_CEILING_S = 20.0


async def test_zone_killed_with_50_open_offers_ends_every_dispatch_once(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
    recovery: Callable[[str, float], None],
) -> None:
    api: Api = await start_api(
        make_settings(
            heartbeat_ttl_s=TTL_S,
            offer_mode="cascade",
            offer_timeout_s=TIMEOUT_S,
            offer_max_rounds=2,
            dispatch_deadline_s=DEADLINE_S,
            offer_backstop_interval_s=1.0,
        )
    )
    zoning = Zoning(api.settings.zone_resolution)
    zone = zoning.zone_of(*BERLIN)
    spots = points_in_zone(zoning, zone, OPEN_OFFERS, seed=11)
    drivers = list(
        await asyncio.gather(
            *(api.online_driver(*p, name=f"o{i}") for i, p in enumerate(spots))
        )
    )
    pickups = points_in_zone(zoning, zone, OPEN_OFFERS, seed=12)
    for n, pickup in enumerate(pickups):
        body = await (await api.order(f"OK-{n}", *pickup)).json()
        assert body["dispatchStatus"] == "OFFERED", body
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM offers WHERE status = 'OPEN'")
        == OPEN_OFFERS
    )

    by_id = {d.driver_id: d for d in drivers}
    # The offers made last, which expire last: the kills and restarts before the last
    # batch of accepts take a while on a slow machine.
    held = await pg_pool.fetch(
        "SELECT offer_id, driver_id FROM offers WHERE status = 'OPEN' ORDER BY expires_at DESC LIMIT $1",
        ACCEPT_WHILE_DEAD,
    )
    per_kill = -(-len(held) // KILLS)
    killed_at = time.monotonic()
    for k in range(KILLS):
        epoch = await pg_pool.fetchval(
            "SELECT epoch FROM zones WHERE zone_id = $1", zone
        )
        pid = await asyncio.to_thread(zone_actor_pid, zone, api.settings.ray_namespace)
        os.kill(pid, signal.SIGKILL)
        last_kill_at = time.monotonic()
        # Accepts are the ingress's: they commit while the zone is dead (each answer
        # then waits for its wake-up call, which restarts the zone).
        batch = held[k * per_kill : (k + 1) * per_kill]
        answers = await asyncio.gather(
            *(
                answer(api, by_id[r["driver_id"]], r["offer_id"], "accept")
                for r in batch
            )
        )
        assert [a.status for a in answers] == [200] * len(batch)

        async def restarted(before: int = epoch) -> bool:
            now: int = await pg_pool.fetchval(
                "SELECT epoch FROM zones WHERE zone_id = $1", zone
            )
            return now > before

        # The next kill hits the new incarnation, with its rebuilt timers.
        await wait_until(restarted, within_s=60, what=f"zone restart {k + 1}")
    accepted = ACCEPT_WHILE_DEAD

    async def all_ended() -> bool:
        n: int = await pg_pool.fetchval(
            "SELECT count(*) FROM dispatches WHERE status IN ('PENDING', 'OFFERED')"
        )
        return n == 0

    await wait_until(
        all_ended,
        within_s=DEADLINE_S + OFFER_GRACE_S + RESTART_CEILING_S + 30,
        what="dispatches ended",
    )
    lateness = await pg_pool.fetchval(
        "SELECT max(extract(epoch FROM ended_at - deadline_at)) FROM dispatches WHERE status = 'UNASSIGNED'"
    )
    if lateness is not None:
        recovery("offer_dispatch_end_after_deadline_zone_killed", float(lateness))
        assert lateness <= OFFER_GRACE_S + RESTART_CEILING_S
    ended_at = time.monotonic()
    epoch = await pg_pool.fetchval("SELECT epoch FROM zones WHERE zone_id = $1", zone)
    assert epoch >= 1 + KILLS, "each kill was followed by a restart with a new epoch"
    recovery("offer_zone_first_kill_to_all_dispatches_ended", ended_at - killed_at)
    recovery("offer_zone_last_kill_to_all_dispatches_ended", ended_at - last_kill_at)

    statuses = Counter(
        r["status"] for r in await pg_pool.fetch("SELECT status FROM dispatches")
    )
    assert statuses["ASSIGNED"] >= accepted and sum(statuses.values()) == OPEN_OFFERS
    assigned_orders = {
        r["seller_order_id"]
        for r in await pg_pool.fetch("SELECT seller_order_id FROM deliveries")
    }
    assert len(assigned_orders) == statuses["ASSIGNED"]
    await assert_offer_invariants(pg_pool)
    dup = await pg_pool.fetch(
        """SELECT seller_order_id, event_type, count(*) FROM webhook_outbox
           GROUP BY seller_order_id, event_type HAVING count(*) > 1"""
    )
    assert dup == [], "an order got a webhook twice"
    # At least once: a retried webhook arrives again with its webhook-id; count events.
    await receiver.wait_until(
        lambda: len({d.webhook_id for d in receiver.received}) == OPEN_OFFERS,
        timeout=30,
    )
    kinds = Counter(
        d.body["type"] for d in {d.webhook_id: d for d in receiver.received}.values()
    )
    assert kinds["delivery.assigned"] == statuses["ASSIGNED"]
    assert kinds["delivery.unassigned"] == statuses["UNASSIGNED"]
    events = Counter(
        (d.body["type"], d.body["data"]["sellerOrderId"])
        for d in {d.webhook_id: d for d in receiver.received}.values()
    )
    duplicates = sum(n - 1 for n in events.values())
    assert duplicates == 0
    print(
        f"\nzone killed {KILLS} times with {OPEN_OFFERS} open offers: {dict(statuses)}, "
        f"latest give-up {lateness} s past its deadline, duplicates {duplicates}"
    )


async def test_postgres_stopped_and_restarted_mid_cascade(
    start_api: Callable[[ResolvedSettings], Any],
    fault_settings: Callable[..., ResolvedSettings],
    fault_stack: OwnServers,
    own_pool: asyncpg.Pool,
    scripted_receiver: WebhookReceiver,
    zone_actors_cleanup: None,
    recovery: Callable[[str, float], None],
) -> None:
    """The first offer's timer comes due while PostgreSQL is down: the zone keeps
    trying, and once PostgreSQL is back the cascade moves on and books exactly once."""
    api: Api = await start_api(
        fault_settings(
            heartbeat_ttl_s=TTL_S,
            offer_mode="cascade",
            offer_timeout_s=1.0,
            dispatch_deadline_s=60.0,
        )
    )
    first = await api.online_driver(*BERLIN, name="first")
    second = await api.online_driver(BERLIN[0] + 0.002, BERLIN[1], name="second")
    body = await (await api.order("PG-1", *BERLIN)).json()
    assert body["dispatchStatus"] == "OFFERED"
    assert len(await open_offers(api, first)) == 1

    await asyncio.to_thread(fault_stack.pg.stop, "fast")
    stopped_at = time.monotonic()
    await asyncio.sleep(OFFER_GRACE_S + 2.0)  # the offer's timer fires into the outage
    await asyncio.to_thread(fault_stack.pg.start)

    async def second_offered() -> bool:
        try:
            return len(await open_offers(api, second)) == 1
        except AssertionError:
            return False  # a 503 while the pools reconnect

    took = await wait_until(
        second_offered, within_s=60, interval_s=0.2, what="the next offer"
    )
    recovery(
        "offer_cascade_moves_on_after_postgres_back",
        time.monotonic() - stopped_at - OFFER_GRACE_S - 2.0,
    )
    del took
    (offer,) = await open_offers(api, second)
    resp = await answer(api, second, offer["offerId"], "accept")
    assert resp.status == 200, await resp.text()
    rows = await own_pool.fetch("SELECT status FROM offers ORDER BY created_at")
    assert [r["status"] for r in rows] == ["EXPIRED", "ACCEPTED"]
    await assert_offer_invariants(own_pool)
    await wait_until(
        lambda: _count(scripted_receiver, "delivery.assigned", 1),
        within_s=30,
        what="delivery.assigned",
    )
    await asyncio.sleep(0.5)
    assert await _count(scripted_receiver, "delivery.assigned", 1)


async def _count(receiver: WebhookReceiver, event_type: str, n: int) -> bool:
    found: int = sum(body["type"] == event_type for body in receiver.bodies().values())
    return found == n
