"""Hostile ids, coordinates, nesting and sizes on every route: 4xx problems, nothing written."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp import ClientResponse
from redis.asyncio import Redis
from yarl import URL

from dispatcher.api.app import ROUTES
from tests.fuzz.state import assert_unchanged, problem, settled, snapshot
from tests.support import BERLIN, VALID_BODIES, Api, Driver, WebhookReceiver, offset

pytestmark = pytest.mark.integration

MAX_BODY = 64 * 1024
READY = "/events/seller-order-ready"
CANCELLED = "/events/seller-order-cancelled"
# A valid body for each route with a path id, so that only the id is hostile.
BODY_FOR = {route: body for route, body in VALID_BODIES.items() if "{" in route[1]}
# Ids that name nothing: each must be a plain 404, whatever it holds.
UNKNOWN_IDS = [
    "ü-𝄞-東京",
    "' OR '1'='1",
    "x'; DROP TABLE drivers; --",
    '"; DELETE FROM deliveries; --',
    "$1",
    "%_\\",
    " ",
    "\n",
    "\t",
    "%",
    "\u202e",
    "\ufeff",
    "x" * 1000,
]


@pytest.fixture
async def seeded(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> AsyncIterator[tuple[Driver, str]]:
    """A located, busy driver with an assigned order: the state nothing may touch."""
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.1))
    resp = await api.order("SO-seed", *BERLIN)
    assert (await resp.json())["driverId"] == driver.driver_id
    await settled(pg_pool, receiver)
    yield driver, "SO-seed"


def route_path(template: str, hostile: str) -> URL:
    quoted = quote(hostile, safe="")
    path = template.replace("{driverId}", quoted).replace("{sellerOrderId}", quoted)
    return URL(path.replace("{offerId}", quoted), encoded=True)


async def send(
    api: Api, method: str, url: URL | str, body: Any, headers: dict[str, str]
) -> ClientResponse:
    raw = (
        None
        if body is None
        else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    resp: ClientResponse = await api.client.request(
        method, url, data=raw, headers={**headers, "Content-Type": "application/json"}
    )
    return resp


def test_every_route_with_a_path_id_is_listed() -> None:
    assert {(r.method, r.path) for r in ROUTES if "{" in r.path} == set(BODY_FOR)


async def test_unknown_path_ids_are_404_problems_and_write_nothing(
    api: Api, seeded: tuple[Driver, str], pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    before = await snapshot(pg_pool, redis_client)
    failures: list[str] = []
    for (method, template), body in BODY_FOR.items():
        for hostile in UNKNOWN_IDS:
            resp = await send(
                api, method, route_path(template, hostile), body, api.admin
            )
            try:
                await problem(resp, {404})
            except AssertionError as exc:
                failures.append(f"{method} {template} {hostile[:20]!r}: {exc}")
    assert failures == []
    await assert_unchanged(before, pg_pool, redis_client)


async def test_nul_in_any_id_or_text_is_a_4xx_not_a_500(
    api: Api, seeded: tuple[Driver, str], pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    """PostgreSQL text cannot hold NUL: the API must refuse it (4xx), not pass it on (500).

    Every id and free text refuses NUL: path ids answer 404, bodies and queries 422, and a
    gateway batch rejects the item.
    """
    _, order = seeded
    before = await snapshot(pg_pool, redis_client)
    headers = {**api.admin, "Content-Type": "application/json"}
    cases: list[tuple[str, str, URL | str, Any]] = [
        (
            f"{method} {template} with %00 in the id",
            method,
            route_path(template, "a\x00b"),
            body,
        )
        for (method, template), body in BODY_FOR.items()
    ]
    cases += [
        (
            "GET /drivers?zoneId=%00",
            "GET",
            URL("/drivers?zoneId=a%00b", encoded=True),
            None,
        ),
        (
            "POST /deliveries/{id}/failed, reason with NUL",
            "POST",
            f"/deliveries/{order}/failed",
            b'{"reason": "shop\\u0000closed"}',
        ),
    ]
    failures: list[str] = []
    for label, method, url, body in cases:
        raw = (
            None
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        resp = await api.client.request(method, url, data=raw, headers=headers)
        if not 400 <= resp.status < 500:
            failures.append(f"{label}: {resp.status} {(await resp.text())[:120]}")
    # A batch reports a bad item in `rejected` (as it does NaN items), writing nothing.
    batch = await api.client.post(
        "/drivers/locations",
        data=b'{"pings": [{"driverId": "drv_a\\u0000b", "lat": -33.86, "lon": 151.21}]}',
        headers=headers,
    )
    outcome = await batch.json()
    if (
        batch.status != 200
        or outcome["accepted"] != 0
        or [r["index"] for r in outcome["rejected"]] != [0]
    ):
        failures.append(
            f"POST /drivers/locations, driverId with NUL: {batch.status} {outcome}"
        )
    # The cancel event's reason is signed by Vendure, and reaches PostgreSQL the same way.
    cancel = await api.signed_post(
        CANCELLED, b'{"sellerOrderId": "SO-seed", "reason": "gone\\u0000away"}'
    )
    if not 400 <= cancel.status < 500:
        failures.append(
            f"POST {CANCELLED}, reason with NUL: {cancel.status} {(await cancel.text())[:120]}"
        )
    await assert_unchanged(before, pg_pool, redis_client)
    assert failures == [], "\n".join(failures)


async def test_a_path_id_longer_than_the_request_line_limit_is_a_problem_document(
    api: Api, seeded: tuple[Driver, str], pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    """A 10 kB id makes the request line longer than aiohttp's 8190 bytes: docs/API.md#errors
    still wants an application/problem+json 4xx, not aiohttp's text/plain 400."""
    before = await snapshot(pg_pool, redis_client)
    statuses: set[int] = set()
    bad_bodies: list[str] = []
    for (method, template), body in BODY_FOR.items():
        resp = await send(
            api, method, route_path(template, "x" * 10240), body, api.admin
        )
        statuses.add(resp.status)
        if not resp.headers.get("Content-Type", "").startswith(
            "application/problem+json"
        ):
            bad_bodies.append(
                f"{method} {template}: {resp.status} {resp.headers.get('Content-Type')}"
            )
    long_query = await api.client.get(
        URL("/drivers?zoneId=" + "z" * 10240, encoded=True), headers=api.admin
    )
    statuses.add(long_query.status)
    await assert_unchanged(before, pg_pool, redis_client)
    assert all(400 <= s < 500 for s in statuses), statuses
    assert bad_bodies == [], "\n".join(bad_bodies)


async def test_recorded_at_at_the_edges_of_the_calendar_is_a_4xx_not_a_500(
    api: Api, seeded: tuple[Driver, str], pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    """A valid ISO time whose UTC form leaves year 1..9999 must be refused, not crash
    `astimezone` (OverflowError -> 500) on the single and the batched ping."""
    driver, _ = seeded
    before = await snapshot(pg_pool, redis_client)
    failures: list[str] = []
    for stamp in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+00:01"):
        single = await send(
            api,
            "PATCH",
            f"/drivers/{driver.driver_id}/location",
            {"lat": BERLIN[0], "lon": BERLIN[1], "recordedAt": stamp},
            driver.auth,
        )
        if not 400 <= single.status < 500:
            failures.append(f"single ping recordedAt={stamp}: {single.status}")
        batch = await send(
            api,
            "POST",
            "/drivers/locations",
            {
                "pings": [
                    {
                        "driverId": driver.driver_id,
                        "lat": BERLIN[0],
                        "lon": BERLIN[1],
                        "recordedAt": stamp,
                    }
                ]
            },
            api.admin,
        )
        if batch.status != 200 or (await batch.json())["accepted"] != 0:
            failures.append(
                f"batch ping recordedAt={stamp}: {batch.status} (want 200, entry rejected)"
            )
    await assert_unchanged(before, pg_pool, redis_client)
    assert failures == [], "\n".join(failures)


async def test_sql_metacharacters_and_unicode_order_ids_round_trip(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    """docs/API.md#seller-order-ready: sellerOrderId is opaque. These are valid ids, stored and answered verbatim."""
    ids = [
        "x'; DROP TABLE deliveries; --",
        "' OR '1'='1",
        '"quoted" \\back\\slash',
        "%_ LIKE wildcards _%",
        "$1::text",
        "<script>alert(1)</script>",
        "é-nfc",
        "e\u0301-nfd",  # the same text in NFD: a different id
        "🚚" * 128,
    ]
    for n, seller_order_id in enumerate(ids):
        driver = await api.online_driver(
            *offset(*BERLIN, 0.1 + 0.05 * n, 0.0), name=f"d{n}"
        )
        first = await api.order(seller_order_id, *BERLIN)
        assert first.status == 200, (seller_order_id, await first.text())
        body = await first.json()
        assert (body["sellerOrderId"], body["driverId"]) == (
            seller_order_id,
            driver.driver_id,
        )
        again = await api.order(seller_order_id, *BERLIN)
        assert await again.read() == await first.read()
        assert again.headers["Idempotent-Replayed"] == "true"
        path = "/deliveries/" + quote(seller_order_id, safe="")
        view = await api.client.get(URL(path, encoded=True), headers=driver.auth)
        assert (await view.json())["sellerOrderId"] == seller_order_id
    stored = {
        r["seller_order_id"]
        for r in await pg_pool.fetch("SELECT seller_order_id FROM deliveries")
    }
    assert stored == set(ids)
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers") == len(ids)
    cancelled = await api.cancel(ids[0])
    assert (await cancelled.json())["status"] == "CANCELLED"
    assert (
        await pg_pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE status = 'CANCELLED'"
        )
        == 1
    )


def _coordinate_values() -> list[tuple[str, str]]:
    """Raw JSON for a coordinate that must be refused (the ones test_routes_* lack)."""
    return [
        ("-Infinity", "-Infinity"),
        ("-1e400", "-1e400"),
        ("a 400-digit integer", "1" + "0" * 400),
        ("just above the latitude limit", "85.05112879"),
        ("just below the latitude limit", "-85.05112879"),
        ("an array", "[52.5]"),
        ("an object", '{"value": 52.5}'),
        ('the string "NaN"', '"NaN"'),
        ("an empty string", '""'),
    ]


async def test_hostile_coordinates_on_every_coordinate_route_write_nothing(
    api: Api, seeded: tuple[Driver, str], pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    driver, _ = seeded
    before = await snapshot(pg_pool, redis_client)
    ok_lon = json.dumps(BERLIN[1])
    failures: list[str] = []
    for label, value in _coordinate_values():
        ping = f'{{"lat": {value}, "lon": {ok_lon}}}'.encode()
        resp = await send(
            api, "PATCH", f"/drivers/{driver.driver_id}/location", ping, driver.auth
        )
        if resp.status != 422:
            failures.append(f"ping lat {label}: {resp.status}")
        if "latitude limit" not in label:  # ±85.0511288 is a fine longitude
            lon_ping = f'{{"lat": 52.5, "lon": {value}}}'.encode()
            resp = await send(
                api,
                "PATCH",
                f"/drivers/{driver.driver_id}/location",
                lon_ping,
                driver.auth,
            )
            if resp.status != 422:
                failures.append(f"ping lon {label}: {resp.status}")
        item = f'{{"driverId": "{driver.driver_id}", "lat": {value}, "lon": {ok_lon}}}'
        resp = await send(
            api,
            "POST",
            "/drivers/locations",
            f'{{"pings": [{item}]}}'.encode(),
            api.admin,
        )
        result = await resp.json()
        if (
            resp.status != 200
            or result["accepted"] != 0
            or [r["index"] for r in result["rejected"]] != [0]
        ):
            failures.append(f"batch lat {label}: {resp.status} {result}")
        for event in (
            f'{{"sellerOrderId": "SO-c", "pickupLat": {value}, "pickupLon": {ok_lon}}}',
            f'{{"sellerOrderId": "SO-c", "pickup": {{"lat": {value}, "lon": {ok_lon}}}}}',
            f'{{"sellerOrderId": "SO-c", "pickupLat": 52.52, "pickupLon": 13.405, "drop": {{"lat": {value}, "lon": 1}}}}',
        ):
            resp = await api.signed_post(READY, event.encode())
            if resp.status != 422:
                failures.append(f"event {label} in {event[26:40]}…: {resp.status}")
            else:
                await problem(resp, {422})
    for drop in (
        '{"lat": NaN, "lon": 1}',
        '{"lat": 1, "lon": Infinity}',
        '{"lat": null, "lon": 1}',
        '"home"',
    ):
        event = f'{{"sellerOrderId": "SO-d", "pickupLat": 52.52, "pickupLon": 13.405, "drop": {drop}}}'
        resp = await api.signed_post(READY, event.encode())
        if resp.status != 422:
            failures.append(f"event drop {drop}: {resp.status}")
    assert failures == [], "\n".join(failures)
    await assert_unchanged(before, pg_pool, redis_client)


async def test_deeply_nested_json_is_a_422_on_every_body_route(
    api: Api, seeded: tuple[Driver, str], pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    """30,000 levels of nesting fit in 64 KiB; the parser's depth limit must answer 422."""
    driver, order = seeded
    before = await snapshot(pg_pool, redis_client)
    deep = b"[" * 30_000 + b"]" * 30_000
    assert len(deep) <= MAX_BODY
    nested_item = b'{"pings": [' + b"[" * 20_000 + b"]" * 20_000 + b"]}"
    for route in (r for r in ROUTES if r.body is not None):
        path = route.path.replace("{driverId}", driver.driver_id).replace(
            "{sellerOrderId}", order
        )
        path = path.replace("{offerId}", "ofr_none")
        for raw in (deep, nested_item):
            if route.auth == "signature":
                resp = await api.signed_post(path, raw)
            else:
                resp = await send(api, route.method, path, raw, api.admin)
            await problem(resp, {422})
    await assert_unchanged(before, pg_pool, redis_client)


async def test_bodies_over_64_kib_are_413_on_the_delivery_routes_and_when_chunked(
    api: Api, seeded: tuple[Driver, str], pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    """test_routes_* cover the event and driver routes with a Content-Length; these are
    the lifecycle routes, and bodies sent chunked (no Content-Length to refuse up front)."""
    driver, order = seeded
    before = await snapshot(pg_pool, redis_client)
    big = json.dumps({"reason": "x" * MAX_BODY}).encode()
    for step in ("picked-up", "delivered", "failed"):
        for headers in (driver.auth, api.admin):
            await problem(
                await send(api, "POST", f"/deliveries/{order}/{step}", big, headers),
                {413},
            )

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(80):
            yield b" " * 1024  # JSON whitespace: valid if it were ever parsed

    # (POST /drivers/locations has 256 KiB: test_hostile_http.py covers it.)
    for method, path in (
        ("PATCH", f"/drivers/{driver.driver_id}/location"),
        ("POST", "/drivers"),
        ("POST", f"/deliveries/{order}/failed"),
    ):
        resp = await api.client.request(
            method,
            path,
            data=chunks(),
            headers={**api.admin, "Content-Type": "application/json"},
        )
        await problem(resp, {413})
    chunked_event = await api.client.post(
        READY, data=chunks(), headers=api.signed_headers(b" " * 80 * 1024)
    )
    await problem(chunked_event, {413})
    await assert_unchanged(before, pg_pool, redis_client)
