"""Fault 6: the webhook receiver is down, then 500, then 429 + Retry-After, then 410, then healthy."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from dispatcher.config import ResolvedSettings
from tests.support import BERLIN, Api, offset
from tests.support.faults import background, wait_until
from tests.support.webhooks import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 3
SCHEDULE_S = (0.0, 0.25, 0.5, *([1.0] * 20))
JITTER = 0.2
RETRY_AFTER_S = 2
# A POST timeout of 1 s makes a lease 1 x 7 + 5 = 12 s: far from any scheduled delay.
LEASE_S = 12.0
POLL_S = 0.02


@dataclass(frozen=True)
class Transition:
    """An outbox row right after an attempt was recorded."""

    attempts: int
    last_status: int | None
    # next_attempt_at minus the time we read the row; the write came at most `lag_s`
    # before that read (after the previous poll, which did not see it).
    delay_s: float
    lag_s: float


async def watch_outbox(
    pool: asyncpg.Pool, stop: asyncio.Event, log: dict[str, list[Transition]]
) -> None:
    seen: dict[str, int] = {}
    previous = time.monotonic()
    while not stop.is_set():
        started = time.monotonic()
        rows = await pool.fetch(
            """SELECT webhook_id, attempts, last_status,
                      extract(epoch FROM next_attempt_at - clock_timestamp())::float8 AS delay
               FROM webhook_outbox"""
        )
        lag = time.monotonic() - previous
        for r in rows:
            if r["attempts"] != seen.get(r["webhook_id"], 0):
                log.setdefault(r["webhook_id"], []).append(
                    Transition(r["attempts"], r["last_status"], r["delay"], lag)
                )
                seen[r["webhook_id"]] = r["attempts"]
        previous = started
        await asyncio.sleep(POLL_S)


def expected_delay(t: Transition) -> tuple[float, float]:
    """The window the next attempt must fall in after this one (schedule, jitter, header)."""
    scheduled = SCHEDULE_S[t.attempts]
    low, high = scheduled * (1 - JITTER), scheduled * (1 + JITTER)
    if t.last_status == 429:
        low, high = max(low, RETRY_AFTER_S), max(high, RETRY_AFTER_S)
    return low, high


async def test_receiver_down_500_429_410_then_recovered(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    scripted_receiver: WebhookReceiver,
    recovery: Callable[[str, float], None],
) -> None:
    hooks = scripted_receiver
    api: Api = await start_api(
        make_settings(
            vendure_webhook_url=hooks.url,
            vendure_webhook_secret=hooks.secret,
            webhook_schedule_s=SCHEDULE_S,
            webhook_timeout_s=1.0,
            heartbeat_ttl_s=600,
        )
    )
    drivers = [
        await api.online_driver(*offset(*BERLIN, 0.3 * n, 0), name=f"w{n}")
        for n in range(EVENTS)
    ]
    assert len(drivers) == EVENTS
    transitions: dict[str, list[Transition]] = {}
    stop = asyncio.Event()

    async def attempts_at_least(n: int) -> bool:
        rows = await pg_pool.fetch("SELECT attempts FROM webhook_outbox")
        return len(rows) == EVENTS and all(r["attempts"] >= n for r in rows)

    def receiver_saw(status: int, n: int) -> Callable[[], Any]:
        async def check() -> bool:
            counts = [
                sum(
                    1
                    for a in hooks.attempts
                    if a.webhook_id == i and a.status == status
                )
                for i in ids
            ]
            return len(counts) == EVENTS and min(counts) >= n

        return check

    async with background(watch_outbox(pg_pool, stop, transitions)):
        # ---- down: connection refused ------------------------------------------------
        await hooks.stop()
        for n in range(EVENTS):
            resp = await api.order(f"W-{n}", *offset(*BERLIN, 0.3 * n, 0.01))
            assert resp.status == 200 and (await resp.json())["assigned"]
        await wait_until(
            lambda: attempts_at_least(3), within_s=60, what="three refused attempts"
        )
        ids = [
            r["webhook_id"]
            for r in await pg_pool.fetch(
                "SELECT webhook_id FROM webhook_outbox ORDER BY id"
            )
        ]
        rows = await pg_pool.fetch("SELECT last_status, last_error FROM webhook_outbox")
        assert all(r["last_status"] is None and r["last_error"] for r in rows), rows

        # ---- up, answering 500 ------------------------------------------------------
        hooks.answer = (500, {})
        await hooks.start()
        await wait_until(receiver_saw(500, 2), within_s=60, what="two 500s each")

        # ---- 429 with Retry-After, then 410 ---------------------------------------------
        hooks.answer = (429, {"Retry-After": str(RETRY_AFTER_S)})
        await wait_until(receiver_saw(429, 1), within_s=60, what="a 429 each")
        hooks.answer = (410, {})
        await wait_until(_any_status(hooks, 410), within_s=60, what="a 410")
        first_gone = min(a.at for a in hooks.attempts if a.status == 410)
        await asyncio.sleep(1.5)
        late = [a for a in hooks.attempts if a.at > first_gone + 0.3]
        assert not late, f"attempts after 410 disabled the endpoint: {late}"
        ready = await (await api.client.get("/ready")).json()
        assert ready["webhooks"] == "disabled" and ready["outboxPending"] == EVENTS, (
            ready
        )
        endpoint = await pg_pool.fetchrow(
            "SELECT disabled_at FROM webhook_endpoints WHERE url = $1", hooks.url
        )
        assert endpoint is not None and endpoint["disabled_at"] is not None
        assert (
            await pg_pool.fetchval(
                "SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL AND failed_at IS NULL"
            )
            == EVENTS
        )

        # ---- recovered: the receiver works and an operator re-enables the endpoint -------
        hooks.answer = (204, {})
        await pg_pool.execute(
            "UPDATE webhook_endpoints SET disabled_at = NULL WHERE url = $1", hooks.url
        )
        enabled = time.monotonic()

        async def all_delivered() -> bool:
            return len(hooks.delivered()) >= EVENTS

        await wait_until(
            all_delivered, within_s=60, what="every event after re-enabling"
        )
        recovery(
            "webhook_endpoint_reenabled_to_all_delivered", time.monotonic() - enabled
        )
        await asyncio.sleep(0.5)
        stop.set()

    # Every event arrived exactly once, under the webhook-id it had from the start.
    delivered = hooks.delivered()
    assert set(delivered) == set(ids) and set(delivered.values()) == {1}, delivered
    final = {
        r["webhook_id"]: r for r in await pg_pool.fetch("SELECT * FROM webhook_outbox")
    }
    assert all(
        r["delivered_at"] is not None and r["failed_at"] is None for r in final.values()
    )
    for i in ids:
        at_receiver = len(hooks.times_of(i))
        refused = sum(1 for t in transitions[i] if t.last_status is None)
        print(
            f"{i}: {final[i]['attempts']} attempts ({refused} refused, {at_receiver} at the receiver)"
        )
        assert final[i]["attempts"] == refused + at_receiver
        assert [t.attempts for t in transitions[i]] == list(
            range(1, final[i]["attempts"] + 1)
        ), transitions[i]
    checked = check_recorded_delays(transitions)
    check_receiver_gaps(hooks, ids)
    print(
        f"transitions checked by last status: {checked}; {len(hooks.attempts)} attempts at the receiver"
    )


def check_recorded_delays(
    transitions: dict[str, list[Transition]],
) -> dict[int | None, int]:
    """Retries followed the schedule (±20 % jitter) and Retry-After, as PostgreSQL recorded them."""
    checked: dict[int | None, int] = {}
    for i, seen in transitions.items():
        for t in seen:
            if t.last_status in (410, 204) or t.delay_s > LEASE_S - 1:
                continue  # 410 hands the row back at once; a lease means we polled late
            low, high = expected_delay(t)
            # The true delay lies in [delay_s, delay_s + lag_s]; 10 ms for clock reads.
            assert t.delay_s + t.lag_s >= low - 0.01 and t.delay_s <= high + 0.01, (
                i,
                t,
                (low, high),
            )
            checked[t.last_status] = checked.get(t.last_status, 0) + 1
    assert (
        checked.get(None, 0) >= EVENTS
        and checked.get(500, 0) >= EVENTS
        and checked.get(429, 0) >= 1
    ), checked
    return checked


def check_receiver_gaps(hooks: WebhookReceiver, ids: list[str]) -> None:
    """As the receiver saw them: the attempt after a 429 waited for Retry-After."""
    for i in ids:
        for prev, nxt in itertools.pairwise(hooks.times_of(i)):
            gap = nxt.at - prev.at
            if prev.status == 429:
                assert gap >= RETRY_AFTER_S - 0.05, (i, gap)
            elif prev.status == 500:
                assert gap >= SCHEDULE_S[1] * (1 - JITTER) - 0.05, (i, gap)


def _any_status(hooks: WebhookReceiver, status: int) -> Callable[[], Any]:
    async def check() -> bool:
        return any(a.status == status for a in hooks.attempts)

    return check
