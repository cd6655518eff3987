"""Fault 2: PostgreSQL stopped under load: bounded 503s, nothing half-written, recovery by itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.api.keys import DISPATCHER
from dispatcher.api.service import SETTLE_TIMEOUT_S
from dispatcher.config import ResolvedSettings
from dispatcher.geo import haversine_km
from tests.faults.conftest import OwnServers
from tests.support import (
    BERLIN,
    PROBLEM_JSON,
    WAIT_CEILING_S,
    Api,
    Driver,
    WebhookReceiver,
    offset,
)
from tests.support.faults import (
    GEO_TOLERANCE_KM,
    assert_booking_invariants,
    dispatchable_by_zone,
    mirror_by_zone,
    mirror_diff,
    read_answer,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TTL_S = 600.0
DRIVERS = 12
NEW_ORDERS = 8
OUTAGE_S = 3.0
# What "bounded" means here: a careful client's own timeout is longer than this.
BOUND_S = 10.0


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: int
    seconds: float
    retry_after: str | None
    content_type: str
    body: bytes


@dataclass(frozen=True)
class PendingPing:
    driver: Driver
    lat: float
    lon: float
    recorded_at: datetime


async def timed(kind: str, request: Awaitable[Any]) -> Outcome:
    started = time.monotonic()
    status, body, headers = await read_answer(await request)
    return Outcome(
        kind,
        status,
        time.monotonic() - started,
        headers.get("Retry-After"),
        headers.get("Content-Type", ""),
        body,
    )


def pickup(order_id: str) -> tuple[float, float]:
    return offset(*BERLIN, 0.05 * int(order_id.split("-")[1]), 0)


@dataclass
class Outage:
    """What the clients saw while PostgreSQL was down."""

    outcomes: list[Outcome]
    # Per driver: its newest fix answered 503 (to send again) and newest answered 204
    # (written behind: the ingress must store it by itself once PostgreSQL is back).
    pending_pings: dict[str, PendingPing]
    acked_pings: dict[str, PendingPing]
    ping_statuses: dict[str, list[int]]
    mirror_seen: list[dict[str, dict[str, tuple[float, float]]]]


async def load_during_outage(
    api: Api,
    drivers: list[Driver],
    spots: list[tuple[float, float]],
    spare: Driver,
    redis: Redis,
) -> Outage:
    """Rounds of every kind of write, plus /ready, for OUTAGE_S; Redis sampled each round."""
    outage = Outage([], {}, {}, {}, [])
    stopped = time.monotonic()
    while time.monotonic() - stopped < OUTAGE_S:
        now = datetime.now(UTC)
        fixes = [
            PendingPing(d, *offset(lat, lon, 0.1, 0.1), now)
            for d, (lat, lon) in zip(drivers, spots, strict=True)
        ]
        pings = [
            timed("ping", api.ping(p.driver, p.lat, p.lon, recorded_at=p.recorded_at))
            for p in fixes
        ]
        batch: list[Awaitable[Outcome]] = [
            timed("order", api.order(f"NEW-{n}", *pickup(f"NEW-{n}")))
            for n in range(NEW_ORDERS)
        ]
        batch += [
            timed("status", api.set_status(spare, "OFFLINE")),
            timed("cancel", api.cancel("PRE-1")),
            timed(
                "picked-up",
                api.client.post(
                    "/deliveries/PRE-2/picked-up", json={}, headers=api.admin
                ),
            ),
            timed(
                "create-driver",
                api.client.post("/drivers", json={"name": "x"}, headers=api.admin),
            ),
            timed("ready", api.client.get("/ready")),
        ]
        answers = await asyncio.gather(*pings, *batch)
        for fix, answer in zip(fixes, answers, strict=False):
            outage.ping_statuses.setdefault(fix.driver.driver_id, []).append(
                answer.status
            )
            if answer.status == 204:
                outage.acked_pings[fix.driver.driver_id] = fix
            else:
                outage.pending_pings[fix.driver.driver_id] = fix
        # Acknowledged pings are checked on their own (check_acknowledged_pings).
        outage.outcomes += [
            a for a in answers if not (a.kind == "ping" and a.status == 204)
        ]
        outage.mirror_seen.append(await mirror_by_zone(redis))
        # Paced like phones (refusals are instant now), under the per-driver rate limit.
        await asyncio.sleep(0.2)
    return outage


def check_acknowledged_pings(statuses: dict[str, list[int]]) -> None:
    """Pings are written behind: a zone acknowledges fixes until its first flush fails,
    then answers 503 until PostgreSQL is back, never 204 again in between."""
    for driver_id, answers in statuses.items():
        first_refusal = answers.index(503) if 503 in answers else len(answers)
        assert first_refusal < len(answers), (
            f"{driver_id}: the outage never showed: {answers}"
        )
        assert set(answers[first_refusal:]) == {503}, (
            f"{driver_id}: 204 after a 503: {answers}"
        )
        assert first_refusal <= 1, (
            f"{driver_id}: acknowledged past the first flush: {answers}"
        )


def check_outage_answers(outcomes: list[Outcome]) -> float:
    """Every write, and /ready, answered 503 (with Retry-After, as a problem), fast."""
    by_kind: dict[str, float] = {}
    for o in outcomes:
        by_kind[o.kind] = max(by_kind.get(o.kind, 0.0), o.seconds)
    print(
        f"{len(outcomes)} requests during the outage; slowest answer per kind (s): {by_kind}"
    )
    wrong = [o for o in outcomes if o.status != 503]
    assert not wrong, [(o.kind, o.status, o.body[:200]) for o in wrong]
    for o in outcomes:
        if o.kind == "ready":
            assert json.loads(o.body)["postgres"] == "down"
            continue
        assert o.retry_after is not None and int(o.retry_after) > 0, o
        assert o.content_type.startswith(PROBLEM_JSON), o
        assert json.loads(o.body)["status"] == 503
    slowest = max(by_kind.values())
    assert slowest < BOUND_S
    return slowest


def check_mirror_had_nothing_new(
    before: dict[str, dict[str, tuple[float, float]]],
    seen: list[dict[str, dict[str, tuple[float, float]]]],
) -> None:
    """Nothing in Redis that PostgreSQL lacks: no moved driver, no new member."""
    for sample in seen:
        for zone, members in sample.items():
            for driver_id, at in members.items():
                assert driver_id in before.get(zone, {}), (zone, driver_id)
                assert (
                    haversine_km(*at, *before[zone][driver_id]) <= GEO_TOLERANCE_KM
                ), (driver_id, at)


async def vendure_retries_until_ok(
    api: Api, back: float
) -> tuple[dict[str, bytes], float]:
    """Retry every failed order until 200; returns the answers and when the first came."""
    first: dict[str, bytes] = {}
    first_ok: float | None = None
    for order_id in (f"NEW-{n}" for n in range(NEW_ORDERS)):
        while order_id not in first:
            status, body, _ = await read_answer(
                await api.order(order_id, *pickup(order_id))
            )
            if status == 200:
                first[order_id] = body
                first_ok = first_ok or time.monotonic() - back
                continue
            assert status == 503, body
            assert time.monotonic() - back < WAIT_CEILING_S, "no recovery in time"
            await asyncio.sleep(0.1)
    assert first_ok is not None
    return first, first_ok


async def test_postgres_stopped_then_back(
    start_api: Callable[[ResolvedSettings], Any],
    fault_settings: Callable[..., ResolvedSettings],
    fault_stack: OwnServers,
    own_pool: asyncpg.Pool,
    own_redis: Redis,
    scripted_receiver: WebhookReceiver,
    recovery: Callable[[str, float], None],
) -> None:
    api: Api = await start_api(fault_settings(heartbeat_ttl_s=TTL_S))
    spots = [offset(*BERLIN, 0.3 * (i % 4), 0.3 * (i // 4)) for i in range(DRIVERS)]
    drivers = list(
        await asyncio.gather(
            *(api.online_driver(*p, name=f"p{i}") for i, p in enumerate(spots))
        )
    )
    spare = await api.online_driver(*offset(*BERLIN, -2, -2), name="spare")
    for order_id in ("PRE-1", "PRE-2"):
        resp = await api.order(order_id, *BERLIN)
        assert resp.status == 200 and (await resp.json())["assigned"], await resp.text()
    before = await dispatchable_by_zone(own_pool, TTL_S)
    counts_before = await _counts(own_pool)

    # ---- PostgreSQL stops (a clean shutdown: clients are disconnected) ----------------
    await asyncio.to_thread(fault_stack.pg.stop, "fast")
    outage = await load_during_outage(api, drivers, spots, spare, own_redis)
    assert len(outage.mirror_seen) >= 2
    recovery("postgres_down_slowest_503", check_outage_answers(outage.outcomes))
    check_acknowledged_pings(outage.ping_statuses)
    check_mirror_had_nothing_new(before, outage.mirror_seen)

    # ---- PostgreSQL is back: no restart of the service -------------------------------
    await asyncio.to_thread(fault_stack.pg.start)
    back = time.monotonic()
    assert await _counts(own_pool) == counts_before, (
        "a failed write left something behind"
    )
    first, first_ok = await vendure_retries_until_ok(api, back)
    recovery("postgres_back_to_first_order_ok", first_ok)
    ready = await api.client.get("/ready")
    assert ready.status == 200 and (await ready.json())["postgres"] == "ok"

    # Vendure's further retries replay; each order has one delivery and one webhook.
    again = [o for o in first for _ in range(3)]
    replays = await asyncio.gather(*(api.order(o, *pickup(o)) for o in again))
    for order_id, resp in zip(again, replays, strict=True):
        status, body, headers = await read_answer(resp)
        assert (status, body, headers.get("Idempotent-Replayed")) == (
            200,
            first[order_id],
            "true",
        )
    assert all(json.loads(b)["assigned"] for b in first.values())

    # The fixes acknowledged before the outage showed were kept and are written now,
    # without anyone sending them again.
    async def acked_stored() -> bool:
        rows = await own_pool.fetch("SELECT id, location_recorded_at FROM drivers")
        stored = {r["id"]: r["location_recorded_at"] for r in rows}
        return all(stored[d] >= p.recorded_at for d, p in outage.acked_pings.items())

    await wait_until(
        acked_stored,
        within_s=WAIT_CEILING_S,
        what="acknowledged pings written after PostgreSQL came back",
    )
    print(
        f"{len(outage.acked_pings)} drivers' fixes acknowledged during the outage, all stored after it"
    )

    # The ingress takes pings again once its LISTEN connection is back (it retries
    # every second at most); the driver app retries its refused pings (same fix) and
    # now they are persisted.
    dispatcher = api.client.app[DISPATCHER]
    await wait_until(
        _database_up(dispatcher),
        within_s=WAIT_CEILING_S,
        what="the ingress seeing PostgreSQL back",
    )
    recovery("postgres_back_to_pings_accepted", time.monotonic() - back)
    for p in outage.pending_pings.values():
        resp = await api.ping(p.driver, p.lat, p.lon, recorded_at=p.recorded_at)
        assert resp.status == 204, await resp.text()
    rows = {
        r["id"]: r
        for r in await own_pool.fetch("SELECT id, lat, lon, status FROM drivers")
    }
    for p in outage.pending_pings.values():
        assert (
            haversine_km(
                rows[p.driver.driver_id]["lat"],
                rows[p.driver.driver_id]["lon"],
                p.lat,
                p.lon,
            )
            < 1e-6
        )
    assert rows[spare.driver_id]["status"] == "AVAILABLE", (
        "the failed status change must not have applied"
    )
    assert (await api.cancel("PRE-1")).status == 200
    assert (
        await api.client.post("/deliveries/PRE-2/picked-up", json={}, headers=api.admin)
    ).status == 200

    # Every event exactly once: PRE-1 assigned+cancelled, PRE-2 assigned+picked_up, NEW-* assigned.
    expected = 4 + NEW_ORDERS
    await wait_until(
        lambda: _delivered(scripted_receiver, expected),
        within_s=WAIT_CEILING_S,
        what="webhooks after PostgreSQL came back",
    )
    recovery("postgres_back_to_webhooks_drained", time.monotonic() - back)
    await asyncio.sleep(0.3)
    delivered = scripted_receiver.delivered()
    assert len(delivered) == expected and set(delivered.values()) == {1}, delivered
    per_order: dict[str, list[str]] = {}
    for event in scripted_receiver.bodies().values():
        per_order.setdefault(event["data"]["sellerOrderId"], []).append(event["type"])
    assert all(types.count("delivery.assigned") == 1 for types in per_order.values()), (
        per_order
    )
    assert sorted(per_order) == sorted(["PRE-1", "PRE-2", *first])

    await assert_booking_invariants(own_pool)
    assert await own_pool.fetchval("SELECT count(*) FROM deliveries") == 2 + NEW_ORDERS
    # The mirror followed PostgreSQL again (the sweeper rebuilt the zones it could not write).
    await wait_until(
        lambda: _mirror_ok(own_pool, own_redis),
        within_s=WAIT_CEILING_S,
        what="mirror equals PostgreSQL",
    )


async def _counts(pool: asyncpg.Pool) -> tuple[int, ...]:
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM deliveries), (SELECT count(*) FROM delivery_history),
                  (SELECT count(*) FROM webhook_outbox), (SELECT count(*) FROM drivers),
                  (SELECT count(*) FROM drivers WHERE status = 'BUSY')"""
    )
    assert row is not None
    return tuple(row)


async def _delivered(receiver: WebhookReceiver, n: int) -> bool:
    return len(receiver.delivered()) >= n


async def _mirror_ok(pool: asyncpg.Pool, redis: Redis) -> bool:
    return await mirror_diff(pool, redis, TTL_S) == []


def _pg_processes(postmaster: int) -> list[int]:
    """The postmaster and its children (backends, checkpointer, ...)."""
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) == postmaster:
                    pids.append(int(entry.name))
    return pids


async def test_postgres_frozen_answers_503_in_bounded_time(
    start_api: Callable[[ResolvedSettings], Any],
    fault_settings: Callable[..., ResolvedSettings],
    fault_stack: OwnServers,
    own_pool: asyncpg.Pool,
    recovery: Callable[[str, float], None],
) -> None:
    """A hung server (SIGSTOP: accepts TCP, never answers) is the case timeouts exist for."""
    api: Api = await start_api(fault_settings(heartbeat_ttl_s=TTL_S))
    drivers = list(
        await asyncio.gather(
            *(
                api.online_driver(*offset(*BERLIN, 0.2 * i, 0), name=f"f{i}")
                for i in range(4)
            )
        )
    )
    # The status change goes to a driver that sends no fix in the batch: its `503` is a
    # timeout, and the UPDATE it sent may still commit when PostgreSQL is thawed, after
    # which that driver's queued fix would be refused as `inactive`, rightly.
    went_offline = await api.online_driver(*offset(*BERLIN, 1.0, 0), name="off")
    postmaster = fault_stack.pg.pid
    assert postmaster is not None
    frozen = _pg_processes(postmaster)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        batch: list[Awaitable[Outcome]] = [
            timed("order", api.order(f"FZ-{n}", *offset(*BERLIN, 0.05 * n, 0)))
            for n in range(3)
        ]
        # Raw pings: Api.ping would wait for the write (settle), which is hung too.
        fixes = [offset(*BERLIN, 0.2 * i, 0.05) for i in range(len(drivers))]
        at = datetime.now(UTC)
        batch += [
            timed(
                "ping",
                api.client.patch(
                    f"/drivers/{d.driver_id}/location",
                    json={"lat": p[0], "lon": p[1], "recordedAt": at.isoformat()},
                    headers=d.auth,
                ),
            )
            for d, p in zip(drivers, fixes, strict=True)
        ]
        batch += [
            timed("status", api.set_status(went_offline, "OFFLINE")),
            timed(
                "create-driver",
                api.client.post("/drivers", json={"name": "x"}, headers=api.admin),
            ),
            timed("ready", api.client.get("/ready")),
        ]
        outcomes = await asyncio.gather(*batch)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    by_kind: dict[str, tuple[int, float]] = {}
    for o in outcomes:
        by_kind[o.kind] = (o.status, max(by_kind.get(o.kind, (0, 0.0))[1], o.seconds))
    print(f"frozen PostgreSQL, (status, slowest s) per kind: {by_kind}")
    slowest = max(o.seconds for o in outcomes)
    recovery("postgres_frozen_slowest_503", slowest)
    # Pings are written behind: those sent before any flush failed are acknowledged
    # (and stored after the thaw, below); every other write is refused.
    acked = [o for o in outcomes if o.kind == "ping" and o.status == 204]
    refused = [o for o in outcomes if o not in acked]
    assert [o.status for o in refused] == [503] * len(refused), [
        (o.kind, o.status, o.body[:200]) for o in refused
    ]
    assert all(o.retry_after is not None for o in refused if o.kind != "ready")
    # Writes in the ingress: pool acquire (3 s) + statement timeout (5 s). Orders wait
    # for the pings queued before them (at most SETTLE_TIMEOUT_S), then queue behind
    # them in the zone actor, so the ingress's actor-call timeout bounds the rest.
    assert slowest < SETTLE_TIMEOUT_S + api.settings.actor_call_timeout_s + 1.0, by_kind

    # Thawed: the service answers again by itself.
    async def order_ok() -> bool:
        status, _, _ = await read_answer(await api.order("FZ-0", *BERLIN))
        return status == 200

    recovery(
        "postgres_thawed_to_first_order_ok",
        await wait_until(order_ok, within_s=WAIT_CEILING_S, interval_s=0.1),
    )
    await assert_booking_invariants(own_pool)
    # A flush that failed keeps its fixes and retries them with backoff (up to 2 s
    # apart), and `settle` counts the failed attempt as attempted: under the CPU hog the
    # first read came before the retry landed. The promise is that they are stored.
    acked_fixes = {
        d.driver_id: fix
        for d, fix, outcome in zip(drivers, fixes, outcomes[3:], strict=False)
        if outcome in acked
    }

    async def acked_fixes_stored() -> bool:
        await api.settle()
        rows = await own_pool.fetch(
            "SELECT id, lat, lon FROM drivers WHERE id = ANY($1::text[])",
            list(acked_fixes),
        )
        stored = {r["id"]: (r["lat"], r["lon"]) for r in rows}
        return all(
            d in stored and haversine_km(*stored[d], *fix) < 1e-6
            for d, fix in acked_fixes.items()
        )

    await wait_until(
        acked_fixes_stored,
        within_s=WAIT_CEILING_S,
        interval_s=0.2,
        what="every acknowledged fix stored",
    )
    status = await own_pool.fetchval(
        "SELECT status FROM drivers WHERE id = $1", went_offline.driver_id
    )
    print(f"status change answered 503; the driver is {status} after the thaw")


async def test_gateway_batch_pings_during_outage_are_retryable(
    start_api: Callable[[ResolvedSettings], Any],
    fault_settings: Callable[..., ResolvedSettings],
    fault_stack: OwnServers,
    own_pool: asyncpg.Pool,
) -> None:
    """docs/API.md#errors: a write PostgreSQL cannot take answers 503 + Retry-After. A stopped
    PostgreSQL closes the ingress's LISTEN connection, so the ingress knows at once and
    a gateway's batch must say "retry" (503), not 200, and nothing of it is stored.
    (Fixes acknowledged before an outage showed, as with a hung server, are stored
    afterwards: test_postgres_frozen_answers_503_in_bounded_time.)"""
    api: Api = await start_api(fault_settings(heartbeat_ttl_s=TTL_S))
    drivers = [
        await api.online_driver(*offset(*BERLIN, 0.2 * n, 0), name=f"g{n}")
        for n in range(3)
    ]
    now = datetime.now(UTC)
    batch = {
        "pings": [
            {
                "driverId": d.driver_id,
                "lat": lat,
                "lon": lon,
                "recordedAt": now.isoformat(),
            }
            for n, d in enumerate(drivers)
            for lat, lon in [offset(*BERLIN, 0.2 * n, 0.1)]
        ]
    }
    dispatcher = api.client.app[DISPATCHER]
    await asyncio.to_thread(fault_stack.pg.stop, "fast")
    try:
        started = time.monotonic()
        status, body, headers = await read_answer(
            await api.client.post("/drivers/locations", json=batch, headers=api.admin)
        )
        took = time.monotonic() - started
        refused_at_once = not dispatcher.database_up
    finally:
        await asyncio.to_thread(fault_stack.pg.start)
    print(
        f"batch of {len(drivers)} pings with PostgreSQL down: {status} in {took:.2f} s: {body.decode()}"
    )
    assert refused_at_once, "the ingress did not notice the stop before the batch"
    assert took < BOUND_S
    assert status == 503 and headers.get("Retry-After"), (
        f"a batch PostgreSQL could not take answered {status} without Retry-After: {body.decode()}"
    )

    # Back: the ingress listens again by itself and takes pings; the refused batch was
    # never queued, so nothing of it appears, and sent again it is stored.
    await wait_until(
        _database_up(dispatcher),
        within_s=WAIT_CEILING_S,
        what="the ingress seeing PostgreSQL back",
    )
    await api.settle()
    assert (
        await own_pool.fetchval(
            "SELECT count(*) FROM drivers WHERE location_recorded_at >= $1", now
        )
        == 0
    )
    again = await api.client.post("/drivers/locations", json=batch, headers=api.admin)
    assert again.status == 200 and await again.json() == {
        "accepted": len(drivers),
        "rejected": [],
    }
    await api.settle()
    assert await own_pool.fetchval(
        "SELECT count(*) FROM drivers WHERE location_recorded_at = $1", now
    ) == len(drivers)


def _database_up(dispatcher: Any) -> Callable[[], Awaitable[bool]]:
    async def up() -> bool:
        return bool(dispatcher.database_up)

    return up
