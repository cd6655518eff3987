"""A short, compressed live run against the real service ends clean, as PostgreSQL records it."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from dispatcher.config import ResolvedSettings
from dispatcher.embedded import free_port
from dispatcher.simulate.cli import main as simulate_main
from dispatcher.simulate.live import LiveRunner, LiveTarget
from dispatcher.simulate.settings import DriverBehaviour, RunSettings, VendureBehaviour
from dispatcher.simulate.summary import format_table, summarize
from dispatcher.simulate.synthetic import SyntheticCity, SyntheticSpec
from dispatcher.webhooks.signing import new_secret
from tests.support import Api

pytestmark = pytest.mark.integration

# 30 s of wall time at 20x: ten simulated minutes of a lunch hour.
WALL_MINUTES = 0.5
SPEED = 20.0
FINAL = {"DELIVERED", "FAILED", "CANCELLED"}
STATUS_OF = {"delivered": "DELIVERED", "failed": "FAILED", "cancelled": "CANCELLED"}


@pytest.mark.timeout(300)
async def test_a_short_live_run_ends_with_every_order_final(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    port = free_port()
    settings = make_settings(
        vendure_webhook_url=f"http://127.0.0.1:{port}/webhooks",
        vendure_webhook_secret=new_secret(),
        # Compressed time makes drivers cover ground 20x faster on the wall clock.
        max_ping_speed_kmh=20 * 250.0,
        zone_resolution=5,
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
        driver=DriverBehaviour(fail_share=0.3),
        vendure=VendureBehaviour(cancel_share=0.15, cancel_within_s=300.0),
    )
    result = await LiveRunner(
        city, run, target, minutes=WALL_MINUTES, speed=SPEED, receiver_port=port
    ).run()

    print(format_table(result))
    summary = summarize(result)
    assert summary["orders"] >= 10, summary
    # The seeded fates include customers who cancel and doors where nobody answers.
    assert summary["cancelled"] >= 1 and summary["failed"] >= 1, summary
    assert summary["assigned"] >= 5, summary
    assert "unexpected answers" not in result.notes, result.notes
    assert "webhooks with bad signatures" not in result.notes, result.notes

    rows = await pg_pool.fetch(
        "SELECT seller_order_id, driver_id, status, assigned_at, "
        "coalesce(delivered_at, failed_at, cancelled_at) AS ended_at FROM deliveries"
    )
    by_order = {r["seller_order_id"]: r for r in rows}
    # Invariant 2: one delivery per sellerOrderId, and only orders the shop sent.
    assert len(by_order) == len(rows)
    # Every delivery ended: nothing is left ASSIGNED or PICKED_UP.
    assert {r["status"] for r in rows} <= FINAL, sorted({r["status"] for r in rows})
    # Invariant 1 over the whole run: a driver's deliveries never overlap in time.
    by_driver: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        by_driver.setdefault(r["driver_id"], []).append(r)
    for driver_rows in by_driver.values():
        spans = sorted((r["assigned_at"], r["ended_at"]) for r in driver_rows)
        for (_, ended), (started, _) in itertools.pairwise(spans):
            assert ended <= started, spans

    # The simulator's account and PostgreSQL's agree, order by order.
    booked = [r for r in result.records if r.assigned_s is not None]
    assert len(booked) == len(rows)
    runner_ids = {
        f"sim-{result.notes['order ids'].split('-')[1]}-o{r.number:07d}": r
        for r in booked
    }
    assert set(runner_ids) == set(by_order)
    for seller_order_id, record in runner_ids.items():
        assert STATUS_OF[record.outcome] == by_order[seller_order_id]["status"], (
            seller_order_id,
            record,
        )
    # Orders never booked have no delivery, and the run accounts for each of them.
    for record in result.records:
        if record.assigned_s is None:
            assert record.outcome in {"unassigned", "cancelled", "open"}

    # Everyone signed off, and the shop heard about every booking.
    statuses = await pg_pool.fetch(
        "SELECT status, count(*) AS n FROM drivers GROUP BY status"
    )
    assert {r["status"]: r["n"] for r in statuses} == {"OFFLINE": run.drivers}
    assert f"delivery.assigned {len(rows)}" in result.notes["webhooks received"], (
        result.notes
    )


@pytest.mark.timeout(300)
async def test_the_cli_plays_a_running_service_with_secrets_from_the_environment(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    settings = make_settings(
        vendure_webhook_url=f"http://127.0.0.1:{port}/webhooks",
        vendure_webhook_secret=new_secret(),
    )
    api: Api = await start_api(settings)
    url = str(api.client.make_url("")).rstrip("/")
    monkeypatch.setenv("DISPATCHER_ADMIN_TOKEN", settings.admin_token)
    monkeypatch.setenv("DISPATCHER_INBOUND_SECRET", settings.inbound_secret)
    monkeypatch.setenv(
        "DISPATCHER_VENDURE_WEBHOOK_SECRET", settings.vendure_webhook_secret
    )
    argv = [
        "--url",
        url,
        "--minutes",
        "0.25",
        "--speed",
        "5",
        "--drivers",
        "8",
        "--seed",
        "9",
        "--scenario",
        "synthetic",
        "--receiver-port",
        str(port),
        "--open",
    ]
    # The CLI runs its own event loop: a thread, while this loop serves the API.
    assert await asyncio.to_thread(simulate_main, argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"operator page: {url}/ops"
    assert "synthetic (live, auto mode, seed 9)" in out
    assert (
        "webhooks with bad signatures" not in out and "unexpected answers" not in out
    ), out
    drivers = await pg_pool.fetch("SELECT name, status FROM drivers")
    assert len(drivers) == 8 and {d["status"] for d in drivers} == {"OFFLINE"}
    # Seed 9 makes 8 orders in these 75 simulated seconds of a lunch hour.
    booked = await pg_pool.fetchval("SELECT count(*) FROM deliveries")
    assert booked >= 1
    assert f"delivery.assigned {booked}" in out, out


class LosingProxy:
    """Forwards everything to the service, but loses the answers to some seller-order-ready
    events after the service handled them (it answers 503 instead): the first answer of
    the first few orders, and every answer of one order."""

    def __init__(self, upstream: str, *, lose_first: int, lose_always: bool) -> None:
        self.upstream = upstream
        self.lose_first = lose_first
        self.lose_always = lose_always
        self.seen: list[str] = []
        self.lost = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        raw = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in {"host", "content-length"}
        }
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=raw, headers=headers
        ) as resp:
            body = await resp.read()
            status, content_type = (
                resp.status,
                resp.headers.get("Content-Type", "application/json"),
            )
        if request.path == "/events/seller-order-ready" and status == 200:
            order_id = json.loads(raw)["sellerOrderId"]
            first = order_id not in self.seen
            if first:
                self.seen.append(order_id)
            index = self.seen.index(order_id)
            if (index == 0 and self.lose_always) or (
                first and 0 < index <= self.lose_first
            ):
                self.lost += 1
                return web.json_response({"title": "lost"}, status=503)
        return web.Response(
            body=body, status=status, headers={"Content-Type": content_type}
        )


@pytest.mark.timeout(300)
async def test_lost_answers_never_leave_a_booking_behind(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    """A 503 may hide a booking. The shop sends the event again (the replay tells), and an
    order whose answer never comes is cancelled at the end: nothing is left active."""
    settings = make_settings(max_ping_speed_kmh=20 * 250.0, zone_resolution=5)
    api: Api = await start_api(settings)
    proxy = LosingProxy(
        str(api.client.make_url("")).rstrip("/"), lose_first=3, lose_always=True
    )
    await proxy.start()
    try:
        target = LiveTarget(proxy.url, settings.admin_token, settings.inbound_secret)
        city = SyntheticCity(SyntheticSpec(size_km=4.0, orders_per_hour=100.0))
        run = RunSettings(seed=6, start_hour=12.0, drivers=15)
        result = await LiveRunner(
            city, run, target, minutes=WALL_MINUTES, speed=SPEED
        ).run()
    finally:
        await proxy.stop()
    assert proxy.lost >= 4, proxy.lost
    assert result.notes.get("503 answers, tried again", 0) >= 4, result.notes
    assert "unexpected answers" not in result.notes, result.notes
    rows = await pg_pool.fetch("SELECT seller_order_id, status FROM deliveries")
    assert rows and {r["status"] for r in rows} <= FINAL, rows
    # Every delivery the service made is one the simulator knows it made.
    assert len(rows) == sum(1 for r in result.records if r.assigned_s is not None)
    # The order whose answers were all lost was booked, then cancelled at the end.
    always_lost = next(r for r in rows if r["seller_order_id"] == proxy.seen[0])
    assert always_lost["status"] == "CANCELLED"
    assert result.notes["cancelled at the end of the run"] >= 1
