"""Offers over HTTP: cascade and wave, accept, decline, expiry, cancel, force-assign, redispatch."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse

from dispatcher.config import ResolvedSettings
from tests.support import BERLIN, Api, Driver, WebhookReceiver, offset
from tests.support.streams import Watcher

pytestmark = pytest.mark.integration

StartApi = Callable[[ResolvedSettings], Awaitable[Api]]


async def offer_api(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    **overrides: Any,
) -> Api:
    return await start_api(make_settings(**overrides))


async def drivers_at(api: Api, *km_north: float) -> list[Driver]:
    return [
        await api.online_driver(*offset(*BERLIN, km, 0.0), name=f"d{km}")
        for km in km_north
    ]


async def open_offers(api: Api, driver: Driver) -> list[dict[str, Any]]:
    resp = await api.client.get(
        f"/drivers/{driver.driver_id}/offers",
        params={"status": "OPEN"},
        headers=driver.auth,
    )
    assert resp.status == 200, await resp.text()
    offers: list[dict[str, Any]] = (await resp.json())["offers"]
    return offers


async def answer(api: Api, driver: Driver, offer_id: str, verb: str) -> ClientResponse:
    resp: ClientResponse = await api.client.post(
        f"/drivers/{driver.driver_id}/offers/{offer_id}/{verb}",
        json={},
        headers=driver.auth,
    )
    return resp


async def refusal(resp: ClientResponse) -> str:
    text = await resp.text()
    assert resp.status == 409, text
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    reason: str = json.loads(text)["reason"]
    return reason


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:  # noqa: ASYNC109 - a deadline
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def assert_offer_invariants(pg_pool: asyncpg.Pool) -> None:
    """Invariants 9 and 10 as PostgreSQL holds them, plus the driver-row mirror of offers."""
    rows = await pg_pool.fetch(
        "SELECT driver_id, count(*) AS n FROM offers WHERE status = 'OPEN' GROUP BY driver_id HAVING count(*) > 1"
    )
    assert rows == []
    rows = await pg_pool.fetch(
        """SELECT d.id FROM drivers d LEFT JOIN offers o ON o.driver_id = d.id AND o.status = 'OPEN'
           WHERE d.open_offer_id IS DISTINCT FROM o.offer_id"""
    )
    assert rows == [], "drivers.open_offer_id disagrees with the open offers"
    rows = await pg_pool.fetch(
        """SELECT o.driver_id FROM offers o JOIN deliveries d ON d.driver_id = o.driver_id
           WHERE o.status = 'OPEN' AND d.status IN ('ASSIGNED', 'PICKED_UP')"""
    )
    assert rows == [], "a driver holds an open offer and an active delivery"
    rows = await pg_pool.fetch(
        "SELECT seller_order_id FROM offers WHERE status = 'ACCEPTED' GROUP BY seller_order_id HAVING count(*) > 1"
    )
    assert rows == []


async def test_cascade_offers_the_nearest_then_the_next_on_decline_and_books_on_accept(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api = await offer_api(start_api, make_settings, offer_mode="cascade")
    near, far = await drivers_at(api, 0.1, 0.4)

    resp = await api.order("SO-c1", *BERLIN)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["assigned"] is False and body["reason"] == "AWAITING_ACCEPTANCE"
    assert body["dispatchStatus"] == "OFFERED" and body["expiresAt"].endswith("Z")
    assert "Idempotent-Replayed" not in resp.headers
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 0

    offers = await open_offers(api, near)
    assert [o["sellerOrderId"] for o in offers] == ["SO-c1"]
    assert await open_offers(api, far) == []
    # A retry while the offer is out answers the current state, and offers nobody new.
    again = await (await api.order("SO-c1", *BERLIN)).json()
    assert again["reason"] == "AWAITING_ACCEPTANCE"
    assert await pg_pool.fetchval("SELECT count(*) FROM offers") == 1

    resp = await answer(api, near, offers[0]["offerId"], "decline")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "DECLINED"
    # The next nearest is offered at once (the decline woke the zone).
    far_offers = await open_offers(api, far)
    assert [o["sellerOrderId"] for o in far_offers] == ["SO-c1"]
    assert (
        await refusal(await answer(api, near, offers[0]["offerId"], "accept"))
        == "OFFER_DECLINED"
    )

    resp = await answer(api, far, far_offers[0]["offerId"], "accept")
    assert resp.status == 200, await resp.text()
    delivery = await resp.json()
    assert delivery["driverId"] == far.driver_id and delivery["status"] == "ASSIGNED"
    # Repeating the accept answers the same, and books nothing new.
    again_resp = await answer(api, far, far_offers[0]["offerId"], "accept")
    assert (await again_resp.json())["assignmentId"] == delivery["assignmentId"]

    await receiver.wait_until(lambda: len(receiver.of_type("delivery.assigned")) == 1)
    hook = receiver.of_type("delivery.assigned")[0].body["data"]
    assert hook["driverId"] == far.driver_id and hook["sequence"] == 1
    replay = await api.order("SO-c1", *BERLIN)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    replayed = await replay.json()
    assert (
        replayed["assigned"] is True
        and replayed["assignmentId"] == delivery["assignmentId"]
    )
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", far.driver_id
        )
        == "BUSY"
    )
    status = await api.client.get("/dispatches/SO-c1", headers=api.admin)
    view = await status.json()
    assert view["status"] == "ASSIGNED" and view["driverId"] == far.driver_id
    assert [o["status"] for o in view["offers"]] == ["DECLINED", "ACCEPTED"]
    await assert_offer_invariants(pg_pool)
    await asyncio.sleep(0.3)
    assert len(receiver.of_type("delivery.assigned")) == 1


async def test_wave_offers_k_at_once_first_accept_wins_the_others_are_superseded(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api = await offer_api(
        start_api, make_settings, offer_mode="wave", offer_wave_size=3
    )
    drivers = await drivers_at(api, 0.1, 0.2, 0.3, 0.4)
    body = await (await api.order("SO-w1", *BERLIN)).json()
    assert body["dispatchStatus"] == "OFFERED"
    offered = {d.driver_id: await open_offers(api, d) for d in drivers}
    assert [len(v) for v in offered.values()] == [1, 1, 1, 0]

    results = await asyncio.gather(
        *(
            answer(api, d, offered[d.driver_id][0]["offerId"], "accept")
            for d in drivers[:3]
        )
    )
    statuses = sorted(r.status for r in results)
    assert statuses == [200, 409, 409]
    for resp in results:
        if resp.status == 409:
            assert await refusal(resp) == "OFFER_SUPERSEDED"
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 1
    await receiver.wait_until(lambda: len(receiver.of_type("delivery.assigned")) == 1)
    await assert_offer_invariants(pg_pool)


async def test_unanswered_offers_expire_by_the_database_clock_then_the_dispatch_gives_up(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api = await offer_api(
        start_api,
        make_settings,
        offer_mode="cascade",
        offer_timeout_s=0.5,
        offer_max_rounds=2,
        dispatch_deadline_s=30,
    )
    first, second = await drivers_at(api, 0.1, 0.2)
    await api.order("SO-t1", *BERLIN)
    offer = (await open_offers(api, first))[0]

    async def second_offered() -> bool:
        return len(await open_offers(api, second)) == 1

    await wait_for(second_offered)
    assert (
        await refusal(await answer(api, first, offer["offerId"], "accept"))
        == "OFFER_EXPIRED"
    )
    await receiver.wait_until(
        lambda: len(receiver.of_type("delivery.unassigned")) == 1, timeout=20
    )
    hook = receiver.of_type("delivery.unassigned")[0].body["data"]
    assert hook == {
        "sellerOrderId": "SO-t1",
        "reason": "NO_DRIVER_ACCEPTED",
        "sequence": 1,
    }
    rows = await pg_pool.fetch(
        "SELECT status, answered_at > accept_by AS after FROM offers"
    )
    assert [(r["status"], r["after"]) for r in rows] == [
        ("EXPIRED", True),
        ("EXPIRED", True),
    ]
    assert (
        await pg_pool.fetchval(
            "SELECT missed_offers FROM drivers WHERE id = $1", first.driver_id
        )
        == 1
    )
    # Both drivers are dispatchable again: a retry starts a new attempt and offers again.
    body = await (await api.order("SO-t1", *BERLIN)).json()
    assert body["reason"] == "AWAITING_ACCEPTANCE"
    assert await pg_pool.fetchval("SELECT attempt FROM dispatches") == 2
    await assert_offer_invariants(pg_pool)


async def test_auto_accept_driver_is_booked_at_once_in_an_offer_mode(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    api = await offer_api(start_api, make_settings, offer_mode="cascade")
    (driver,) = await drivers_at(api, 0.1)
    resp = await api.client.patch(
        f"/drivers/{driver.driver_id}", json={"autoAccept": True}, headers=api.admin
    )
    assert resp.status == 200, await resp.text()
    body = await (await api.order("SO-a1", *BERLIN)).json()
    assert body["assigned"] is True and body["driverId"] == driver.driver_id
    assert await pg_pool.fetchval("SELECT count(*) FROM offers") == 0
    assert await pg_pool.fetchval("SELECT status FROM dispatches") == "ASSIGNED"


async def test_cancel_withdraws_open_offers_and_an_accept_then_gets_order_cancelled(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api = await offer_api(
        start_api, make_settings, offer_mode="wave", offer_wave_size=2
    )
    a, b = await drivers_at(api, 0.1, 0.2)
    await api.order("SO-x1", *BERLIN)
    offer = (await open_offers(api, a))[0]
    resp = await api.cancel("SO-x1")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "CANCELLED"
    assert (
        await refusal(await answer(api, a, offer["offerId"], "accept"))
        == "ORDER_CANCELLED"
    )
    assert await open_offers(api, b) == []
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 0
    await assert_offer_invariants(pg_pool)


async def test_operator_force_assigns_and_redispatches(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api = await offer_api(start_api, make_settings, offer_mode="cascade")
    near, far = await drivers_at(api, 0.1, 0.3)
    await api.order("SO-f1", *BERLIN)
    offer = (await open_offers(api, near))[0]
    resp = await api.client.post("/dispatches/SO-f1/redispatch", headers=api.admin)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["attempt"] == 2
    assert (
        await refusal(await answer(api, near, offer["offerId"], "accept"))
        == "OFFER_WITHDRAWN"
    )

    resp = await api.client.post(
        "/dispatches/SO-f1/assign", json={"driverId": far.driver_id}, headers=api.admin
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["driverId"] == far.driver_id
    assert await open_offers(api, near) == []
    again = await api.client.post(
        "/dispatches/SO-f1/assign", json={"driverId": near.driver_id}, headers=api.admin
    )
    assert await refusal(again) == "ALREADY_ASSIGNED"
    await receiver.wait_until(lambda: len(receiver.of_type("delivery.assigned")) == 1)
    await assert_offer_invariants(pg_pool)


async def test_an_offered_driver_is_not_booked_by_an_auto_order(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    """The dispatchable rule excludes open offers on both paths: an `auto` ingress over
    the same database does not book a driver another dispatch is waiting on."""
    offering = await offer_api(start_api, make_settings, offer_mode="cascade")
    (driver,) = await drivers_at(offering, 0.1)
    await offering.order("SO-o1", *BERLIN)
    assert len(await open_offers(offering, driver)) == 1
    auto = await offer_api(
        start_api, make_settings, ray_namespace="dispatcher-test-auto"
    )
    body = await (await auto.order("SO-auto", *BERLIN)).json()
    assert body == {
        "assigned": False,
        "sellerOrderId": "SO-auto",
        "reason": "NO_DRIVER_AVAILABLE",
    }


async def test_drivers_hear_of_offers_on_their_event_stream(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    api = await offer_api(
        start_api,
        make_settings,
        offer_mode="wave",
        offer_wave_size=2,
        offer_timeout_s=1.0,
    )
    a, b = await drivers_at(api, 0.1, 0.2)
    watchers = [
        Watcher(
            d.driver_id,
            await api.client.ws_connect(
                f"/drivers/{d.driver_id}/events", headers=d.auth
            ),
        ).start()
        for d in (a, b)
    ]
    try:
        await api.order("SO-ev1", *BERLIN, drop={"lat": 52.5, "lon": 13.42})
        for w in watchers:
            await w.wait_for(
                lambda w: any(e["type"] == "offer.created" for e in w.events)
            )
        created = next(e for e in watchers[0].events if e["type"] == "offer.created")[
            "data"
        ]
        offer = (await open_offers(api, a))[0]
        assert (
            created["offerId"] == offer["offerId"]
            and created["sellerOrderId"] == "SO-ev1"
        )
        assert created["pickup"] == {"lat": BERLIN[0], "lon": BERLIN[1]}
        assert created["drop"] == {"lat": 52.5, "lon": 13.42}
        assert set(created) == {
            "offerId",
            "sellerOrderId",
            "pickup",
            "drop",
            "distanceKm",
            "expiresAt",
        }
        assert (await answer(api, a, offer["offerId"], "accept")).status == 200
        await watchers[0].wait_for(
            lambda w: any(e["type"] == "delivery.assigned" for e in w.events)
        )
        await watchers[1].wait_for(
            lambda w: any(e["type"] == "offer.withdrawn" for e in w.events)
        )
        withdrawn = next(
            e for e in watchers[1].events if e["type"] == "offer.withdrawn"
        )["data"]
        assert withdrawn["reason"] == "SUPERSEDED"

        # b alone now: its next offer expires unanswered, and it hears so.
        await api.order("SO-ev2", *BERLIN)
        await watchers[1].wait_for(
            lambda w: any(e["type"] == "offer.expired" for e in w.events), within_s=20
        )
        assert [e["type"] for e in watchers[1].events] == [
            "offer.created",
            "offer.withdrawn",
            "offer.created",
            "offer.expired",
        ]
        assert watchers[1].seqs == [1, 2, 3, 4]
    finally:
        for w in watchers:
            await w.close()
    rows = await pg_pool.fetch(
        "SELECT type FROM driver_events WHERE driver_id = $1 ORDER BY seq", a.driver_id
    )
    assert [r["type"] for r in rows] == ["offer.created", "delivery.assigned"]


async def test_operators_see_open_offers_per_zone_and_offer_metrics(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    api = await offer_api(
        start_api, make_settings, offer_mode="wave", offer_wave_size=2
    )
    a, _ = await drivers_at(api, 0.1, 0.2)
    await api.order("SO-m1", *BERLIN)
    zones = (await (await api.client.get("/zones", headers=api.admin)).json())["zones"]
    assert [z["openOffers"] for z in zones] == [2]
    offer = (await open_offers(api, a))[0]
    assert (await answer(api, a, offer["offerId"], "accept")).status == 200
    text = await (await api.client.get("/metrics")).text()
    assert 'dispatcher_offers_total{outcome="accepted"} 1.0' in text
    assert 'dispatcher_offers_total{outcome="withdrawn"} 1.0' in text
    assert "dispatcher_offers_open 0.0" in text
    assert "dispatcher_offer_accept_seconds_count 1.0" in text
    assert "dispatcher_dispatches_given_up_total 0.0" in text
    zones = (await (await api.client.get("/zones", headers=api.admin)).json())["zones"]
    assert [z["openOffers"] for z in zones] == [0]


def metric(text: str, sample: str) -> float:
    """One sample's value in a Prometheus text page (the whole name with labels)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in /metrics")


async def test_metrics_count_every_outcome_acceptance_time_and_give_ups_per_zone(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    """Two zones with an offer each (GET /zones counts them apart); one order is
    accepted after a wait, the other declined, then expired, then given up."""
    api = await offer_api(
        start_api,
        make_settings,
        offer_mode="cascade",
        offer_timeout_s=0.5,
        offer_max_rounds=2,
        search_radius_km=1.0,
    )
    far = offset(*BERLIN, 0.0, 40.0)
    a1, a2 = await drivers_at(api, 0.1, 0.2)
    b1 = await api.online_driver(*offset(*far, 0.1, 0.0), name="b1")
    assert (await (await api.order("SO-ma", *BERLIN)).json())["dispatchStatus"] == (
        "OFFERED"
    )
    assert (await (await api.order("SO-mb", *far)).json())["dispatchStatus"] == (
        "OFFERED"
    )
    zone_a, zone_b = [
        await pg_pool.fetchval(
            "SELECT zone_id FROM dispatches WHERE seller_order_id = $1", order
        )
        for order in ("SO-ma", "SO-mb")
    ]
    assert zone_a != zone_b
    zones = (await (await api.client.get("/zones", headers=api.admin)).json())["zones"]
    assert {z["zoneId"]: z["openOffers"] for z in zones} == {zone_a: 1, zone_b: 1}

    # b1 takes his time, then accepts.
    (offer,) = await open_offers(api, b1)
    waited = 0.3
    await asyncio.sleep(waited)
    assert (await answer(api, b1, offer["offerId"], "accept")).status == 200
    # a1 declines; a2, offered next, lets his offer expire; two rounds spent: give-up.
    (offer,) = await open_offers(api, a1)
    assert (await answer(api, a1, offer["offerId"], "decline")).status == 200
    await wait_for(lambda: _has_open_offer(api, a2))
    await wait_for(lambda: _dispatch_is(pg_pool, "SO-ma", "UNASSIGNED"))
    await receiver.wait_until(lambda: bool(receiver.of_type("delivery.unassigned")))

    text = await (await api.client.get("/metrics")).text()
    for outcome, n in (("accepted", 1), ("declined", 1), ("expired", 1)):
        assert metric(text, f'dispatcher_offers_total{{outcome="{outcome}"}}') == n
    assert metric(text, 'dispatcher_offers_total{outcome="withdrawn"}') == 0
    assert metric(text, "dispatcher_offers_open") == 0
    assert metric(text, "dispatcher_dispatches_given_up_total") == 1
    assert metric(text, "dispatcher_offer_accept_seconds_count") == 1
    # Offer to accept, as PostgreSQL timed it: at least the driver's wait.
    assert metric(text, "dispatcher_offer_accept_seconds_sum") >= waited
    zones = (await (await api.client.get("/zones", headers=api.admin)).json())["zones"]
    assert {z["zoneId"]: z["openOffers"] for z in zones} == {zone_a: 0, zone_b: 0}


async def _has_open_offer(api: Api, driver: Driver) -> bool:
    return bool(await open_offers(api, driver))


async def _dispatch_is(pg_pool: asyncpg.Pool, order: str, status: str) -> bool:
    found = await pg_pool.fetchval(
        "SELECT status FROM dispatches WHERE seller_order_id = $1", order
    )
    return bool(found == status)


async def test_a_driver_going_offline_gives_back_his_offer_at_once(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    api = await offer_api(start_api, make_settings, offer_mode="cascade")
    near, far = await drivers_at(api, 0.1, 0.3)
    await api.order("SO-off", *BERLIN)
    offer = (await open_offers(api, near))[0]
    assert (await api.set_status(near, "OFFLINE")).status == 200
    # The offer is withdrawn and the next driver offered, without waiting for the timeout.
    assert len(await open_offers(api, far)) == 1
    assert (
        await refusal(await answer(api, near, offer["offerId"], "accept"))
        == "OFFER_WITHDRAWN"
    )
    await assert_offer_invariants(pg_pool)


async def test_an_order_booked_before_offers_were_on_is_replayed_not_offered(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    auto = await offer_api(start_api, make_settings)
    await drivers_at(auto, 0.1, 0.2)
    first = await auto.order("SO-sw", *BERLIN)
    first_bytes = await first.read()
    cascade = await offer_api(
        start_api,
        make_settings,
        offer_mode="cascade",
        ray_namespace="dispatcher-test-cascade",
    )
    again = await cascade.order("SO-sw", *BERLIN)
    assert await again.read() == first_bytes
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert await pg_pool.fetchval("SELECT count(*) FROM offers") == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM dispatches") == 0
