"""A short live run in cascade mode: drivers hear offers on their event streams and answer;
every order ends final and the offer invariants hold, as PostgreSQL records them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from dispatcher.config import ResolvedSettings
from dispatcher.embedded import free_port
from dispatcher.simulate.live import LiveRunner, LiveTarget
from dispatcher.simulate.settings import DriverBehaviour, RunSettings, VendureBehaviour
from dispatcher.simulate.summary import format_table, summarize
from dispatcher.simulate.synthetic import SyntheticCity, SyntheticSpec
from dispatcher.webhooks.signing import new_secret
from tests.support import Api

pytestmark = pytest.mark.integration

WALL_MINUTES = 0.5
SPEED = 20.0
FINAL = {"DELIVERED", "FAILED", "CANCELLED"}


@pytest.mark.timeout(400)
async def test_a_short_cascade_run_ends_final_with_the_offer_invariants(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    port = free_port()
    settings = make_settings(
        vendure_webhook_url=f"http://127.0.0.1:{port}/webhooks",
        vendure_webhook_secret=new_secret(),
        max_ping_speed_kmh=SPEED * 250.0,
        zone_resolution=5,
        offer_mode="cascade",
        # Offers judged in simulated time, as `dispatcher simulate` sets it up.
        offer_timeout_s=20.0 / SPEED * 2,
        dispatch_deadline_s=120.0 / SPEED * 2,
    )
    api: Api = await start_api(settings)
    url = str(api.client.make_url("")).rstrip("/")
    target = LiveTarget(
        url,
        settings.admin_token,
        settings.inbound_secret,
        settings.vendure_webhook_secret,
    )
    city = SyntheticCity(SyntheticSpec(size_km=5.0, orders_per_hour=100.0))
    run = RunSettings(
        seed=4,
        start_hour=12.0,
        drivers=25,
        # Half the drivers decline a job next door; a few never answer.
        driver=DriverBehaviour(accept_at_zero_km=0.5, never_answer_share=0.1),
        vendure=VendureBehaviour(cancel_share=0.15, cancel_within_s=300.0),
    )
    result = await LiveRunner(
        city,
        run,
        target,
        minutes=WALL_MINUTES,
        speed=SPEED,
        receiver_port=port,
        offer_mode="cascade",
    ).run()

    print(format_table(result))
    summary = summarize(result)
    assert result.matcher == "cascade"
    assert summary["orders"] >= 10, summary
    assert summary["assigned"] >= 5, summary
    assert summary["offers_per_order"] >= 1.0, summary
    assert "unexpected answers" not in result.notes, result.notes
    assert "offer.created" in result.notes["driver events received"], result.notes
    assert "accepted" in result.notes["offer answers"], result.notes

    # Every dispatch ended; no offer is left open; no driver holds one.
    dispatches = await pg_pool.fetch("SELECT seller_order_id, status FROM dispatches")
    assert dispatches
    left_open = [tuple(r) for r in dispatches if r["status"] in ("PENDING", "OFFERED")]
    assert not left_open, left_open
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM offers WHERE status = 'OPEN'") == 0
    )
    assert (
        await pg_pool.fetchval(
            "SELECT count(*) FROM drivers WHERE open_offer_id IS NOT NULL"
        )
        == 0
    )
    # Invariant 10: at most one accepted offer per order, and each accepted offer's
    # driver is the one the order's delivery names.
    accepted = await pg_pool.fetch(
        "SELECT o.seller_order_id, o.driver_id, d.driver_id AS delivered_by "
        "FROM offers o JOIN deliveries d USING (seller_order_id) WHERE o.status = 'ACCEPTED'"
    )
    assert len({r["seller_order_id"] for r in accepted}) == len(accepted)
    assert all(r["driver_id"] == r["delivered_by"] for r in accepted)

    # Every delivery ended, one per order, and a driver's deliveries never overlap.
    rows = await pg_pool.fetch(
        "SELECT seller_order_id, driver_id, status, assigned_at, "
        "coalesce(delivered_at, failed_at, cancelled_at) AS ended_at FROM deliveries"
    )
    assert {r["status"] for r in rows} <= FINAL
    assert len({r["seller_order_id"] for r in rows}) == len(rows)
    by_driver: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        by_driver.setdefault(r["driver_id"], []).append(r)
    for driver_rows in by_driver.values():
        spans = sorted((r["assigned_at"], r["ended_at"]) for r in driver_rows)
        for (_, ended), (started, _) in itertools.pairwise(spans):
            assert ended <= started, spans
    # The simulator's account agrees with PostgreSQL's.
    booked = [r for r in result.records if r.assigned_s is not None]
    assert len(booked) == len(rows)
    assert len(accepted) == len(rows)
    assert f"delivery.assigned {len(rows)}" in result.notes["webhooks received"]
    statuses = await pg_pool.fetch(
        "SELECT status, count(*) AS n FROM drivers GROUP BY status"
    )
    assert {r["status"]: r["n"] for r in statuses} == {"OFFLINE": run.drivers}


SOCKETS = re.compile(r"^dispatcher_driver_sockets ([0-9.eE+]+)$", re.MULTILINE)


@pytest.mark.timeout(400)
async def test_more_drivers_than_aiohttps_default_connection_cap_all_hear_offers(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
) -> None:
    # aiohttp's connector holds at most 100 connections by default: with every driver's
    # stream open, the 101st stream and every request would wait for one forever.
    speed = 5.0
    settings = make_settings(
        max_ping_speed_kmh=speed * 250.0,
        offer_mode="wave",
        offer_timeout_s=25.0 / speed,
        dispatch_deadline_s=120.0 / speed,
    )
    api: Api = await start_api(settings)
    url = str(api.client.make_url("")).rstrip("/")
    target = LiveTarget(url, settings.admin_token, settings.inbound_secret)
    drivers = 110
    runner = LiveRunner(
        SyntheticCity(SyntheticSpec(size_km=4.0, orders_per_hour=600.0)),
        RunSettings(seed=2, start_hour=12.0, drivers=drivers),
        target,
        minutes=0.3,
        speed=speed,
        offer_mode="wave",
    )
    held = 0

    async def watch() -> None:
        nonlocal held
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"{url}/metrics") as resp:
                    found = SOCKETS.search(await resp.text())
                if found:
                    held = max(held, int(float(found.group(1))))
                await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    try:
        result = await runner.run()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    print(format_table(result))
    # Every driver's stream was open at once, and requests still went through.
    assert held == drivers, held
    assert "unexpected answers" not in result.notes, result.notes
    summary = summarize(result)
    assert summary["orders"] >= 5 and summary["assigned"] >= 3, summary
    assert result.notes["pings sent / refused"].endswith("/ 0"), result.notes
