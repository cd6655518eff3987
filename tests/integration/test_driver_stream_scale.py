"""Driver event stream at scale: 1,000 sockets over two replicas, reconnects, dead and slow clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import asyncpg
import pytest

from dispatcher.api.driver_stream import silent_client_closed_after_s
from dispatcher.api.event_hub import CLOSE_TRY_AGAIN, QUEUE_MAX, EventHub
from dispatcher.api.keys import DISPATCHER, EVENT_HUB
from dispatcher.config import ResolvedSettings, Settings
from dispatcher.store.driver_events import append_driver_event
from tests.streams import (
    Watcher,
    connector_session,
    events_path,
    percentiles,
    wait_all,
    watch,
)
from tests.support import BERLIN, Api, Driver, offset

pytestmark = pytest.mark.integration

SOCKETS = 1000
BOOKED = 200
RECONNECTING = 100
# Concurrent requests while setting up: enough to be quick, few enough for 2 shared cores.
PARALLEL = 20


def base(api: Api) -> str:
    return str(api.client.make_url("")).rstrip("/")


def hub(api: Api) -> EventHub:
    found: EventHub = api.client.app[EVENT_HUB]
    return found


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with connector_session() as s:
        yield s


async def in_batches(coros: Sequence[Any], size: int = PARALLEL) -> list[Any]:
    results: list[Any] = []
    for start in range(0, len(coros), size):
        results.extend(await asyncio.gather(*coros[start : start + size]))
    return results


async def registered(api: Api, n: int) -> list[Driver]:
    """`n` drivers created straight through the store (quicker than n POSTs)."""
    store = api.client.app[DISPATCHER].drivers
    made = [await store.create(f"s{i}", None, None) for i in range(n)]
    return [Driver(record.id, token) for record, token in made]


async def go_online(
    api: Api, drivers: Sequence[Driver], spots: Sequence[tuple[float, float]]
) -> None:
    async def one(driver: Driver, spot: tuple[float, float]) -> None:
        assert (await api.set_status(driver, "AVAILABLE")).status == 200
        assert (await api.ping(driver, *spot)).status == 204

    await in_batches([one(d, s) for d, s in zip(drivers, spots, strict=True)])


async def until(predicate: Callable[[], bool], within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def seqs_reach(n: int) -> Callable[[Watcher], bool]:
    return lambda w: len(w.seqs) == n


def grid(n: int) -> list[tuple[float, float]]:
    """Points 300 m apart: an order placed on one books the driver standing there."""
    side = int(n**0.5) + 1
    return [offset(*BERLIN, 0.3 * (i // side), 0.3 * (i % side)) for i in range(n)]


async def connect(
    session: aiohttp.ClientSession,
    apis: Sequence[Api],
    drivers: Sequence[Driver],
    **kw: Any,
) -> list[Watcher]:
    """Each driver's socket, alternating over the replicas."""
    return await in_batches(
        [
            watch(session, base(apis[i % len(apis)]), d, **kw)
            for i, d in enumerate(drivers)
        ],
        size=100,
    )


async def order(
    api: Api, seller_order_id: str, spot: tuple[float, float]
) -> dict[str, Any]:
    resp = await api.order(seller_order_id, *spot)
    body: dict[str, Any] = await resp.json()
    assert resp.status == 200 and body["assigned"], body
    return body


@pytest.mark.timeout(600)
async def test_1000_sockets_on_two_replicas_each_event_reaches_its_own_driver_only(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    session: aiohttp.ClientSession,
    pg_pool: asyncpg.Pool,
) -> None:
    settings = make_settings(heartbeat_ttl_s=600)
    apis: list[Api] = [await start_api(settings), await start_api(settings)]
    drivers = await registered(apis[0], SOCKETS)
    spots = grid(BOOKED)
    await go_online(apis[0], drivers[:BOOKED], spots)
    started = time.monotonic()
    watchers = await connect(session, apis, drivers)
    print(f"\n{SOCKETS} sockets connected in {time.monotonic() - started:.2f} s")
    await until(
        lambda: [len(hub(a).sockets) for a in apis] == [SOCKETS // 2, SOCKETS // 2]
    )

    answer_s: list[float] = []

    async def timed_order(n: int) -> dict[str, Any]:
        t0 = time.monotonic()
        body = await order(apis[n % 2], f"O-{n}", spots[n])
        answer_s.append(time.monotonic() - t0)
        return body

    answers = await in_batches([timed_order(n) for n in range(BOOKED)], size=10)
    booked = {a["driverId"]: a for a in answers}
    assert len(booked) == BOOKED
    by_driver = {w.driver_id: w for w in watchers}
    await wait_all(
        [by_driver[d] for d in booked], lambda w: len(w.events) >= 1, within_s=60
    )
    await asyncio.sleep(
        1.0
    )  # a stray event to a wrong socket would have arrived by now

    truth = {
        r["seller_order_id"]: r["driver_id"]
        for r in await pg_pool.fetch(
            "SELECT seller_order_id, driver_id FROM deliveries"
        )
    }
    for w in watchers:
        if w.driver_id in booked:
            assert len(w.events) == 1, w.messages
            event = w.events[0]
            assert event["seq"] == 1 and event["type"] == "delivery.assigned"
            assert truth[event["data"]["sellerOrderId"]] == w.driver_id
            assert event["data"]["assignmentId"] == booked[w.driver_id]["assignmentId"]
        else:
            assert w.messages == [], w.messages
        assert not w.closed
    latencies = [s for w in watchers for s in w.latencies]
    print(f"commit -> receipt over 2 replicas: {percentiles(latencies)}")
    print(f"order answers meanwhile: {percentiles(answer_s)}")
    await asyncio.gather(*(w.close() for w in watchers))


@pytest.mark.timeout(600)
async def test_100_reconnects_get_every_missed_event_once_in_order(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    session: aiohttp.ClientSession,
    pg_pool: asyncpg.Pool,
) -> None:
    settings = make_settings(heartbeat_ttl_s=600)
    apis: list[Api] = [await start_api(settings), await start_api(settings)]
    drivers = await registered(apis[0], RECONNECTING)
    spots = grid(RECONNECTING)
    await go_online(apis[0], drivers, spots)
    watchers = await connect(session, apis, drivers)
    answers = await in_batches(
        [order(apis[n % 2], f"A-{n}", spots[n]) for n in range(RECONNECTING)], size=10
    )
    await wait_all(watchers, lambda w: w.seqs == [1], within_s=60)
    await asyncio.gather(*(w.close() for w in watchers))

    # While they are away: a cancellation, a new booking and two offer events each.
    cancels = [apis[n % 2].cancel(a["sellerOrderId"]) for n, a in enumerate(answers)]
    assert {r.status for r in await in_batches(cancels)} == {200}
    await go_online(apis[1], drivers, spots)  # freed drivers ping again
    await in_batches(
        [order(apis[n % 2], f"B-{n}", spots[n]) for n in range(RECONNECTING)], size=10
    )
    async with pg_pool.acquire() as conn, conn.transaction():
        for d in drivers:
            for k in range(2):
                await append_driver_event(
                    conn,
                    d.driver_id,
                    "offer.expired",
                    {"offerId": f"{d.driver_id}-{k}"},
                )

    # Back, each on the other replica, from the last event it processed.
    back = await connect(session, list(reversed(apis)), drivers, after=1)
    await wait_all(back, lambda w: len(w.seqs) >= 4, within_s=60)
    async with pg_pool.acquire() as conn:
        for d in drivers:
            await append_driver_event(
                conn, d.driver_id, "offer.expired", {"offerId": "live"}
            )
    await wait_all(back, lambda w: len(w.seqs) >= 5, within_s=60)
    await asyncio.sleep(0.5)
    for w in back:
        assert w.seqs == [2, 3, 4, 5, 6], w.seqs
        assert [e["type"] for e in w.events] == [
            "delivery.cancelled",
            "delivery.assigned",
            "offer.expired",
            "offer.expired",
            "offer.expired",
        ]
    replays = next(iter(apis[0].client.app[EVENT_HUB].metrics.replay.collect())).samples
    assert any(s.name.endswith("_sum") and s.value > 0 for s in replays)
    await asyncio.gather(*(w.close() for w in back))


def test_heartbeat_defaults_close_a_silent_client_within_15_s() -> None:
    assert Settings.model_fields["event_heartbeat_s"].default == 10.0
    assert silent_client_closed_after_s(10.0) == 15.0


@pytest.mark.timeout(120)
async def test_a_client_that_stops_answering_pings_is_closed(
    make_settings: Callable[..., ResolvedSettings],
    start_api: Callable[[ResolvedSettings], Any],
    session: aiohttp.ClientSession,
) -> None:
    heartbeat_s = 1.0
    api: Api = await start_api(make_settings(event_heartbeat_s=heartbeat_s))
    healthy, silent = (
        await api.create_driver("healthy"),
        await api.create_driver("silent"),
    )
    alive = await watch(session, base(api), healthy)
    # autoping off and never read: pings go unanswered, as from a dead phone.
    mute = await session.ws_connect(
        base(api) + events_path(silent.driver_id), headers=silent.auth, autoping=False
    )
    await until(lambda: silent.driver_id in hub(api).sockets)
    t0 = time.monotonic()
    while silent.driver_id in hub(api).sockets:
        assert time.monotonic() - t0 < 30 * silent_client_closed_after_s(heartbeat_s), (
            "silent client still open"
        )
        await asyncio.sleep(0.05)
    closed_after = time.monotonic() - t0
    print(
        f"\nsilent client closed after {closed_after:.2f} s (heartbeat {heartbeat_s} s)"
    )
    # Not before its ping went unanswered; and a client that answers stays.
    assert closed_after >= heartbeat_s
    assert healthy.driver_id in hub(api).sockets and not alive.closed
    await mute.close()
    await alive.close()


@pytest.mark.timeout(300)
async def test_a_client_that_never_reads_is_cut_off_and_others_keep_flowing(
    make_settings: Callable[..., ResolvedSettings],
    start_api: Callable[[ResolvedSettings], Any],
    session: aiohttp.ClientSession,
    pg_pool: asyncpg.Pool,
) -> None:
    # A long heartbeat: the cut-off must come from the full queue, not the ping timeout.
    api: Api = await start_api(make_settings(event_heartbeat_s=120))
    slow, *others = await registered(api, 21)
    watchers = await connect(session, [api], others)
    # This client never calls receive(): its reader fills and it stops reading the socket.
    stuck = await session.ws_connect(
        base(api) + events_path(slow.driver_id), headers=slow.auth
    )
    pad = "x" * 8000
    baseline: list[float] = []
    during: list[float] = []
    slow_stalled_when_others_got: list[bool] = []

    async def tick(n: int) -> None:
        async with pg_pool.acquire() as conn, conn.transaction():
            for d in others:
                await append_driver_event(
                    conn, d.driver_id, "offer.expired", {"offerId": f"t{n}"}
                )

    for n in range(5):
        await tick(n)
        await wait_all(watchers, seqs_reach(n + 1), within_s=30)
    baseline = [s for w in watchers for s in w.latencies]

    flooded = 0
    started = time.monotonic()
    n = 5
    while slow.driver_id in hub(api).sockets:
        assert time.monotonic() - started < 120, (
            "the client that never reads was not cut off"
        )
        async with pg_pool.acquire() as conn, conn.transaction():
            for _ in range(50):
                await append_driver_event(
                    conn,
                    slow.driver_id,
                    "offer.created",
                    {"offerId": f"f{flooded}", "pad": pad},
                )
                flooded += 1
        before = [len(w.latencies) for w in watchers]
        await tick(n)
        n += 1
        await wait_all(watchers, seqs_reach(n), within_s=30)
        sub = hub(api).sockets.get(slow.driver_id)
        slow_stalled_when_others_got.append(sub is not None and sub.in_send)
        during.extend(
            s for w, b in zip(watchers, before, strict=True) for s in w.latencies[b:]
        )
    print(
        f"\ncut off after {flooded} events of 8 KB; others before: {percentiles(baseline)}, "
        f"while it stalled: {percentiles(during)}"
    )
    # Others got their events while the slow socket's writer sat blocked.
    assert any(slow_stalled_when_others_got)
    closes = {
        s.labels["code"]: s.value
        for s in next(iter(hub(api).metrics.closes.collect())).samples
        if s.name.endswith("_total")
    }
    assert closes.get(str(CLOSE_TRY_AGAIN)) == 1

    # Reading now: everything queued before the cut, in order from 1, then the 1013 close.
    got: list[int] = []
    async for msg in stuck:
        if msg.type is aiohttp.WSMsgType.TEXT:
            got.append(json.loads(msg.data)["seq"])
    assert stuck.close_code == CLOSE_TRY_AGAIN
    assert got == list(range(1, len(got) + 1)) and len(got) < flooded
    # It resumes from its cursor and gets the rest, once each.
    resumed = await watch(session, base(api), slow, after=got[-1])
    await resumed.wait_for(lambda w: len(w.seqs) == flooded - len(got), within_s=60)
    assert resumed.seqs == list(range(len(got) + 1, flooded + 1))
    assert QUEUE_MAX == 64
    await resumed.close()
    await asyncio.gather(*(w.close() for w in watchers))
