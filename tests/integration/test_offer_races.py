"""Offer races against the real service, repeated: simultaneous accepts, the expiry edge,
accept against Vendure's cancel, and one border driver wanted by two zones."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime

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


async def free(api: Api, driver: Driver, order: str) -> None:
    """Finish the winner's delivery so it is dispatchable again."""
    assert (await api.step(driver, order, "picked-up")).status == 200
    assert (await api.step(driver, order, "delivered")).status == 200


async def test_five_wave_drivers_accept_at_once_exactly_one_wins(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api = await start_api(make_settings(offer_mode="wave", offer_wave_size=5))
    drivers = [
        await api.online_driver(*offset(*BERLIN, 0.05 * (n + 1), 0.0), name=f"w{n}")
        for n in range(5)
    ]
    by_id = {d.driver_id: d for d in drivers}
    winners: Counter[str] = Counter()
    for n in range(ROUNDS):
        order = f"SO-race-{n}"
        body = await (await api.order(order, *BERLIN)).json()
        assert body["dispatchStatus"] == "OFFERED", body
        offers = {
            d.driver_id: (await open_offers(api, d))[0]["offerId"] for d in drivers
        }
        random.shuffle(drivers)
        results = await asyncio.gather(
            *(answer(api, d, offers[d.driver_id], "accept") for d in drivers)
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
        await free(api, by_id[won[0].driver_id], order)
    await receiver.wait_until(
        lambda: len(receiver.of_type("delivery.assigned")) == ROUNDS
    )
    assigned = Counter(
        d.body["data"]["sellerOrderId"] for d in receiver.of_type("delivery.assigned")
    )
    assert set(assigned.values()) == {1}
    print(f"\nwinners over {ROUNDS} rounds: {dict(winners)}")


async def test_accept_at_the_expiry_edge_is_never_both_accepted_and_expired(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    """Ten orders far apart, each with its own driver, whose accept lands within
    ±150 ms of accept_by (expiresAt + 2 s): the database's clock decides each one."""
    api = await start_api(
        make_settings(offer_mode="cascade", offer_timeout_s=0.3, search_radius_km=0.5)
    )
    spots = [offset(*BERLIN, 2.0 * (n // 5), 2.0 * (n % 5)) for n in range(10)]
    drivers = [
        await api.online_driver(*offset(*spot, 0.05, 0.0), name=f"e{n}")
        for n, spot in enumerate(spots)
    ]
    outcomes: Counter[str] = Counter()
    for batch in range(3):
        orders = [f"SO-edge-{batch}-{n}" for n in range(10)]
        for order, spot in zip(orders, spots, strict=True):
            assert (await (await api.order(order, *spot)).json())[
                "dispatchStatus"
            ] == "OFFERED"

        async def race(driver: Driver) -> tuple[str, int, str | None]:
            (offer,) = await open_offers(api, driver)
            accept_by = datetime.fromisoformat(offer["expiresAt"]).timestamp() + 2.0
            db_now = float(
                await pg_pool.fetchval("SELECT extract(epoch FROM clock_timestamp())")
            )
            await asyncio.sleep(
                max(0.0, accept_by - db_now + random.uniform(-0.15, 0.15))
            )
            resp = await answer(api, driver, offer["offerId"], "accept")
            return (
                offer["offerId"],
                resp.status,
                None if resp.status == 200 else await refusal(resp),
            )

        for offer_id, status, reason in await asyncio.gather(
            *(race(d) for d in drivers)
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
        for order in orders:
            await api.cancel(order)
        for driver in drivers:
            # Finished deliveries free the winners; the timers' expiries count as missed.
            await pg_pool.execute(
                "UPDATE drivers SET status = 'AVAILABLE', missed_offers = 0 WHERE id = $1",
                driver.driver_id,
            )
            await api.ping(
                driver,
                *offset(*spots[drivers.index(driver)], 0.05, 0.001 * (batch + 1)),
            )
    delivered = await pg_pool.fetchval("SELECT count(*) FROM deliveries")
    assert delivered == outcomes["ACCEPTED"]
    print(f"\nexpiry edge outcomes: {dict(outcomes)}")


async def test_accept_racing_vendures_cancel_ends_one_way_or_the_other(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    receiver: WebhookReceiver,
) -> None:
    api = await start_api(make_settings(offer_mode="cascade"))
    driver = await api.online_driver(*offset(*BERLIN, 0.1, 0.0), name="racer")
    seen: Counter[str] = Counter()
    for n in range(ROUNDS):
        order = f"SO-cx-{n}"
        await api.order(order, *BERLIN)
        (offer,) = await open_offers(api, driver)
        accepted, cancelled = await asyncio.gather(
            answer(api, driver, offer["offerId"], "accept"), api.cancel(order)
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
            seen["accept-then-cancel"] += 1
        else:
            assert await refusal(accepted) == "ORDER_CANCELLED"
            assert delivery is None and dispatch == "CANCELLED"
            seen["cancel-then-accept"] += 1
        assert (
            await pg_pool.fetchval(
                "SELECT status FROM drivers WHERE id = $1", driver.driver_id
            )
            == "AVAILABLE"
        )
        await assert_offer_invariants(pg_pool)
    n_accepted = seen["accept-then-cancel"]
    await receiver.wait_until(
        lambda: len(receiver.of_type("delivery.cancelled")) == n_accepted
    )
    assert len(receiver.of_type("delivery.assigned")) == n_accepted
    print(f"\naccept vs cancel: {dict(seen)}")


async def test_one_border_driver_wanted_by_two_zones_gets_one_offer(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    api = await start_api(make_settings(offer_mode="cascade"))
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
    outcomes: Counter[tuple[str, str]] = Counter()
    for n in range(ROUNDS):
        orders = (f"SO-ba-{n}", f"SO-bb-{n}")
        answers = await asyncio.gather(
            api.order(orders[0], *a_side), api.order(orders[1], *b_side)
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
        outcomes[(reasons[0], reasons[1])] += 1
        for order, reason in zip(orders, reasons, strict=True):
            if reason == "AWAITING_ACCEPTANCE":
                assert (await api.cancel(order)).status == 200
    print(f"\nborder driver: {dict(outcomes)}")
