"""Driver event stream: pushes, auth, one socket per driver, resume, transactions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from dispatcher.api.driver_stream import AUTH_TIMEOUT_S
from dispatcher.api.keys import EVENT_HUB
from dispatcher.config import ResolvedSettings
from dispatcher.messages import AssignRequest
from dispatcher.models import assigned_body
from dispatcher.store.deliveries import DeliveryStore, OrderExistsError
from dispatcher.store.driver_events import append_driver_event
from tests.support import BERLIN, Api, offset, problem, validation_problem
from tests.support.streams import Watcher, connector_session, events_path, watch

pytestmark = pytest.mark.integration


def base(api: Api) -> str:
    return str(api.client.make_url("")).rstrip("/")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with connector_session() as s:
        yield s


async def test_booked_driver_hears_assigned_then_cancelled_and_nobody_else(
    api: Api, session: aiohttp.ClientSession, pg_pool: asyncpg.Pool
) -> None:
    near = await api.online_driver(*offset(*BERLIN, 0.2, 0), name="near")
    far = await api.online_driver(*offset(*BERLIN, 3, 0), name="far")
    watchers = {d.driver_id: await watch(session, base(api), d) for d in (near, far)}
    drop = offset(*BERLIN, -1, 1)
    resp = await api.order("S-1", *BERLIN, drop={"lat": drop[0], "lon": drop[1]})
    answer = await resp.json()
    assert answer["assigned"] and answer["driverId"] == near.driver_id, answer

    mine = watchers[near.driver_id]
    await mine.wait_for(lambda w: len(w.events) == 1)
    event = mine.events[0]
    assert event["seq"] == 1 and event["type"] == "delivery.assigned"
    assert event["at"].endswith("Z")
    assert event["data"] == {
        "sellerOrderId": "S-1",
        "assignmentId": answer["assignmentId"],
        "pickup": {"lat": BERLIN[0], "lon": BERLIN[1]},
        "drop": {"lat": drop[0], "lon": drop[1]},
        "distanceKm": answer["distanceKm"],
    }
    resp = await api.cancel("S-1")
    assert resp.status == 200, await resp.text()
    await mine.wait_for(lambda w: len(w.events) == 2)
    cancelled = mine.events[1]
    assert cancelled["seq"] == 2 and cancelled["type"] == "delivery.cancelled"
    assert cancelled["data"]["sellerOrderId"] == "S-1" and "reason" in cancelled["data"]

    # The other driver's socket got nothing; the log holds exactly these two rows.
    await asyncio.sleep(0.5)
    assert watchers[far.driver_id].messages == []
    rows = await pg_pool.fetch(
        "SELECT driver_id, seq, type FROM driver_events ORDER BY driver_id, seq"
    )
    assert [tuple(r) for r in rows] == [
        (near.driver_id, 1, "delivery.assigned"),
        (near.driver_id, 2, "delivery.cancelled"),
    ]
    for w in watchers.values():
        await w.close()


async def test_lifecycle_steps_reach_the_driver_in_order(
    api: Api, session: aiohttp.ClientSession
) -> None:
    driver = await api.online_driver(*BERLIN)
    w = await watch(session, base(api), driver)
    assert (await (await api.order("L-1", *BERLIN)).json())["assigned"]
    for step in ("picked-up", "delivered"):
        resp = await api.step(driver, "L-1", step)
        assert resp.status == 200, await resp.text()
    # Repeating a step is a no-op: no event.
    assert (await api.step(driver, "L-1", "delivered")).status == 200
    await w.wait_for(lambda w: len(w.events) == 3)
    await asyncio.sleep(0.3)
    assert [(e["seq"], e["type"]) for e in w.events] == [
        (1, "delivery.assigned"),
        (2, "delivery.picked_up"),
        (3, "delivery.delivered"),
    ]
    await w.close()


async def test_refusals_leak_nothing(api: Api, session: aiohttp.ClientSession) -> None:
    mine = await api.create_driver("mine")
    other = await api.create_driver("other")
    url = base(api) + events_path(mine.driver_id)

    async def refused(target: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        resp = await session.get(
            target,
            headers={
                **headers,
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        return resp

    body = await problem(await refused(url, {"Authorization": "Bearer nope"}), 401)
    body = await problem(await refused(url, other.auth), 403)
    assert mine.driver_id not in json.dumps(body) and other.driver_id not in json.dumps(
        body
    )
    # A valid token in the query string is refused, with or without a header.
    for name in ("token", "access_token"):
        await problem(await refused(f"{url}?{name}={mine.token}", {}), 401)
        await problem(await refused(f"{url}?{name}={mine.token}", mine.auth), 401)
    for bad in ("-1", "x", "1.5", "", "99999999999999999999"):
        await validation_problem(await refused(f"{url}?after={bad}", mine.auth))
    # Not a WebSocket request: a problem, not a hang.
    await problem(await session.get(url, headers=mine.auth), 426)
    # Operator on an unknown driver: 404; a driver token on one: 403 (it is not its own).
    await problem(await refused(base(api) + events_path("drv_nobody"), api.admin), 404)
    await problem(await refused(base(api) + events_path("drv_nobody"), mine.auth), 403)

    # No header: the first message must authenticate within 5 s.
    ws = await session.ws_connect(url)
    msg = await ws.receive(timeout=AUTH_TIMEOUT_S + 10)
    assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 4401
    for token, code in (("nope", 4401), (other.token, 4403)):
        ws = await session.ws_connect(url)
        await ws.send_json({"type": "auth", "token": token})
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == code, msg
        assert other.driver_id not in str(msg.extra)
    # Nothing was registered for the refused sockets.
    assert not api.client.app[EVENT_HUB].sockets


async def test_auth_message_and_operator_may_watch(
    api: Api, session: aiohttp.ClientSession, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.create_driver()
    async with pg_pool.acquire() as conn:
        await append_driver_event(
            conn, driver.driver_id, "offer.expired", {"offerId": "o-1"}
        )
    ws = await session.ws_connect(base(api) + events_path(driver.driver_id, after=0))
    await ws.send_json({"type": "auth", "token": driver.token})
    browser = Watcher(driver.driver_id, ws).start()
    await browser.wait_for(lambda w: w.seqs == [1])
    # The operator may watch any driver; its socket replaces the driver's (one per driver).
    operator = await watch(session, base(api), driver, after=0, headers=api.admin)
    await operator.wait_for(lambda w: w.seqs == [1])
    await browser.wait_for(lambda w: w.closed)
    assert browser.close_code == 4001
    await operator.close()


async def test_newer_socket_closes_the_older_across_replicas(
    start_api: Callable[[ResolvedSettings], Any],
    settings: ResolvedSettings,
    session: aiohttp.ClientSession,
    pg_pool: asyncpg.Pool,
) -> None:
    one: Api = await start_api(settings)
    two: Api = await start_api(settings)
    driver = await one.create_driver()
    first = await watch(session, base(one), driver)
    second = await watch(session, base(two), driver)
    await first.wait_for(lambda w: w.closed)
    assert first.close_code == 4001
    third = await watch(session, base(two), driver)
    await second.wait_for(lambda w: w.closed)
    assert second.close_code == 4001
    # The survivor still gets events.
    async with pg_pool.acquire() as conn:
        await append_driver_event(
            conn, driver.driver_id, "offer.expired", {"offerId": "o-1"}
        )
    await third.wait_for(lambda w: w.seqs == [1])
    assert not third.closed
    await third.close()


async def test_resume_replays_missed_events_then_resyncs_past_retention(
    api: Api, session: aiohttp.ClientSession, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.create_driver()

    async def append(n: int) -> None:
        async with pg_pool.acquire() as conn, conn.transaction():
            for i in range(n):
                await append_driver_event(
                    conn, driver.driver_id, "offer.expired", {"offerId": f"o-{i}"}
                )

    await append(3)
    # No `after`: live events only.
    live = await watch(session, base(api), driver)
    await append(2)
    await live.wait_for(lambda w: w.seqs == [4, 5])
    await live.close()
    await append(
        100
    )  # more than the socket queue holds: replay is paced, never cut off
    resumed = await watch(session, base(api), driver, after=2)
    await resumed.wait_for(lambda w: len(w.seqs) == 103)
    assert resumed.seqs == list(range(3, 106)) and not resumed.closed
    await resumed.close()

    # Age the first 50 rows past the retention and prune them: `after` 10 cannot be resumed.
    await pg_pool.execute(
        "UPDATE driver_events SET at = at - interval '25 hours' WHERE driver_id = $1 AND seq <= 50",
        driver.driver_id,
    )
    assert await api.client.app[EVENT_HUB].store.prune(24 * 3600.0) == 50
    stale = await watch(session, base(api), driver, after=10)
    await stale.wait_for(lambda w: len(w.messages) >= 1)
    await append(1)
    await stale.wait_for(lambda w: len(w.messages) == 2)
    assert stale.messages[0] == {"type": "resync"}
    assert stale.seqs == [106]
    await stale.close()
    # Right at the oldest retained event: resumes; beyond the head: another history, resync.
    ok = await watch(session, base(api), driver, after=50)
    await ok.wait_for(lambda w: len(w.seqs) == 56)
    assert ok.seqs == list(range(51, 107))
    await ok.close()
    ahead = await watch(session, base(api), driver, after=500)
    await ahead.wait_for(lambda w: len(w.messages) == 1)
    assert ahead.messages == [{"type": "resync"}]
    await ahead.close()


async def test_a_rolled_back_booking_writes_no_event(
    make_settings: Callable[..., ResolvedSettings], api: Api, pg_pool: asyncpg.Pool
) -> None:
    drivers = [
        await api.online_driver(*offset(*BERLIN, 0.1 * n, 0), name=f"r{n}")
        for n in range(3)
    ]
    answer = await (await api.order("R-1", *BERLIN)).json()
    assert answer["assigned"]
    zone = answer["zoneId"]
    epoch = await pg_pool.fetchval("SELECT epoch FROM zones WHERE zone_id = $1", zone)
    store = DeliveryStore(pg_pool)
    # R-2 books a free driver (and appends its event), then R-1 again books the third
    # and its insert is refused: the whole transaction rolls back.
    with pytest.raises(OrderExistsError):
        await store.book_many(
            [(AssignRequest("R-2", *BERLIN), ()), (AssignRequest("R-1", *BERLIN), ())],
            zone_id=zone,
            epoch=epoch,
            radius_km=5.0,
            render=assigned_body,
            heartbeat_ttl_s=600.0,
        )
    assert (
        await pg_pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE seller_order_id = 'R-2'"
        )
        == 0
    )
    events = await pg_pool.fetch("SELECT driver_id, seq, type, data FROM driver_events")
    assert [(r["driver_id"], r["seq"]) for r in events] == [(answer["driverId"], 1)]
    free = [d.driver_id for d in drivers if d.driver_id != answer["driverId"]]
    assert (
        await pg_pool.fetchval(
            "SELECT count(*) FROM driver_event_seq WHERE driver_id = ANY($1)", free
        )
        == 0
    )
    # Booked for real now: its first event is seq 1 (the rolled-back number came back).
    booked = (await (await api.order("R-2", *BERLIN)).json())["driverId"]
    assert booked in free
    assert (
        await pg_pool.fetchval(
            "SELECT seq FROM driver_events WHERE driver_id = $1", booked
        )
        == 1
    )
    await assert_events_match_deliveries(pg_pool)


async def assert_events_match_deliveries(pool: asyncpg.Pool) -> None:
    """Each delivery has exactly one delivery.assigned event, for its driver, and vice versa."""
    deliveries = {
        (r["seller_order_id"], r["driver_id"], r["assignment_id"])
        for r in await pool.fetch(
            "SELECT seller_order_id, driver_id, assignment_id FROM deliveries"
        )
    }
    rows = await pool.fetch(
        "SELECT driver_id, data FROM driver_events WHERE type = 'delivery.assigned'"
    )
    events = [
        (
            json.loads(r["data"])["sellerOrderId"],
            r["driver_id"],
            json.loads(r["data"])["assignmentId"],
        )
        for r in rows
    ]
    assert len(events) == len(set(events)) and set(events) == deliveries


async def test_metrics_count_sockets_replays_latency_and_closes(
    api: Api, session: aiohttp.ClientSession, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.create_driver()
    async with pg_pool.acquire() as conn:
        await append_driver_event(
            conn, driver.driver_id, "offer.expired", {"offerId": "o-1"}
        )
    first = await watch(session, base(api), driver, after=0)
    await first.wait_for(lambda w: w.seqs == [1])
    second = await watch(session, base(api), driver, after=1)
    await first.wait_for(lambda w: w.closed)
    async with pg_pool.acquire() as conn:
        await append_driver_event(
            conn, driver.driver_id, "offer.expired", {"offerId": "o-2"}
        )
    await second.wait_for(lambda w: w.seqs == [2])
    text = await (await api.client.get("/metrics")).text()
    assert "dispatcher_driver_sockets 1.0" in text
    assert 'dispatcher_driver_socket_closes_total{code="4001"} 1.0' in text
    assert "dispatcher_driver_event_replay_events_count 2.0" in text
    assert "dispatcher_driver_event_replay_events_sum 1.0" in text
    # Only the live event (seq 2) counts for push latency, not the replayed one.
    assert "dispatcher_driver_event_push_seconds_count 1.0" in text
    await second.close()


async def test_shutdown_closes_sockets_going_away(
    api: Api, session: aiohttp.ClientSession
) -> None:
    driver = await api.create_driver()
    w = await watch(session, base(api), driver)
    hub = api.client.app[EVENT_HUB]
    for _ in range(200):
        if driver.driver_id in hub.sockets:
            break
        await asyncio.sleep(0.05)
    await api.client.close()
    await w.wait_for(lambda w: w.closed)
    assert w.close_code == 1001
