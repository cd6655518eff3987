"""Vendure's signed events over HTTP: body shapes, signatures, validation, 409/413, cancellation."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse
from redis.asyncio import Redis

from dispatcher.webhooks.signing import new_secret, sign
from dispatcher.zoning import Zoning
from tests.support import (
    BERLIN,
    Api,
    Driver,
    WebhookReceiver,
    geo_members,
    offset,
    problem,
    validation_problem,
    with_headers,
)

pytestmark = pytest.mark.integration

READY = "/events/seller-order-ready"
CANCELLED = "/events/seller-order-cancelled"
MAX_LAT = 85.05112878
MAX_BODY = 64 * 1024


async def driver_zone(pg_pool: asyncpg.Pool, driver: Driver) -> str:
    zone: str = await pg_pool.fetchval(
        "SELECT zone_id FROM drivers WHERE id = $1", driver.driver_id
    )
    return zone


async def count(pg_pool: asyncpg.Pool, table: str) -> int:
    value: int = await pg_pool.fetchval(f"SELECT count(*) FROM {table}")
    return value


async def assert_nothing_written(pg_pool: asyncpg.Pool) -> None:
    assert await count(pg_pool, "deliveries") == 0
    assert await count(pg_pool, "delivery_history") == 0
    assert await count(pg_pool, "webhook_outbox") == 0


async def post_raw(
    api: Api, path: str, raw: bytes, headers: dict[str, str]
) -> ClientResponse:
    resp: ClientResponse = await api.client.post(path, data=raw, headers=headers)
    return resp


def order_body(
    seller_order_id: str, lat: float = BERLIN[0], lon: float = BERLIN[1]
) -> bytes:
    return json.dumps(
        {"sellerOrderId": seller_order_id, "pickupLat": lat, "pickupLon": lon}
    ).encode()


async def test_both_body_shapes_assign_ignore_unknown_fields_and_store_drop(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    near = await api.online_driver(*offset(*BERLIN, 0.2, 0.0), name="near")
    other = await api.online_driver(*offset(*BERLIN, 0.0, 0.6), name="other")

    flat = await api.order(
        "SO-flat", *BERLIN, channelId="default", somethingNew={"x": [1, 2]}, priority=3
    )
    assert flat.status == 200, await flat.text()
    flat_body = await flat.json()
    assert flat_body["assigned"] is True and flat_body["driverId"] == near.driver_id
    assert set(flat_body) == {
        "assigned",
        "sellerOrderId",
        "driverId",
        "assignmentId",
        "distanceKm",
        "zoneId",
    }

    drop = offset(*BERLIN, -1.5, 2.0)
    nested_payload = {
        "eventId": "e-1",
        "sellerOrderId": "SO-nested",
        "channelId": "default",
        "pickup": {"lat": BERLIN[0], "lon": BERLIN[1], "label": "shop"},
        "drop": {"lat": drop[0], "lon": drop[1]},
        "customer": {"name": "ignored"},
    }
    nested = await api.signed_post(READY, nested_payload)
    assert nested.status == 200, await nested.text()
    nested_body = await nested.json()
    assert (
        nested_body["assigned"] is True and nested_body["driverId"] == other.driver_id
    )
    assert nested_body["zoneId"] == Zoning(api.settings.zone_resolution).zone_of(
        *BERLIN
    )

    rows = {
        r["seller_order_id"]: r
        for r in await pg_pool.fetch(
            "SELECT * FROM deliveries ORDER BY seller_order_id"
        )
    }
    assert set(rows) == {"SO-flat", "SO-nested"}
    assert (rows["SO-flat"]["drop_lat"], rows["SO-flat"]["drop_lon"]) == (None, None)
    assert (rows["SO-flat"]["pickup_lat"], rows["SO-flat"]["pickup_lon"]) == BERLIN
    assert (rows["SO-nested"]["pickup_lat"], rows["SO-nested"]["pickup_lon"]) == BERLIN
    assert (
        rows["SO-nested"]["drop_lat"],
        rows["SO-nested"]["drop_lon"],
    ) == pytest.approx(drop)
    assert rows["SO-nested"]["assignment_id"] == nested_body["assignmentId"]

    # The drop is part of the delivery as the API shows it, too.
    view = await api.client.get("/deliveries/SO-nested", headers=api.admin)
    assert view.status == 200
    shown = await view.json()
    assert (shown["drop"]["lat"], shown["drop"]["lon"]) == pytest.approx(drop)
    assert (shown["pickup"]["lat"], shown["pickup"]["lon"]) == pytest.approx(BERLIN)


async def test_both_shapes_given_and_agreeing_are_one_pickup(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.online_driver(*offset(*BERLIN, 0.3, 0.3))
    payload = {
        "sellerOrderId": "SO-both",
        "pickupLat": BERLIN[0],
        "pickupLon": BERLIN[1],
        "pickup": {"lat": BERLIN[0], "lon": BERLIN[1]},
    }
    resp = await api.signed_post(READY, payload)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["driverId"] == driver.driver_id
    assert await count(pg_pool, "deliveries") == 1


async def test_boundary_values_are_accepted(api: Api, pg_pool: asyncpg.Pool) -> None:
    """Limits are inclusive: 128-character ids, ±85.05112878, ±180, integer coordinates."""
    cases: list[dict[str, Any]] = [
        {"sellerOrderId": "x" * 128, "pickupLat": 10.0, "pickupLon": 10.0},
        {"sellerOrderId": "ü" * 128, "pickupLat": 10.0, "pickupLon": 10.0},
        {"sellerOrderId": "edge-n", "pickupLat": MAX_LAT, "pickupLon": 180.0},
        {"sellerOrderId": "edge-s", "pickupLat": -MAX_LAT, "pickupLon": -180.0},
        {"sellerOrderId": "edge-nested", "pickup": {"lat": -MAX_LAT, "lon": 180}},
        {"sellerOrderId": "int-coords", "pickupLat": 10, "pickupLon": 20},
        {"sellerOrderId": "7", "pickupLat": 0, "pickupLon": 0},
    ]
    for payload in cases:
        resp = await api.signed_post(READY, payload)
        assert resp.status == 200, (payload["sellerOrderId"], await resp.text())
        assert await resp.json() == {
            "assigned": False,
            "sellerOrderId": payload["sellerOrderId"],
            "reason": "NO_DRIVER_AVAILABLE",
        }
    await assert_nothing_written(pg_pool)


async def test_every_signature_failure_is_401_and_writes_nothing(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.2))
    zone = await driver_zone(pg_pool, driver)
    raw = order_body("SO-sig")
    now = int(time.time())
    good = api.signed_headers(raw)
    valid_sig = good["webhook-signature"]
    digest = valid_sig.removeprefix("v1,")

    variant = functools.partial(with_headers, good)

    one_byte = bytearray(raw)
    one_byte[raw.index(b"SO-sig") + 3] = ord(
        "t"
    )  # "SO-sig" -> "SO-tig": still valid JSON
    old_ts, future_ts = now - 301, now + 302
    cases: list[tuple[str, bytes, dict[str, str]]] = [
        ("no webhook-id", raw, variant(webhook_id=None)),
        ("no webhook-timestamp", raw, variant(webhook_timestamp=None)),
        ("no webhook-signature", raw, variant(webhook_signature=None)),
        ("empty webhook-signature", raw, variant(webhook_signature="")),
        ("no comma", raw, variant(webhook_signature="v1" + digest)),
        ("garbage", raw, variant(webhook_signature="garbage")),
        ("undecodable", raw, variant(webhook_signature="v1,!!!not-base64!!!")),
        ("empty v1", raw, variant(webhook_signature="v1,")),
        ("right digest, wrong version", raw, variant(webhook_signature="v2," + digest)),
        ("wrong key", raw, api.signed_headers(raw, secret=new_secret())),
        ("body changed by one byte", bytes(one_byte), good),
        ("different webhook-id", raw, variant(webhook_id="evt_other")),
        ("timestamp not digits", raw, variant(webhook_timestamp="yesterday")),
        ("timestamp in ms", raw, variant(webhook_timestamp=str(now * 1000))),
        ("timestamp > 300 s old", raw, api.signed_headers(raw, timestamp=old_ts)),
        ("timestamp > 300 s ahead", raw, api.signed_headers(raw, timestamp=future_ts)),
    ]
    failures: list[str] = []
    for label, body, headers in cases:
        resp = await post_raw(api, READY, body, headers)
        if resp.status != 401:
            failures.append(f"{label}: {resp.status} {await resp.text()}")
            continue
        await problem(resp, 401)
    assert failures == []

    # The cancel route is guarded the same way.
    for headers in (
        variant(webhook_signature=None),
        api.signed_headers(raw, secret=new_secret()),
    ):
        await problem(
            await post_raw(api, CANCELLED, b'{"sellerOrderId": "SO-sig"}', headers), 401
        )

    await assert_nothing_written(pg_pool)
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "AVAILABLE"
    )
    assert driver.driver_id in await geo_members(redis_client, zone)
    await asyncio.sleep(0.3)
    assert receiver.received == []


async def test_valid_signature_among_several_entries_and_tolerated_skew_are_accepted(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.2))
    raw = order_body("SO-multi")
    headers = api.signed_headers(raw)
    valid = headers["webhook-signature"]
    wrong = sign(
        new_secret(), headers["webhook-id"], int(headers["webhook-timestamp"]), raw
    )
    junk = "v1," + base64.b64encode(b"\x00" * 32).decode()
    for signature in (
        f"{wrong} {valid}",
        f"{junk} {valid} v2,abc",
        f"v1,!!! {valid}",
        f"v1a,xyz {valid}",
    ):
        resp = await post_raw(
            api, READY, raw, {**headers, "webhook-signature": signature}
        )
        assert resp.status == 200, (signature, await resp.text())
        assert (await resp.json())["driverId"] == driver.driver_id
    assert await count(pg_pool, "deliveries") == 1

    # Within the 300 s tolerance on either side: accepted (the order was already assigned: replayed).
    now = int(time.time())
    for ts in (now - 290, now + 290):
        resp = await api.signed_post(READY, raw, timestamp=ts)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Idempotent-Replayed"] == "true"
    assert await count(pg_pool, "webhook_outbox") == 1


def _invalid_bodies() -> list[tuple[str, bytes]]:
    lat, lon = BERLIN

    def enc(payload: Any) -> bytes:
        return json.dumps(payload).encode()

    return [
        ("malformed JSON", b'{"sellerOrderId": "SO-1", "pickupLat": 52.5,'),
        ("not JSON at all", b"sellerOrderId=SO-1"),
        ("empty body", b""),
        (
            "JSON array",
            enc([{"sellerOrderId": "SO-1", "pickupLat": lat, "pickupLon": lon}]),
        ),
        ("missing sellerOrderId", enc({"pickupLat": lat, "pickupLon": lon})),
        (
            "empty sellerOrderId",
            enc({"sellerOrderId": "", "pickupLat": lat, "pickupLon": lon}),
        ),
        (
            "129-char sellerOrderId",
            enc({"sellerOrderId": "x" * 129, "pickupLat": lat, "pickupLon": lon}),
        ),
        (
            "NUL in sellerOrderId",
            enc({"sellerOrderId": "SO\x00-1", "pickupLat": lat, "pickupLon": lon}),
        ),
        (
            "control char in sellerOrderId",
            enc({"sellerOrderId": "SO\x1b-1", "pickupLat": lat, "pickupLon": lon}),
        ),
        (
            "newline in sellerOrderId",
            enc({"sellerOrderId": "SO-1\n", "pickupLat": lat, "pickupLon": lon}),
        ),
        (
            "boolean sellerOrderId",
            enc({"sellerOrderId": True, "pickupLat": lat, "pickupLon": lon}),
        ),
        (
            "lat above max",
            enc({"sellerOrderId": "SO-1", "pickupLat": 85.0512, "pickupLon": lon}),
        ),
        (
            "lat below min",
            enc({"sellerOrderId": "SO-1", "pickupLat": -85.0512, "pickupLon": lon}),
        ),
        ("lat 90", enc({"sellerOrderId": "SO-1", "pickup": {"lat": 90.0, "lon": lon}})),
        (
            "lon above 180",
            enc({"sellerOrderId": "SO-1", "pickupLat": lat, "pickupLon": 180.000001}),
        ),
        (
            "lon below -180",
            enc({"sellerOrderId": "SO-1", "pickup": {"lat": lat, "lon": -180.5}}),
        ),
        (
            "string coordinates",
            enc({"sellerOrderId": "SO-1", "pickupLat": "52.52", "pickupLon": "13.405"}),
        ),
        (
            "string nested lat",
            enc({"sellerOrderId": "SO-1", "pickup": {"lat": "52.52", "lon": lon}}),
        ),
        (
            "null coordinates",
            enc({"sellerOrderId": "SO-1", "pickupLat": None, "pickupLon": None}),
        ),
        (
            "null nested lat",
            enc({"sellerOrderId": "SO-1", "pickup": {"lat": None, "lon": lon}}),
        ),
        ("null pickup", enc({"sellerOrderId": "SO-1", "pickup": None})),
        (
            "boolean lat",
            enc({"sellerOrderId": "SO-1", "pickupLat": True, "pickupLon": lon}),
        ),
        (
            "boolean nested lon",
            enc({"sellerOrderId": "SO-1", "pickup": {"lat": lat, "lon": False}}),
        ),
        (
            "pickupLat without pickupLon",
            enc({"sellerOrderId": "SO-1", "pickupLat": lat}),
        ),
        (
            "pickupLon without pickupLat",
            enc({"sellerOrderId": "SO-1", "pickupLon": lon}),
        ),
        (
            "nested pickup without lon",
            enc({"sellerOrderId": "SO-1", "pickup": {"lat": lat}}),
        ),
        ("no pickup at all", enc({"sellerOrderId": "SO-1"})),
        (
            "shapes disagree",
            enc(
                {
                    "sellerOrderId": "SO-1",
                    "pickupLat": lat,
                    "pickupLon": lon,
                    "pickup": {"lat": lat + 0.01, "lon": lon},
                }
            ),
        ),
        (
            "half flat disagrees with nested",
            enc(
                {
                    "sellerOrderId": "SO-1",
                    "pickupLat": lat,
                    "pickup": {"lat": lat, "lon": lon},
                }
            ),
        ),
        ("NaN lat", b'{"sellerOrderId": "SO-1", "pickupLat": NaN, "pickupLon": 13.4}'),
        (
            "Infinity lon",
            b'{"sellerOrderId": "SO-1", "pickupLat": 52.5, "pickupLon": Infinity}',
        ),
        (
            "overflowing lat",
            b'{"sellerOrderId": "SO-1", "pickupLat": 1e400, "pickupLon": 13.4}',
        ),
        (
            "drop out of range",
            enc(
                {
                    "sellerOrderId": "SO-1",
                    "pickup": {"lat": lat, "lon": lon},
                    "drop": {"lat": 91.0, "lon": lon},
                }
            ),
        ),
        (
            "drop as a string",
            enc(
                {
                    "sellerOrderId": "SO-1",
                    "pickupLat": lat,
                    "pickupLon": lon,
                    "drop": "home",
                }
            ),
        ),
    ]


async def test_invalid_bodies_are_422_problems_and_write_nothing(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    # A driver right at the pickup: any body that slipped through would be assigned.
    driver = await api.online_driver(*offset(*BERLIN, 0.1, 0.0))
    zone = await driver_zone(pg_pool, driver)
    failures: list[str] = []
    for label, raw in _invalid_bodies():
        resp = await api.signed_post(READY, raw)
        if resp.status != 422:
            failures.append(f"{label}: {resp.status} {await resp.text()}")
            continue
        await validation_problem(resp)
    assert failures == []

    for raw in (
        b"{}",
        b'{"sellerOrderId": ""}',
        b"[",
        b'{"sellerOrderId": "a\\u0000b"}',
    ):
        await validation_problem(await api.signed_post(CANCELLED, raw))

    await assert_nothing_written(pg_pool)
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "AVAILABLE"
    )
    assert driver.driver_id in await geo_members(redis_client, zone)
    await asyncio.sleep(0.3)
    assert receiver.received == []


def _padded(seller_order_id: str, size: int) -> bytes:
    """A valid flat body of exactly `size` bytes (the padding is an unknown field)."""
    base = {
        "sellerOrderId": seller_order_id,
        "pickupLat": BERLIN[0],
        "pickupLon": BERLIN[1],
        "pad": "",
    }
    empty = len(json.dumps(base).encode())
    raw = json.dumps({**base, "pad": "x" * (size - empty)}).encode()
    assert len(raw) == size
    return raw


async def test_bodies_over_64_kib_are_413_and_64_kib_is_accepted(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.0))
    for path in (READY, CANCELLED):
        resp = await api.signed_post(path, _padded("SO-big", MAX_BODY + 1))
        await problem(resp, 413)
        resp = await api.signed_post(path, _padded("SO-big", 200 * 1024))
        await problem(resp, 413)
    await assert_nothing_written(pg_pool)

    resp = await api.signed_post(READY, _padded("SO-at-limit", MAX_BODY))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["driverId"] == driver.driver_id


async def test_retry_with_a_different_pickup_is_409_and_changes_nothing(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    first = await api.online_driver(*offset(*BERLIN, 0.2, 0.0))
    second = await api.online_driver(*offset(*BERLIN, 0.0, 0.4))
    resp = await api.order("SO-409", *BERLIN)
    assert (await resp.json())["driverId"] == first.driver_id
    before = await pg_pool.fetchrow(
        "SELECT * FROM deliveries WHERE seller_order_id = 'SO-409'"
    )

    moved = {
        "sellerOrderId": "SO-409",
        "pickup": {"lat": BERLIN[0], "lon": BERLIN[1] + 0.002},
    }
    for payload in (
        moved,
        {
            "sellerOrderId": "SO-409",
            "pickupLat": BERLIN[0] - 0.001,
            "pickupLon": BERLIN[1],
        },
    ):
        conflict = await api.signed_post(READY, payload)
        body = await problem(conflict, 409)
        assert "errors" not in body or body["errors"] is None
        assert "Idempotent-Replayed" not in conflict.headers

    assert (
        await pg_pool.fetchrow(
            "SELECT * FROM deliveries WHERE seller_order_id = 'SO-409'"
        )
        == before
    )
    assert await count(pg_pool, "deliveries") == 1
    assert await count(pg_pool, "webhook_outbox") == 1
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", second.driver_id
        )
        == "AVAILABLE"
    )
    await receiver.wait_until(lambda: len(receiver.received) >= 1)
    await asyncio.sleep(0.3)
    assert [d.body["type"] for d in receiver.received] == ["delivery.assigned"]


async def test_cancel_frees_the_driver_and_sends_one_cancelled_webhook(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    driver = await api.online_driver(*offset(*BERLIN, 0.3, -0.2))
    zone = await driver_zone(pg_pool, driver)
    assigned = await (await api.order("SO-cancel", *BERLIN)).json()
    assert assigned["driverId"] == driver.driver_id
    assert driver.driver_id not in await geo_members(redis_client, zone)

    resp = await api.cancel("SO-cancel")
    assert resp.status == 200, await resp.text()
    view = await resp.json()
    assert view["sellerOrderId"] == "SO-cancel"
    assert view["status"] == "CANCELLED"
    assert view["driverId"] == driver.driver_id
    assert view["assignmentId"] == assigned["assignmentId"]
    assert [h["status"] for h in view["history"]] == ["ASSIGNED", "CANCELLED"]

    # PostgreSQL: delivery cancelled with its history; the driver free again.
    row = await pg_pool.fetchrow(
        "SELECT * FROM deliveries WHERE seller_order_id = 'SO-cancel'"
    )
    assert row is not None
    assert row["status"] == "CANCELLED" and row["cancelled_at"] is not None
    assert row["sequence"] == 2
    history = await pg_pool.fetch(
        "SELECT status, at FROM delivery_history WHERE seller_order_id = 'SO-cancel' ORDER BY id"
    )
    assert [h["status"] for h in history] == ["ASSIGNED", "CANCELLED"]
    assert history[0]["at"] <= history[1]["at"]
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "AVAILABLE"
    )
    # Redis: back in its zone's GEO key.
    assert driver.driver_id in await geo_members(redis_client, zone)

    await receiver.wait_until(lambda: len(receiver.of_type("delivery.cancelled")) >= 1)
    [hook] = receiver.of_type("delivery.cancelled")
    assert hook.body["data"]["sellerOrderId"] == "SO-cancel"
    assert hook.body["data"]["driverId"] == driver.driver_id
    assert hook.body["data"]["assignmentId"] == assigned["assignmentId"]
    assert hook.body["data"]["sequence"] == 2

    # Idempotent: a repeated cancel answers 200 and sends nothing new.
    again = await api.cancel("SO-cancel")
    assert again.status == 200
    assert (await again.json())["status"] == "CANCELLED"
    await asyncio.sleep(0.5)
    assert len(receiver.of_type("delivery.cancelled")) == 1
    assert await count(pg_pool, "webhook_outbox") == 2
    assert await count(pg_pool, "delivery_history") == 2

    # The freed driver is dispatchable again.
    next_order = await (await api.order("SO-after-cancel", *BERLIN)).json()
    assert next_order["assigned"] is True and next_order["driverId"] == driver.driver_id


async def test_cancel_of_unknown_order_is_404_and_after_delivered_is_409(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    await problem(await api.cancel("SO-never-seen"), 404)

    # An order that found no driver has no delivery either.
    unassigned = await (await api.order("SO-unassigned", -33.86, 151.21)).json()
    assert unassigned["assigned"] is False
    await problem(await api.cancel("SO-unassigned"), 404)
    await assert_nothing_written(pg_pool)

    driver = await api.online_driver(*offset(*BERLIN, 0.1, 0.1))
    assert (await (await api.order("SO-done", *BERLIN)).json())[
        "driverId"
    ] == driver.driver_id
    assert (await api.step(driver, "SO-done", "picked-up")).status == 200
    assert (await api.step(driver, "SO-done", "delivered")).status == 200

    await problem(await api.cancel("SO-done"), 409)
    row = await pg_pool.fetchrow(
        "SELECT status, cancelled_at FROM deliveries WHERE seller_order_id = 'SO-done'"
    )
    assert row is not None and tuple(row) == ("DELIVERED", None)
    await receiver.wait_until(lambda: len(receiver.of_type("delivery.delivered")) == 1)
    await asyncio.sleep(0.3)
    assert receiver.of_type("delivery.cancelled") == []


async def test_pickup_next_to_the_antimeridian_finds_the_driver_across_it(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    """lon ±180 is a valid boundary: a driver 0.2 km away across it is within the radius."""
    driver = await api.online_driver(-17.0, 179.999, name="east of the line")
    resp = await api.order("SO-fiji", -17.0, -179.9995)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["assigned"] is True, body
    assert body["driverId"] == driver.driver_id
    assert body["distanceKm"] < 0.2


async def test_cancel_after_pickup_frees_the_driver_and_ends_the_lifecycle(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    driver = await api.online_driver(*offset(*BERLIN, 0.1, 0.1))
    assert (await (await api.order("SO-picked", *BERLIN)).json())[
        "driverId"
    ] == driver.driver_id
    assert (await api.step(driver, "SO-picked", "picked-up")).status == 200

    resp = await api.signed_post(
        CANCELLED, {"sellerOrderId": "SO-picked", "reason": "customer cancelled"}
    )
    assert resp.status == 200, await resp.text()
    assert [h["status"] for h in (await resp.json())["history"]] == [
        "ASSIGNED",
        "PICKED_UP",
        "CANCELLED",
    ]
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM drivers WHERE id = $1", driver.driver_id
        )
        == "AVAILABLE"
    )
    for step in ("picked-up", "delivered"):
        await problem(await api.step(driver, "SO-picked", step), 409)
    await problem(await api.step(driver, "SO-picked", "failed", {"reason": "x"}), 409)
    assert (
        await pg_pool.fetchval(
            "SELECT status FROM deliveries WHERE seller_order_id = 'SO-picked'"
        )
        == "CANCELLED"
    )

    await receiver.wait_until(lambda: len(receiver.of_type("delivery.cancelled")) == 1)
    assert receiver.of_type("delivery.cancelled")[0].body["data"]["sequence"] == 3
