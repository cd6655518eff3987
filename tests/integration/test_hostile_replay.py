"""A signed event authorizes exactly one event: replays to another route, with another
body or another declared type are 401; a sender's retry (same id, route, body) passes."""

from __future__ import annotations

import json
import time

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.store.inbound_ids import EXPIRY_MARGIN_S, InboundIdStore
from dispatcher.webhooks.signing import sign
from tests.fuzz.state import assert_unchanged, problem, settled, snapshot
from tests.support import BERLIN, Api, Driver, WebhookReceiver, offset

pytestmark = pytest.mark.integration

READY = "/events/seller-order-ready"
CANCELLED = "/events/seller-order-cancelled"
TOLERANCE_S = 300


def resigned(
    api: Api, headers: dict[str, str], raw: bytes, timestamp: int
) -> dict[str, str]:
    """The same webhook-id with a new timestamp and signature: a Standard Webhooks retry."""
    signature = sign(api.settings.inbound_secret, headers["webhook-id"], timestamp, raw)
    return {
        **headers,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


async def busy_driver(
    api: Api, seller_order_id: str
) -> tuple[Driver, bytes, dict[str, str]]:
    """A driver assigned to `seller_order_id`, and the captured order-ready request."""
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.1), name=seller_order_id)
    raw = json.dumps(
        {
            "sellerOrderId": seller_order_id,
            "pickupLat": BERLIN[0],
            "pickupLon": BERLIN[1],
        }
    ).encode()
    headers = api.signed_headers(raw)
    resp = await api.client.post(READY, data=raw, headers=headers)
    assert (await resp.json())["driverId"] == driver.driver_id
    return driver, raw, headers


async def test_a_captured_order_ready_replayed_to_the_cancel_route_is_refused(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    """The outside campaign's forgery: the unchanged ready request (body and its three
    webhook-* headers) sent within 300 s to seller-order-cancelled cancelled the delivery
    and freed the driver. It must be 401 and change nothing, in either body shape."""
    driver, raw, headers = await busy_driver(api, "SO-captured")
    nested = json.dumps(
        {"sellerOrderId": "SO-captured", "pickup": {"lat": BERLIN[0], "lon": BERLIN[1]}}
    ).encode()
    nested_headers = api.signed_headers(nested)
    assert (
        await api.client.post(READY, data=nested, headers=nested_headers)
    ).status == 200
    await settled(pg_pool, receiver)
    before = await snapshot(pg_pool, redis_client)

    for body, sent in ((raw, headers), (nested, nested_headers)):
        await problem(await api.client.post(CANCELLED, data=body, headers=sent), {401})
    await assert_unchanged(before, pg_pool, redis_client)
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "BUSY"
    )
    assert receiver.of_type("delivery.cancelled") == []


async def test_the_same_id_on_another_route_or_with_another_body_is_refused(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    """The id binding on its own, for bodies the field rule lets through: a cancel body
    signed under an id that an order-ready already used is 401, and so is another body
    under an accepted cancel's id."""
    driver, _, ready_headers = await busy_driver(api, "SO-id")
    cancel = b'{"sellerOrderId": "SO-id"}'
    reused = resigned(api, ready_headers, cancel, int(time.time()))
    await settled(pg_pool, receiver)
    before = await snapshot(pg_pool, redis_client)
    await problem(await api.client.post(CANCELLED, data=cancel, headers=reused), {401})
    await assert_unchanged(before, pg_pool, redis_client)
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "BUSY"
    )

    fresh = api.signed_headers(cancel)
    assert (await api.client.post(CANCELLED, data=cancel, headers=fresh)).status == 200
    other_body = b'{"sellerOrderId": "SO-id", "reason": "changed"}'
    await problem(
        await api.client.post(
            CANCELLED,
            data=other_body,
            headers=resigned(api, fresh, other_body, int(time.time())),
        ),
        {401},
    )


async def test_a_vendure_retry_gets_the_byte_identical_answer(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    """Retries keep working: the exact request again, and the same id re-signed with a
    later timestamp (what a Standard Webhooks sender does), both replay the stored answer."""
    driver, raw, headers = await busy_driver(api, "SO-retry")
    first = await api.client.post(READY, data=raw, headers=headers)
    expected = await first.read()
    for sent in (headers, resigned(api, headers, raw, int(time.time()) + 2)):
        again = await api.client.post(READY, data=raw, headers=sent)
        assert again.status == 200
        assert await again.read() == expected
        assert again.headers["Idempotent-Replayed"] == "true"
    assert json.loads(expected)["driverId"] == driver.driver_id
    assert await pg_pool.fetchval("SELECT count(*) FROM inbound_webhooks") == 1
    await settled(pg_pool, receiver)
    assert len(receiver.of_type("delivery.assigned")) == 1
    cancel = b'{"sellerOrderId": "SO-retry"}'
    cancel_headers = api.signed_headers(cancel)
    for _ in range(2):
        assert (
            await api.client.post(CANCELLED, data=cancel, headers=cancel_headers)
        ).status == 200


async def test_a_declared_type_must_name_the_route(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    """A `type` field, when the sender includes one, binds the body to its route."""
    driver, _, _ = await busy_driver(api, "SO-typed")
    wrong = b'{"type": "seller-order-ready", "sellerOrderId": "SO-typed"}'
    await problem(await api.signed_post(CANCELLED, wrong), {401})
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "BUSY"
    )
    wrong_ready = json.dumps(
        {
            "type": "seller-order-cancelled",
            "sellerOrderId": "SO-other",
            "pickupLat": BERLIN[0],
            "pickupLon": BERLIN[1],
        }
    ).encode()
    await problem(await api.signed_post(READY, wrong_ready), {401})
    right = b'{"type": "seller-order-cancelled", "sellerOrderId": "SO-typed"}'
    resp = await api.signed_post(CANCELLED, right)
    assert resp.status == 200, await resp.text()
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "AVAILABLE"
    )


async def test_invalid_signed_bodies_record_no_id(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    """Bad input writes nothing, not even the id of its message."""
    await problem(await api.signed_post(READY, b'{"sellerOrderId": "SO-x"}'), {422})
    await problem(await api.signed_post(CANCELLED, b"[]"), {422})
    assert await pg_pool.fetchval("SELECT count(*) FROM inbound_webhooks") == 0


async def test_ids_are_kept_while_their_signature_could_verify_then_pruned(
    pg_pool: asyncpg.Pool,
) -> None:
    store = InboundIdStore(pg_pool, tolerance_s=TOLERANCE_S)
    now = int(time.time())
    assert await store.claim("msg_1", "seller-order-ready", b"{}", signed_at=now)
    assert await store.claim("msg_1", "seller-order-ready", b"{}", signed_at=now + 5)
    assert not await store.claim(
        "msg_1", "seller-order-cancelled", b"{}", signed_at=now
    )
    assert not await store.claim("msg_1", "seller-order-ready", b"{ }", signed_at=now)
    expires = await pg_pool.fetchval(
        "SELECT extract(epoch FROM expires_at) FROM inbound_webhooks"
    )
    assert int(expires) == now + 5 + TOLERANCE_S + EXPIRY_MARGIN_S
    # An id whose signed time is long past can no longer verify: its row is pruned.
    stale = InboundIdStore(pg_pool, tolerance_s=TOLERANCE_S)
    assert await stale.claim(
        "msg_old", "seller-order-ready", b"{}", signed_at=now - 3600
    )
    assert await stale.claim("msg_2", "seller-order-ready", b"{}", signed_at=now)
    fresh = InboundIdStore(pg_pool, tolerance_s=TOLERANCE_S)
    assert await fresh.claim("msg_3", "seller-order-ready", b"{}", signed_at=now)
    ids = {
        r["webhook_id"]
        for r in await pg_pool.fetch("SELECT webhook_id FROM inbound_webhooks")
    }
    assert ids == {"msg_1", "msg_2", "msg_3"}
