"""Offer races against the real service through TWO ingress apps (as two replicas behind a
load balancer), repeated: simultaneous accepts, the expiry edge, accept against Vendure's
cancel, and one border driver wanted by two zones. Each race runs ROUNDS rounds, and
SLOW_ROUNDS under `-m slow`; `-s` prints how the outcomes split."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import h3
import pytest

from dispatcher.config import ResolvedSettings
from dispatcher.zoning import Zoning
from tests.integration.test_offers import (
    answer,
    assert_offer_invariants,
    open_offers,
    refusal,
)
from tests.support import BERLIN, Api, Driver, WebhookReceiver, offset, zone_cells

pytestmark = pytest.mark.integration

StartApi = Callable[[ResolvedSettings], Awaitable[Api]]
# Rounds of each race; each round is a fresh order, so interleavings vary.
ROUNDS = 20
SLOW_ROUNDS = 200
rounds = pytest.mark.parametrize(
    "n_rounds",
    [ROUNDS, pytest.param(SLOW_ROUNDS, marks=pytest.mark.slow)],
    ids=["rounds", "slow-rounds"],
)


async def two_ingresses(start_api: StartApi, settings: ResolvedSettings) -> list[Api]:
    """Two ingress apps of one deployment: same settings, same PostgreSQL, same zones."""
    return [await start_api(settings), await start_api(settings)]


# A candidate row another transaction holds is skipped (SKIP LOCKED), so a round may
# now and then find nobody (a sweep or a ping holding the driver row); Vendure then
# retries, and so does the test: the race under test comes after the offer.
RETRIES: Counter[str] = Counter()


async def offered(api: Api, order: str, lat: float, lon: float) -> dict[str, Any]:
    for _ in range(50):
        body: dict[str, Any] = await (await api.order(order, lat, lon)).json()
        if body.get("reason") != "NO_DRIVER_AVAILABLE":
            assert body.get("dispatchStatus") == "OFFERED", body
            return body
        RETRIES[order] += 1
        await asyncio.sleep(0.05)
    raise AssertionError(f"{order}: nobody offered in 50 tries")


def retried(prefix: str) -> str:
    n = sum(v for k, v in RETRIES.items() if k.startswith(prefix))
    return f" ({n} orders retried after NO_DRIVER_AVAILABLE)" if n else ""


async def open_offer_ids(pg_pool: asyncpg.Pool, order: str) -> dict[str, str]:
    rows = await pg_pool.fetch(
        "SELECT driver_id, offer_id FROM offers WHERE seller_order_id = $1 AND status = 'OPEN'",
        order,
    )
    return {r["driver_id"]: r["offer_id"] for r in rows}


async def free(api: Api, driver: Driver, order: str) -> None:
    """Finish the winner's delivery so it is dispatchable again."""
    assert (await api.step(driver, order, "picked-up")).status == 200
    assert (await api.step(driver, order, "delivered")).status == 200


@rounds
async def test_five_wave_drivers_accept_at_once_exactly_one_wins(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
    n_rounds: int,
) -> None:
    apis = await two_ingresses(
        start_api, make_settings(offer_mode="wave", offer_wave_size=5)
    )
    drivers = [
        await apis[0].online_driver(*offset(*BERLIN, 0.05 * (n + 1), 0.0), name=f"w{n}")
        for n in range(5)
    ]
    by_id = {d.driver_id: d for d in drivers}
    winners: Counter[str] = Counter()
    for n in range(n_rounds):
        for attempt in range(50):
            order = f"SO-race-{n}-{attempt}"
            await offered(apis[n % 2], order, *BERLIN)
            offers = await open_offer_ids(pg_pool, order)
            if set(offers) == set(by_id):
                break
            # A wave short of a driver whose row was held (SKIP LOCKED): another order.
            RETRIES[order] += 1
            assert (await apis[n % 2].cancel(order)).status == 200
        assert set(offers) == set(by_id)
        random.shuffle(drivers)
        # The five accepts are split between the two ingresses.
        results = await asyncio.gather(
            *(
                answer(apis[i % 2], d, offers[d.driver_id], "accept")
                for i, d in enumerate(drivers)
            )
        )
        won = [d for d, r in zip(drivers, results, strict=True) if r.status == 200]
        assert len(won) == 1, [r.status for r in results]
        for d, resp in zip(drivers, results, strict=True):
            if resp.status != 200:
                assert await refusal(resp) == "OFFER_SUPERSEDED", d
        assert (
            await pg_pool.fetchval(
                "SELECT count(*) FROM deliveries WHERE seller_order_id = $1", order
            )
            == 1
        )
        await assert_offer_invariants(pg_pool)
        winners[won[0].driver_id] += 1
        await free(apis[n % 2], by_id[won[0].driver_id], order)
    await receiver.wait_until(
        lambda: len(receiver.of_type("delivery.assigned")) == n_rounds
    )
    assigned = Counter(
        d.body["data"]["sellerOrderId"] for d in receiver.of_type("delivery.assigned")
    )
    assert set(assigned.values()) == {1}
    split = "/".join(
        str(winners[d.driver_id])
        for d in sorted(by_id.values(), key=lambda d: d.driver_id)
    )
    print(
        f"\nfive wave accepts, {n_rounds} rounds: one winner each, wins per driver {split}"
        + retried("SO-race-")
    )


@rounds
async def test_accept_at_the_expiry_edge_is_never_both_accepted_and_expired(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    n_rounds: int,
) -> None:
    """Orders far apart, each with its own driver, whose accept lands within ±150 ms of
    accept_by (expiresAt + 2 s) through either ingress, while the zone's timer expires
    the offers: the database's clock decides each one."""
    apis = await two_ingresses(
        start_api,
        # A timeout long enough for a whole batch of orders to be offered first.
        make_settings(offer_mode="cascade", offer_timeout_s=1.0, search_radius_km=0.5),
    )
    # Orders raced at once per batch (each batch waits out one offer timeout + grace);
    # spots 1.2 km apart, so no driver is within another spot's 0.5 km.
    width = max(10, n_rounds // 5)
    spots = [offset(*BERLIN, 1.2 * (n // 5), 1.2 * (n % 5)) for n in range(width)]
    drivers = [
        await apis[0].online_driver(*offset(*spot, 0.05, 0.0), name=f"e{n}")
        for n, spot in enumerate(spots)
    ]
    outcomes: Counter[str] = Counter()
    for batch in range(n_rounds // width):
        orders = [f"SO-edge-{batch}-{n}" for n in range(width)]
        await asyncio.gather(
            *(
                offered(apis[n % 2], order, *spot)
                for n, (order, spot) in enumerate(zip(orders, spots, strict=True))
            )
        )

        async def race(n: int, driver: Driver, via: Api) -> tuple[str, int, str | None]:
            (offer,) = await open_offers(apis[n % 2], driver)
            accept_by = datetime.fromisoformat(offer["expiresAt"]).timestamp() + 2.0
            db_now = float(
                await pg_pool.fetchval("SELECT extract(epoch FROM clock_timestamp())")
            )
            await asyncio.sleep(
                max(0.0, accept_by - db_now + random.uniform(-0.15, 0.15))
            )
            resp = await answer(via, driver, offer["offerId"], "accept")
            return (
                offer["offerId"],
                resp.status,
                None if resp.status == 200 else await refusal(resp),
            )

        for offer_id, status, reason in await asyncio.gather(
            *(race(n, d, apis[(n + batch) % 2]) for n, d in enumerate(drivers))
        ):
            row = await pg_pool.fetchrow(
                "SELECT status, answered_at, accept_by FROM offers WHERE offer_id = $1",
                offer_id,
            )
            assert row is not None
            if status == 200:
                assert (
                    row["status"] == "ACCEPTED"
                    and row["answered_at"] <= row["accept_by"]
                )
            else:
                assert reason == "OFFER_EXPIRED" and row["status"] == "EXPIRED"
                assert row["answered_at"] > row["accept_by"]
            outcomes[row["status"]] += 1
        await assert_offer_invariants(pg_pool)
        await asyncio.gather(
            *(apis[n % 2].cancel(order) for n, order in enumerate(orders))
        )
        # Finished deliveries free the winners; the timers' expiries count as missed.
        await pg_pool.execute(
            "UPDATE drivers SET status = 'AVAILABLE', missed_offers = 0 WHERE id = ANY($1::text[])",
            [d.driver_id for d in drivers],
        )
        await asyncio.gather(
            *(
                apis[0].ping(driver, *offset(*spots[n], 0.05, 0.001 * (batch + 1)))
                for n, driver in enumerate(drivers)
            )
        )
    delivered = await pg_pool.fetchval("SELECT count(*) FROM deliveries")
    assert delivered == outcomes["ACCEPTED"]
    assert outcomes["ACCEPTED"] + outcomes["EXPIRED"] == n_rounds
    print(
        f"\nexpiry edge, {n_rounds} rounds: accepted/expired "
        f"{outcomes['ACCEPTED']}/{outcomes['EXPIRED']}" + retried("SO-edge-")
    )


@rounds
async def test_accept_racing_vendures_cancel_ends_one_way_or_the_other(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
    n_rounds: int,
) -> None:
    apis = await two_ingresses(start_api, make_settings(offer_mode="cascade"))
    driver = await apis[0].online_driver(*offset(*BERLIN, 0.1, 0.0), name="racer")
    seen: Counter[str] = Counter()
    for n in range(n_rounds):
        order = f"SO-cx-{n}"
        await offered(apis[n % 2], order, *BERLIN)
        offer_id = (await open_offer_ids(pg_pool, order))[driver.driver_id]
        # The accept through one ingress, Vendure's cancel through the other.
        accepted, cancelled = await asyncio.gather(
            answer(apis[n % 2], driver, offer_id, "accept"),
            apis[(n + 1) % 2].cancel(order),
        )
        assert cancelled.status == 200, await cancelled.text()
        delivery = await pg_pool.fetchrow(
            "SELECT status FROM deliveries WHERE seller_order_id = $1", order
        )
        dispatch = await pg_pool.fetchval(
            "SELECT status FROM dispatches WHERE seller_order_id = $1", order
        )
        if accepted.status == 200:
            # The accept came first: the cancel then cancelled the delivery.
            assert (
                delivery is not None
                and delivery["status"] == "CANCELLED"
                and dispatch == "ASSIGNED"
            )
            seen["assigned-then-cancelled"] += 1
        else:
            assert await refusal(accepted) == "ORDER_CANCELLED"
            assert delivery is None and dispatch == "CANCELLED"
            seen["ORDER_CANCELLED"] += 1
        assert (
            await pg_pool.fetchval(
                "SELECT status FROM drivers WHERE id = $1", driver.driver_id
            )
            == "AVAILABLE"
        )
        await assert_offer_invariants(pg_pool)
    n_accepted = seen["assigned-then-cancelled"]
    await receiver.wait_until(
        lambda: len(receiver.of_type("delivery.cancelled")) == n_accepted
    )
    # Both webhooks for each order assigned then cancelled, and none for the others.
    assigned = Counter(
        d.body["data"]["sellerOrderId"] for d in receiver.of_type("delivery.assigned")
    )
    cancelled_hooks = Counter(
        d.body["data"]["sellerOrderId"] for d in receiver.of_type("delivery.cancelled")
    )
    assert assigned == cancelled_hooks and set(assigned.values()) <= {1}
    assert len(assigned) == n_accepted
    print(
        f"\naccept vs cancel, {n_rounds} rounds: assigned-then-cancelled/ORDER_CANCELLED "
        f"{seen['assigned-then-cancelled']}/{seen['ORDER_CANCELLED']}"
        + retried("SO-cx-")
    )


@rounds
async def test_one_border_driver_wanted_by_two_zones_gets_one_offer(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    n_rounds: int,
) -> None:
    apis = await two_ingresses(start_api, make_settings(offer_mode="cascade"))
    api = apis[0]
    zoning = Zoning(api.settings.zone_resolution)
    cells = zone_cells(zoning.zone_of(*BERLIN))
    (alat, alon), (blat, blon) = h3.directed_edge_to_boundary(
        h3.cells_to_directed_edge(cells[0], cells[1])
    )
    mid = ((float(alat) + float(blat)) / 2, (float(alon) + float(blon)) / 2)
    around = [
        offset(*mid, n * 0.05, m * 0.05) for n in range(-4, 5) for m in range(-4, 5)
    ]
    a_side = next(p for p in around if zoning.zone_of(*p) == cells[0])
    b_side = next(p for p in around if zoning.zone_of(*p) == cells[1])
    # Both zone actors up, with nobody of their own dispatchable.
    for side in (a_side, b_side):
        warm = await api.online_driver(*side, name="warms the zone")
        assert (await api.set_status(warm, "OFFLINE")).status == 200
    driver = await api.online_driver(*a_side, name="border")
    outcomes: Counter[str] = Counter()
    for n in range(n_rounds):
        orders = (f"SO-ba-{n}", f"SO-bb-{n}")
        # Each zone's order through its own ingress, the pair swapped every round.
        answers = await asyncio.gather(
            apis[n % 2].order(orders[0], *a_side),
            apis[(n + 1) % 2].order(orders[1], *b_side),
        )
        reasons = [(await r.json())["reason"] for r in answers]
        assert sorted(reasons) == ["AWAITING_ACCEPTANCE", "NO_DRIVER_AVAILABLE"], (
            reasons
        )
        assert len(await open_offers(api, driver)) == 1
        assert (
            await pg_pool.fetchval("SELECT count(*) FROM offers WHERE status = 'OPEN'")
            == 1
        )
        await assert_offer_invariants(pg_pool)
        outcomes[
            "own zone" if reasons[0] == "AWAITING_ACCEPTANCE" else "other zone"
        ] += 1
        for order, reason in zip(orders, reasons, strict=True):
            if reason == "AWAITING_ACCEPTANCE":
                assert (await apis[n % 2].cancel(order)).status == 200
    print(
        f"\nborder driver, {n_rounds} rounds: offered by his own zone/the other "
        f"{outcomes['own zone']}/{outcomes['other zone']}"
    )
