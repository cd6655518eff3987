"""WebhookSender against real PostgreSQL and a real HTTP receiver verifying every signature."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from dispatcher.store.outbox import EVENT_TYPES, build_body, enqueue
from dispatcher.webhooks.sender import WebhookSender, parse_retry_after
from dispatcher.webhooks.signing import new_secret
from tests.support.waits import wait_until
from tests.support.webhooks import WebhookReceiver

pytestmark = pytest.mark.integration

# Fast enough for tests, still four attempts with growing delays.
FAST_SCHEDULE = (0, 0.2, 0.4, 0.8)
POLL_S = 0.05
# A delivery this soon with a 60 s poll interval came from a NOTIFY (half the poll: room
# for a machine three times slower, none for a poll).
NOTIFY_WITHIN_S = 30.0


StartReceiver = Callable[..., Awaitable[WebhookReceiver]]
MakePool = Callable[..., Awaitable[asyncpg.Pool]]


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
async def start_receiver(secret: str) -> AsyncIterator[StartReceiver]:
    started: list[WebhookReceiver] = []

    async def start(port: int = 0) -> WebhookReceiver:
        receiver = WebhookReceiver(secret, port=port)
        await receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


@pytest.fixture
async def receiver(start_receiver: StartReceiver) -> WebhookReceiver:
    return await start_receiver()


@pytest.fixture
async def make_pool(pg_dsn: str, pg_pool: asyncpg.Pool) -> AsyncIterator[MakePool]:
    """Extra pools from the shared DSN: one per simulated ingress replica.

    Depends on pg_pool for its teardown, which empties the tables after the test.
    """
    pools: list[asyncpg.Pool] = []

    async def make(name: str = "webhook-test") -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            pg_dsn,
            min_size=1,
            max_size=4,
            server_settings={"application_name": name},
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


def make_sender(
    pool: asyncpg.Pool, url: str | None, secret: str, **overrides: Any
) -> WebhookSender:
    options: dict[str, Any] = {
        "schedule_s": FAST_SCHEDULE,
        "timeout_s": 2.0,
        "poll_interval_s": POLL_S,
    }
    options.update(overrides)
    return WebhookSender(pool, url=url, secret=secret, **options)


@contextlib.asynccontextmanager
async def running(*senders: WebhookSender) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in senders]
    try:
        yield
        for task in tasks:
            assert not task.done(), "sender stopped on its own"
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        assert isinstance(result, asyncio.CancelledError), result


async def add_events(pool: asyncpg.Pool, count: int = 1) -> list[str]:
    ids = []
    for n in range(count):
        order = f"SO-{n + 1}"
        async with pool.acquire() as conn, conn.transaction():
            ids.append(
                await enqueue(
                    conn,
                    event_type="delivery.assigned",
                    seller_order_id=order,
                    data={
                        "sellerOrderId": order,
                        "driverId": "d-1",
                        "assignmentId": f"a-{n}",
                        "distanceKm": 0.84,
                        "sequence": 1,
                    },
                )
            )
    return ids


async def outbox_row(pool: asyncpg.Pool, webhook_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM webhook_outbox WHERE webhook_id = $1", webhook_id
    )
    assert row is not None
    return row


def delivered(pool: asyncpg.Pool, webhook_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await outbox_row(pool, webhook_id))["delivered_at"] is not None

    return check


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_delivered_once_with_valid_signature_and_stored_body(
    pg_pool: asyncpg.Pool, receiver: WebhookReceiver, secret: str
) -> None:
    [webhook_id] = await add_events(pg_pool)
    sender = make_sender(pg_pool, receiver.url, secret)
    async with running(sender):
        await wait_until(delivered(pg_pool, webhook_id))
        await asyncio.sleep(0.3)  # several polls: nothing is sent twice

    row = await outbox_row(pg_pool, webhook_id)
    assert receiver.rejected == 0
    [hit] = receiver.attempts
    assert hit.webhook_id == webhook_id
    assert hit.raw == row["body"].encode()
    assert hit.content_type == "application/json"
    assert row["attempts"] == 1
    assert row["last_status"] == 204
    assert row["failed_at"] is None
    assert await sender.pending_count() == 0
    payload = hit.body
    assert list(payload) == ["type", "timestamp", "data"]
    assert payload["type"] == "delivery.assigned"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", payload["timestamp"])
    assert payload["data"]["sellerOrderId"] == "SO-1"


async def test_retried_after_500s_with_same_id_and_body(
    pg_pool: asyncpg.Pool, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.script = [500, 500]
    [webhook_id] = await add_events(pg_pool)
    async with running(make_sender(pg_pool, receiver.url, secret)):
        await wait_until(delivered(pg_pool, webhook_id))

    hits = receiver.hook_attempts()
    assert len(hits) == 3
    assert {h.webhook_id for h in hits} == {webhook_id}
    assert len({h.raw for h in hits}) == 1
    # Schedule delays 0.2 s then 0.4 s, each at least 80 % after jitter.
    assert hits[1].at - hits[0].at >= 0.2 * 0.8 - 0.02
    assert hits[2].at - hits[1].at >= 0.4 * 0.8 - 0.02
    row = await outbox_row(pg_pool, webhook_id)
    assert row["attempts"] == 3
    assert row["last_status"] == 204
    assert row["last_error"] is None


async def test_retry_after_is_honoured(
    pg_pool: asyncpg.Pool, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.script = [(429, {"Retry-After": "1"})]
    [webhook_id] = await add_events(pg_pool)
    async with running(make_sender(pg_pool, receiver.url, secret)):
        await wait_until(lambda: _has_attempts(pg_pool, webhook_id, 1))
        row = await outbox_row(pg_pool, webhook_id)
        assert row["last_status"] == 429
        assert row["next_attempt_at"] - datetime.now(UTC) > timedelta(seconds=0.7)
        await wait_until(delivered(pg_pool, webhook_id))

    first, second = receiver.hook_attempts()
    assert second.at - first.at >= 0.95
    assert (await outbox_row(pg_pool, webhook_id))["last_status"] == 204


async def _has_attempts(pool: asyncpg.Pool, webhook_id: str, attempts: int) -> bool:
    return bool((await outbox_row(pool, webhook_id))["attempts"] >= attempts)


async def test_410_disables_endpoint_and_keeps_events(
    pg_pool: asyncpg.Pool, start_receiver: StartReceiver, secret: str
) -> None:
    gone = await start_receiver()
    gone.answer = 410
    [first] = await add_events(pg_pool)
    sender = make_sender(pg_pool, gone.url, secret)
    async with running(sender):
        await wait_until(sender.endpoint_disabled)
        [second] = await add_events(pg_pool)
        await asyncio.sleep(0.5)  # ten polls: nothing more goes to the gone endpoint

    assert len(gone.hook_attempts()) == 1
    assert await sender.pending_count() == 2
    for webhook_id in (first, second):
        row = await outbox_row(pg_pool, webhook_id)
        assert row["delivered_at"] is None
        assert row["failed_at"] is None
    endpoint = await pg_pool.fetchrow(
        "SELECT * FROM webhook_endpoints WHERE url = $1", gone.url
    )
    assert endpoint is not None
    assert endpoint["disabled_at"] is not None
    assert endpoint["disabled_reason"]

    # The operator points the service at a new URL: the kept events go there.
    new = await start_receiver()
    other = make_sender(pg_pool, new.url, secret)
    assert not await other.endpoint_disabled()
    async with running(other):
        await wait_until(delivered(pg_pool, first))
        await wait_until(delivered(pg_pool, second))
    assert {h.webhook_id for h in new.hook_attempts()} == {first, second}
    assert len(gone.hook_attempts()) == 1


async def test_receiver_down_then_up(
    pg_pool: asyncpg.Pool, start_receiver: StartReceiver, secret: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks"
    [webhook_id] = await add_events(pg_pool)
    sender = make_sender(pg_pool, url, secret, schedule_s=(0,) + (0.2,) * 20)
    async with running(sender):
        await wait_until(lambda: _has_attempts(pg_pool, webhook_id, 2))
        row = await outbox_row(pg_pool, webhook_id)
        assert row["last_status"] is None
        assert row["last_error"]
        receiver = await start_receiver(port)
        await wait_until(delivered(pg_pool, webhook_id))

    [hit] = receiver.attempts
    assert hit.webhook_id == webhook_id
    assert receiver.rejected == 0


async def test_two_senders_deliver_each_event_exactly_once(
    make_pool: MakePool, receiver: WebhookReceiver, secret: str
) -> None:
    pool_a, pool_b = await make_pool(), await make_pool()
    ids = await add_events(pool_a, 50)
    # Small batches and a slightly slow receiver so both replicas claim work at once.
    receiver.delay_s = 0.01
    senders = [
        make_sender(pool, receiver.url, secret, batch_size=5, concurrency=4)
        for pool in (pool_a, pool_b)
    ]
    async with running(*senders):
        await wait_until(lambda: _none_pending(senders[0]))
        await asyncio.sleep(0.3)

    hits = receiver.hook_attempts()
    assert receiver.rejected == 0
    assert sorted(h.webhook_id for h in hits) == sorted(ids)
    assert len(hits) == 50
    total = await pool_a.fetchval("SELECT sum(attempts) FROM webhook_outbox")
    assert total == 50


async def _none_pending(sender: WebhookSender) -> bool:
    return await sender.pending_count() == 0


async def test_redirect_is_not_followed(
    pg_pool: asyncpg.Pool, receiver: WebhookReceiver, secret: str
) -> None:
    moved = receiver.url.replace("/hooks", "/moved")
    receiver.answer = (302, {"Location": moved})
    [webhook_id] = await add_events(pg_pool)
    async with running(
        make_sender(pg_pool, receiver.url, secret, schedule_s=(0, 0.1, 0.1))
    ):
        await wait_until(lambda: _failed(pg_pool, webhook_id))
        await asyncio.sleep(0.2)

    assert [h.path for h in receiver.attempts] == ["/hooks"] * 3
    row = await outbox_row(pg_pool, webhook_id)
    assert row["last_status"] == 302
    assert row["attempts"] == 3
    assert row["delivered_at"] is None


async def _failed(pool: asyncpg.Pool, webhook_id: str) -> bool:
    return (await outbox_row(pool, webhook_id))["failed_at"] is not None


async def test_exhausted_schedule_marks_failed_and_keeps_row(
    pg_pool: asyncpg.Pool, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.answer = 503
    [webhook_id] = await add_events(pg_pool)
    sender = make_sender(pg_pool, receiver.url, secret)
    async with running(sender):
        await wait_until(lambda: _failed(pg_pool, webhook_id))
        await asyncio.sleep(0.3)

    assert len(receiver.attempts) == len(FAST_SCHEDULE)
    row = await outbox_row(pg_pool, webhook_id)
    assert row["attempts"] == len(FAST_SCHEDULE)
    assert row["last_status"] == 503
    assert row["delivered_at"] is None
    assert await sender.pending_count() == 0


async def test_no_url_sends_nothing(pg_pool: asyncpg.Pool, secret: str) -> None:
    [webhook_id] = await add_events(pg_pool)
    sender = make_sender(pg_pool, None, secret)
    async with running(sender):
        await asyncio.sleep(0.3)
    row = await outbox_row(pg_pool, webhook_id)
    assert row["attempts"] == 0
    assert await sender.pending_count() == 1
    assert not await sender.endpoint_disabled()


async def test_notify_wakes_sender_before_the_poll(
    pg_pool: asyncpg.Pool, receiver: WebhookReceiver, secret: str
) -> None:
    sender = make_sender(pg_pool, receiver.url, secret, poll_interval_s=60)
    async with running(sender):
        await asyncio.sleep(0.3)  # first (empty) poll done, now waiting 60 s
        [webhook_id] = await add_events(pg_pool)
        # Well under the 60 s poll: only the NOTIFY can deliver it in time.
        await wait_until(delivered(pg_pool, webhook_id), within_s=NOTIFY_WITHIN_S)


async def test_crash_mid_send_is_retried_after_the_lease(
    pg_pool: asyncpg.Pool, receiver: WebhookReceiver, secret: str
) -> None:
    receiver.hold()
    [webhook_id] = await add_events(pg_pool)
    options = {"timeout_s": 0.5, "batch_size": 1, "concurrency": 1}
    async with running(make_sender(pg_pool, receiver.url, secret, **options)):
        await wait_until(lambda: _hook_hit_count(receiver, 1))
    # The sender died mid-request: the row is leased, not lost, not counted.
    row = await outbox_row(pg_pool, webhook_id)
    assert row["delivered_at"] is None
    assert row["attempts"] == 0
    assert row["next_attempt_at"] > datetime.now(UTC)
    receiver.release()

    async with running(make_sender(pg_pool, receiver.url, secret, **options)):
        await wait_until(delivered(pg_pool, webhook_id))
    assert [h.webhook_id for h in receiver.hook_attempts()] == [webhook_id] * 2


async def _hook_hit_count(receiver: WebhookReceiver, count: int) -> bool:
    return len(receiver.hook_attempts()) >= count


async def test_listen_comes_back_after_connections_are_killed(
    make_pool: MakePool, pg_pool: asyncpg.Pool, receiver: WebhookReceiver, secret: str
) -> None:
    # A 60 s poll: only NOTIFY on a re-established LISTEN can deliver within seconds.
    sender_pool = await make_pool("webhook-test-killed")
    sender = make_sender(sender_pool, receiver.url, secret, poll_interval_s=60)
    async with running(sender):
        await asyncio.sleep(0.3)
        killed = await pg_pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'webhook-test-killed'"
        )
        assert killed >= 1
        await asyncio.sleep(1.0)  # the listener's first reconnect is after 0.5 s
        [webhook_id] = await add_events(pg_pool)
        await wait_until(delivered(pg_pool, webhook_id), within_s=NOTIFY_WITHIN_S)


async def test_postgres_down_does_not_stop_the_sender(secret: str) -> None:
    pool = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{free_port()}/none", min_size=0, max_size=1
    )
    try:
        sender = make_sender(pool, "http://127.0.0.1:9/hook", secret, pg_timeout_s=0.5)
        async with running(sender):
            await asyncio.sleep(1.0)
        with pytest.raises(OSError):
            await sender.pending_count()
    finally:
        await pool.close()


def test_build_body_is_compact_rfc3339_utc() -> None:
    # Any aware datetime is rendered in UTC, to the second.
    now = datetime(2026, 11, 21, 11, 0, 0, 123456, tzinfo=UTC).astimezone(
        timezone(timedelta(hours=1))
    )
    body = build_body(
        "delivery.assigned", {"sellerOrderId": "SO-1001", "sequence": 1}, now
    )
    assert body == (
        '{"type":"delivery.assigned","timestamp":"2026-11-21T11:00:00Z",'
        '"data":{"sellerOrderId":"SO-1001","sequence":1}}'
    )
    # The five delivery steps, and delivery.unassigned of the offer modes.
    assert len(EVENT_TYPES) == 6
    with pytest.raises(ValueError):
        build_body("delivery.teleported", {}, now)
    with pytest.raises(ValueError):
        build_body("delivery.assigned", {}, datetime(2026, 1, 1))


def test_parse_retry_after() -> None:
    now = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after("Sat, 21 Nov 2026 10:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Sat, 21 Nov 2026 09:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("-5", now=now) is None
    assert parse_retry_after(None, now=now) is None
