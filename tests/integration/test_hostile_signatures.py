"""Signed events, beyond test_routes_events: replays, forged cancels, exact bytes, rotation."""

from __future__ import annotations

import functools
import hmac
import json
import time
import types
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.config import ResolvedSettings
from dispatcher.webhooks import signing
from dispatcher.webhooks.signing import new_secret, sign
from tests.fuzz.state import assert_unchanged, problem, settled, snapshot
from tests.support import BERLIN, Api, Driver, WebhookReceiver, offset, with_headers

pytestmark = pytest.mark.integration

READY = "/events/seller-order-ready"
CANCELLED = "/events/seller-order-cancelled"
TOLERANCE_S = 300


def clock_at(monkeypatch: pytest.MonkeyPatch, shift_s: float) -> None:
    """The verifier's clock, `shift_s` seconds ahead of the real one."""
    real = time.time
    monkeypatch.setattr(
        signing, "time", types.SimpleNamespace(time=lambda: real() + shift_s)
    )


async def assigned(api: Api, seller_order_id: str) -> Driver:
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.1), name=seller_order_id)
    resp = await api.order(seller_order_id, *BERLIN)
    assert (await resp.json())["driverId"] == driver.driver_id
    return driver


async def test_an_event_replayed_after_300_s_is_refused_and_writes_nothing(
    api: Api,
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same bytes and headers that were accepted: within 300 s a replay is answered
    (idempotent), after 300 s it is 401. A cancel captured and held back is refused too."""
    await assigned(api, "SO-keep")
    raw = json.dumps(
        {"sellerOrderId": "SO-replay", "pickupLat": BERLIN[0], "pickupLon": BERLIN[1]}
    ).encode()
    headers = api.signed_headers(raw)
    first = await api.client.post(READY, data=raw, headers=headers)
    assert first.status == 200 and (await first.json())["assigned"] is False
    cancel_raw = b'{"sellerOrderId": "SO-keep"}'
    held_cancel = api.signed_headers(cancel_raw)
    await settled(pg_pool, receiver)
    before = await snapshot(pg_pool, redis_client)

    clock_at(monkeypatch, TOLERANCE_S - 5)
    within = await api.client.post(READY, data=raw, headers=headers)
    assert within.status == 200, await within.text()

    clock_at(monkeypatch, TOLERANCE_S + 1)
    for path, body, sent in (
        (READY, raw, headers),
        (CANCELLED, cancel_raw, held_cancel),
    ):
        body_json = await problem(
            await api.client.post(path, data=body, headers=sent), {401}
        )
        assert "tolerance" in body_json["detail"]
    await assert_unchanged(before, pg_pool, redis_client)
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM deliveries WHERE seller_order_id = 'SO-keep'"
        )
        == "ASSIGNED"
    )


async def test_forged_cancels_of_an_assigned_order_are_401_and_change_nothing(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    """test_routes_events forges cancels only for an order that has no delivery; here
    every forgery targets a live delivery, which must stay ASSIGNED with its driver BUSY."""
    driver = await assigned(api, "SO-live")
    raw = b'{"sellerOrderId": "SO-live", "reason": "forged"}'
    good = api.signed_headers(raw)
    digest = good["webhook-signature"].removeprefix("v1,")
    ts = int(good["webhook-timestamp"])

    variant = functools.partial(with_headers, good)

    reserialized = json.dumps(json.loads(raw), separators=(",", ":")).encode()
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("no webhook-id", raw, variant(webhook_id=None)),
        ("no webhook-timestamp", raw, variant(webhook_timestamp=None)),
        ("no webhook-signature", raw, variant(webhook_signature=None)),
        ("malformed signature", raw, variant(webhook_signature="v1" + digest)),
        ("wrong key", raw, api.signed_headers(raw, secret=new_secret())),
        (
            "signed with the outgoing webhook secret",
            raw,
            api.signed_headers(raw, secret=api.settings.vendure_webhook_secret),
        ),
        ("one byte changed", raw.replace(b"forged", b"forgeD"), good),
        ("a trailing newline", raw + b"\n", good),
        ("the same JSON, re-serialized", reserialized, good),
        ("timestamp 301 s old", raw, api.signed_headers(raw, timestamp=ts - 301)),
        ("timestamp with a plus sign", raw, variant(webhook_timestamp=f"+{ts}")),
        (
            "timestamp in full-width digits",
            raw,
            variant(
                webhook_timestamp=str(ts).translate(
                    {ord(c): ord(c) + 0xFEE0 for c in "0123456789"}
                )
            ),
        ),
        ("timestamp as a float", raw, variant(webhook_timestamp=f"{ts}.0")),
        (
            "150 junk v1 entries",
            raw,
            variant(webhook_signature=" ".join([f"v1,{digest[:-4]}AAA="] * 150)),
        ),
        (
            "the digest of another message",
            raw,
            variant(
                webhook_signature=sign(
                    api.settings.inbound_secret, good["webhook-id"], ts, b"{}"
                )
            ),
        ),
    ]
    assert reserialized != raw
    await settled(pg_pool, receiver)
    before = await snapshot(pg_pool, redis_client)
    failures = []
    for label, body, headers in cases:
        resp = await api.client.post(CANCELLED, data=body, headers=headers)
        if resp.status != 401:
            failures.append(f"{label}: {resp.status} {await resp.text()}")
        else:
            await problem(resp, {401})
    assert failures == []
    await assert_unchanged(before, pg_pool, redis_client)
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "BUSY"
    )
    assert receiver.of_type("delivery.cancelled") == []

    # The genuine request, sent last, still works: 150 junk entries before it do not hide it.
    junk_then_valid = variant(
        webhook_signature=" ".join(
            [f"v1,{digest[:-4]}AAA="] * 150 + [good["webhook-signature"]]
        )
    )
    resp = await api.client.post(CANCELLED, data=raw, headers=junk_then_valid)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "CANCELLED"


async def test_key_rotation_both_entries_accepted_by_old_and_new_ingress(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    """During a rotation Vendure signs with both keys (two `v1,` entries). An ingress on
    the old key and one on the new key both accept it; after the switch, a message
    signed only with the retired key is refused."""
    old_key, new_key = new_secret(), new_secret()
    old_api: Api = await start_api(make_settings(inbound_secret=old_key))
    new_api: Api = await start_api(
        make_settings(inbound_secret=new_key, admin_token=old_api.settings.admin_token)
    )

    def both(raw: bytes, order: tuple[str, str]) -> dict[str, str]:
        headers = old_api.signed_headers(raw, secret=order[0])
        extra = sign(
            order[1], headers["webhook-id"], int(headers["webhook-timestamp"]), raw
        )
        return {
            **headers,
            "webhook-signature": f"{headers['webhook-signature']} {extra}",
        }

    for n, (api, order) in enumerate(
        [
            (old_api, (old_key, new_key)),
            (old_api, (new_key, old_key)),
            (new_api, (old_key, new_key)),
            (new_api, (new_key, old_key)),
        ]
    ):
        raw = json.dumps(
            {"sellerOrderId": f"SO-rot-{n}", "pickupLat": -33.86, "pickupLon": 151.21}
        ).encode()
        resp = await api.client.post(READY, data=raw, headers=both(raw, order))
        assert resp.status == 200, (n, await resp.text())

    raw = b'{"sellerOrderId": "SO-retired", "pickupLat": -33.86, "pickupLon": 151.21}'
    await problem(
        await new_api.client.post(
            READY, data=raw, headers=new_api.signed_headers(raw, secret=old_key)
        ),
        {401},
    )
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 0


async def test_comparisons_of_secrets_are_constant_time(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both the admin token and the signature digests go through hmac.compare_digest."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    admin = api.settings.admin_token.encode()

    resp = await api.client.get(
        "/zones", headers={"Authorization": "Bearer not-the-admin"}
    )
    await problem(resp, {401})
    assert (b"not-the-admin", admin) in calls
    assert (await api.client.get("/zones", headers=api.admin)).status == 200
    assert (admin, admin) in calls

    calls.clear()
    raw = b'{"sellerOrderId": "SO-ct", "pickupLat": -33.86, "pickupLon": 151.21}'
    headers = api.signed_headers(raw)
    assert (await api.client.post(READY, data=raw, headers=headers)).status == 200
    expected = signing.decode_secret(api.settings.inbound_secret)
    digest = hmac.new(
        expected,
        f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + raw,
        "sha256",
    ).digest()
    assert (digest, digest) in calls
