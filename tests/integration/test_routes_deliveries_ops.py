"""Delivery routes (read, lifecycle steps) and operational routes over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp import ClientResponse
from redis.asyncio import Redis
from yarl import URL

from dispatcher.config import ResolvedSettings
from dispatcher.webhooks.sender import WebhookSender
from dispatcher.zoning import Zoning
from tests.support import (
    API_ROUTES,
    BERLIN,
    Api,
    Driver,
    WebhookReceiver,
    geo_members,
    offset,
    problem,
)

pytestmark = pytest.mark.integration

MUNICH = (48.137, 11.575)
DELIVERY_KEYS = {
    "sellerOrderId",
    "status",
    "driverId",
    "assignmentId",
    "pickup",
    "drop",
    "assignedAt",
    "pickedUpAt",
    "deliveredAt",
    "history",
}


async def delivery_row(pg_pool: asyncpg.Pool, seller_order_id: str) -> asyncpg.Record:
    row = await pg_pool.fetchrow(
        "SELECT * FROM deliveries WHERE seller_order_id = $1", seller_order_id
    )
    assert row is not None
    return row


async def driver_status(pg_pool: asyncpg.Pool, driver: Driver) -> str:
    status: str = await pg_pool.fetchval(
        "SELECT status FROM drivers WHERE id = $1", driver.driver_id
    )
    return status


async def history(pg_pool: asyncpg.Pool, seller_order_id: str) -> list[str]:
    rows = await pg_pool.fetch(
        "SELECT status FROM delivery_history WHERE seller_order_id = $1 ORDER BY id",
        seller_order_id,
    )
    return [r["status"] for r in rows]


async def assigned_order(
    api: Api, seller_order_id: str, **extra: Any
) -> tuple[Driver, dict[str, Any]]:
    driver = await api.online_driver(
        *offset(*BERLIN, 0.2, 0.1), name=f"for {seller_order_id}"
    )
    resp = await api.order(seller_order_id, *BERLIN, **extra)
    body: dict[str, Any] = await resp.json()
    assert body["assigned"] is True and body["driverId"] == driver.driver_id, body
    return driver, body


async def ok_json(resp: ClientResponse) -> Any:
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    return await resp.json()


def when(value: str | None) -> datetime:
    assert value is not None
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


# ---- GET /deliveries/{id} -----------------------------------------------------------------


async def test_get_delivery_access_and_fields(api: Api, pg_pool: asyncpg.Pool) -> None:
    drop = offset(*BERLIN, -2.0, 1.0)
    driver, assigned = await assigned_order(
        api, "SO-get", drop={"lat": drop[0], "lon": drop[1]}
    )
    stranger = await api.create_driver("stranger")

    view = await ok_json(await api.client.get("/deliveries/SO-get", headers=api.admin))
    assert set(view) >= DELIVERY_KEYS
    assert view["sellerOrderId"] == "SO-get"
    assert view["status"] == "ASSIGNED"
    assert (view["driverId"], view["assignmentId"]) == (
        driver.driver_id,
        assigned["assignmentId"],
    )
    assert (view["pickup"]["lat"], view["pickup"]["lon"]) == pytest.approx(BERLIN)
    assert (view["drop"]["lat"], view["drop"]["lon"]) == pytest.approx(drop)
    row = await delivery_row(pg_pool, "SO-get")
    assert when(view["assignedAt"]) == row["assigned_at"]
    assert (view["pickedUpAt"], view["deliveredAt"]) == (None, None)
    assert [h["status"] for h in view["history"]] == ["ASSIGNED"]
    assert when(view["history"][0]["at"]) <= datetime.now(row["assigned_at"].tzinfo)

    assert (
        await ok_json(await api.client.get("/deliveries/SO-get", headers=driver.auth))
        == view
    )
    await problem(
        await api.client.get("/deliveries/SO-get", headers=stranger.auth), 403
    )
    await problem(await api.client.get("/deliveries/SO-get"), 401)
    await problem(
        await api.client.get(
            "/deliveries/SO-get", headers={"Authorization": "Bearer nope"}
        ),
        401,
    )
    await problem(
        await api.client.get("/deliveries/SO-missing", headers=api.admin), 404
    )

    # An order without a drop answers drop: null.
    await api.online_driver(*offset(*BERLIN, -0.2, 0.1), name="second")
    assert (await (await api.order("SO-nodrop", *BERLIN)).json())["assigned"] is True
    nodrop = await ok_json(
        await api.client.get("/deliveries/SO-nodrop", headers=api.admin)
    )
    assert nodrop["drop"] is None


# ---- lifecycle -----------------------------------------------------------------------------


async def test_picked_up_then_delivered_with_history_timestamps_and_webhooks(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    driver, assigned = await assigned_order(api, "SO-life")
    stranger = await api.create_driver("stranger")
    zone = await pg_pool.fetchval(
        "SELECT zone_id FROM drivers WHERE id = $1", driver.driver_id
    )

    # Illegal: delivered before picked up; another driver may not step it.
    await problem(await api.step(driver, "SO-life", "delivered"), 409)
    await problem(await api.step(stranger, "SO-life", "picked-up"), 403)
    await problem(await api.step(driver, "SO-missing", "picked-up"), 404)
    assert (await delivery_row(pg_pool, "SO-life"))["status"] == "ASSIGNED"

    picked = await ok_json(await api.step(driver, "SO-life", "picked-up"))
    assert picked["status"] == "PICKED_UP"
    assert picked["pickedUpAt"] is not None and picked["deliveredAt"] is None
    assert [h["status"] for h in picked["history"]] == ["ASSIGNED", "PICKED_UP"]
    assert await driver_status(pg_pool, driver) == "BUSY"

    # Repeating the current step: a no-op 200.
    again = await ok_json(await api.step(driver, "SO-life", "picked-up"))
    assert again == picked

    await problem(await api.step(stranger, "SO-life", "delivered"), 403)
    # The operator may step it too (an empty body is fine).
    resp = await api.client.post("/deliveries/SO-life/delivered", headers=api.admin)
    done = await ok_json(resp)
    assert done["status"] == "DELIVERED"
    assert (
        when(done["assignedAt"])
        <= when(done["pickedUpAt"])
        <= when(done["deliveredAt"])
    )
    assert [h["status"] for h in done["history"]] == [
        "ASSIGNED",
        "PICKED_UP",
        "DELIVERED",
    ]
    ats = [when(h["at"]) for h in done["history"]]
    assert ats == sorted(ats)
    assert await ok_json(await api.step(driver, "SO-life", "delivered")) == done

    # Illegal after delivery.
    await problem(await api.step(driver, "SO-life", "picked-up"), 409)
    await problem(
        await api.step(driver, "SO-life", "failed", {"reason": "too late"}), 409
    )

    row = await delivery_row(pg_pool, "SO-life")
    assert row["status"] == "DELIVERED"
    assert row["picked_up_at"] is not None and row["delivered_at"] is not None
    assert row["assigned_at"] <= row["picked_up_at"] <= row["delivered_at"]
    assert (row["failed_at"], row["cancelled_at"]) == (None, None)
    assert await history(pg_pool, "SO-life") == ["ASSIGNED", "PICKED_UP", "DELIVERED"]
    # The driver is free: AVAILABLE and back in the mirror (its heartbeat is fresh).
    assert await driver_status(pg_pool, driver) == "AVAILABLE"
    assert driver.driver_id in await geo_members(redis_client, zone)

    await receiver.wait_until(lambda: len(receiver.of_type("delivery.delivered")) >= 1)
    await asyncio.sleep(0.5)
    assert [d.body["type"] for d in receiver.for_order("SO-life")] == [
        "delivery.assigned",
        "delivery.picked_up",
        "delivery.delivered",
    ]
    expected = {
        "sellerOrderId": "SO-life",
        "driverId": driver.driver_id,
        "assignmentId": assigned["assignmentId"],
    }
    for hook, sequence in zip(receiver.for_order("SO-life"), (1, 2, 3), strict=True):
        assert hook.body["data"]["sequence"] == sequence
        assert {k: hook.body["data"][k] for k in expected} == expected
    assert len({d.webhook_id for d in receiver.received}) == 3
    assert await pg_pool.fetchval("SELECT count(*) FROM webhook_outbox") == 3

    # Dispatchable again.
    nxt = await (await api.order("SO-next", *BERLIN)).json()
    assert nxt["driverId"] == driver.driver_id


async def test_failed_needs_a_reason_and_frees_the_driver(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    driver, _ = await assigned_order(api, "SO-fail")
    zone = await pg_pool.fetchval(
        "SELECT zone_id FROM drivers WHERE id = $1", driver.driver_id
    )
    assert (await api.step(driver, "SO-fail", "picked-up")).status == 200

    for body in ({}, {"reason": ""}, {"reason": None}, {"reason": 5}, {"why": "x"}):
        resp = await api.step(driver, "SO-fail", "failed", body)
        problem_body = await problem(resp, 422)
        assert problem_body["errors"], problem_body
    resp = await api.client.post("/deliveries/SO-fail/failed", headers=driver.auth)
    await problem(resp, 422)
    assert (await delivery_row(pg_pool, "SO-fail"))["status"] == "PICKED_UP"
    assert await driver_status(pg_pool, driver) == "BUSY"

    failed = await ok_json(
        await api.step(driver, "SO-fail", "failed", {"reason": "customer absent"})
    )
    assert failed["status"] == "FAILED"
    assert [h["status"] for h in failed["history"]] == [
        "ASSIGNED",
        "PICKED_UP",
        "FAILED",
    ]
    row = await delivery_row(pg_pool, "SO-fail")
    assert (row["status"], row["failure_reason"]) == ("FAILED", "customer absent")
    assert row["failed_at"] is not None and row["delivered_at"] is None
    assert await driver_status(pg_pool, driver) == "AVAILABLE"
    assert driver.driver_id in await geo_members(redis_client, zone)

    # Repeating is a no-op; other steps are now illegal.
    assert (
        await api.step(driver, "SO-fail", "failed", {"reason": "customer absent"})
    ).status == 200
    await problem(await api.step(driver, "SO-fail", "delivered"), 409)
    await problem(await api.step(driver, "SO-fail", "picked-up"), 409)

    await receiver.wait_until(lambda: len(receiver.of_type("delivery.failed")) >= 1)
    await asyncio.sleep(0.5)
    [hook] = receiver.of_type("delivery.failed")
    assert hook.body["data"]["sequence"] == 3
    assert hook.body["data"]["sellerOrderId"] == "SO-fail"
    assert await history(pg_pool, "SO-fail") == ["ASSIGNED", "PICKED_UP", "FAILED"]
    assert await pg_pool.fetchval("SELECT count(*) FROM webhook_outbox") == 3


async def test_failed_straight_from_assigned(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    driver, _ = await assigned_order(api, "SO-fail-early")
    failed = await ok_json(
        await api.step(driver, "SO-fail-early", "failed", {"reason": "shop closed"})
    )
    assert failed["status"] == "FAILED" and failed["pickedUpAt"] is None
    assert await driver_status(pg_pool, driver) == "AVAILABLE"
    await receiver.wait_until(lambda: len(receiver.of_type("delivery.failed")) == 1)
    assert receiver.of_type("delivery.failed")[0].body["data"]["sequence"] == 2


# ---- operations ------------------------------------------------------------------------------


async def test_health_and_ready(api: Api, receiver: WebhookReceiver) -> None:
    health = await api.client.get("/health")
    assert await ok_json(health) == {"status": "ok"}

    ready = await ok_json(await api.client.get("/ready"))
    assert {
        k: ready[k] for k in ("postgres", "redis", "ray", "zones", "outboxPending")
    } == {
        "postgres": "ok",
        "redis": "ok",
        "ray": "ok",
        "zones": 0,
        "outboxPending": 0,
    }

    await assigned_order(api, "SO-ready")
    await api.online_driver(*MUNICH, name="munich")
    await receiver.wait_until(lambda: len(receiver.received) >= 1)
    ready = await ok_json(await api.client.get("/ready"))
    assert ready["zones"] == 2
    assert ready["outboxPending"] == 0


async def test_ready_counts_undelivered_webhooks(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
) -> None:
    api: Api = await start_api(make_settings(vendure_webhook_url=None))
    driver, _ = await assigned_order(api, "SO-pending")
    assert (await api.step(driver, "SO-pending", "picked-up")).status == 200
    ready = await ok_json(await api.client.get("/ready"))
    assert (
        ready["postgres"],
        ready["ray"],
        ready["zones"],
        ready["outboxPending"],
    ) == ("ok", "ok", 1, 2)


async def test_zones_lists_driver_counts_for_operators(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    zoning = Zoning(api.settings.zone_resolution)
    here = offset(*BERLIN, 0.1, 0.1)
    available = await api.online_driver(*here, name="available")
    offline = await api.create_driver("offline")
    assert (await api.ping(offline, *offset(*here, 0.05, 0.0))).status == 204
    await api.online_driver(*MUNICH, name="munich")

    await problem(await api.client.get("/zones"), 401)
    await problem(await api.client.get("/zones", headers=available.auth), 403)

    body = await ok_json(await api.client.get("/zones", headers=api.admin))
    assert set(body) == {"zones"}
    zones = {z["zoneId"]: z for z in body["zones"]}
    berlin_zone, munich_zone = zoning.zone_of(*here), zoning.zone_of(*MUNICH)
    assert set(zones) == {berlin_zone, munich_zone}
    assert zones[berlin_zone] == {
        "zoneId": berlin_zone,
        "drivers": 2,
        "available": 1,
        "actor": "alive",
        "openOffers": 0,
    }
    assert zones[munich_zone] == {
        "zoneId": munich_zone,
        "drivers": 1,
        "available": 1,
        "actor": "alive",
        "openOffers": 0,
    }
    assert {
        r["zone_id"] for r in await pg_pool.fetch("SELECT zone_id FROM zones")
    } == set(zones)


async def test_metrics_is_prometheus_text(api: Api) -> None:
    driver = await api.create_driver()
    assert (
        await api.client.get(f"/drivers/{driver.driver_id}", headers=api.admin)
    ).status == 200
    assert (await api.client.get("/health")).status == 200
    resp = await api.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert "# TYPE dispatcher_http_requests_total counter" in text
    samples = [
        line
        for line in text.splitlines()
        if line.startswith("dispatcher_http_requests_total{")
    ]
    assert any(
        'route="/health"' in s and 'method="GET"' in s and 'status="200"' in s
        for s in samples
    ), samples
    # Labelled by route template, never by the raw id.
    assert any('route="/drivers/{driverId}"' in s for s in samples), samples
    assert driver.driver_id not in text
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_and_labels, _, value = line.rpartition(" ")
            assert name_and_labels, line
            float(value)  # every sample value is a number


async def test_openapi_documents_every_contract_route(api: Api) -> None:
    resp = await api.client.get("/openapi.json")
    doc = await ok_json(resp)
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["info"]["version"]
    paths = doc["paths"]
    missing = [(m, p) for m, p in API_ROUTES if m not in paths.get(p, {})]
    assert missing == []
    schemas = doc["components"]["schemas"]
    assert isinstance(schemas, dict) and schemas

    # Every $ref resolves inside the document.
    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    refs.append(value)
                else:
                    collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(doc)
    assert refs
    prefix = "#/components/schemas/"
    unresolved = [
        r
        for r in refs
        if not r.startswith(prefix) or r.removeprefix(prefix) not in schemas
    ]
    assert unresolved == []

    # Generated from the wire models: camelCase names as sent and received.
    ready_op = paths["/events/seller-order-ready"]["post"]
    body_ref = ready_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body_schema = schemas[body_ref.removeprefix(prefix)]
    assert {"sellerOrderId", "pickupLat", "pickupLon", "pickup", "drop"} <= set(
        body_schema["properties"]
    )
    assert "401" in ready_op["responses"] and "422" in ready_op["responses"]
    created = paths["/drivers"]["post"]["responses"]["201"]["content"][
        "application/json"
    ]["schema"]["$ref"]
    assert {"driverId", "token", "name", "status", "isActive"} <= set(
        schemas[created.removeprefix(prefix)]["properties"]
    )
    for method, path in API_ROUTES:
        op = paths[path][method]
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == {
            seg[1:-1] for seg in path.split("/") if seg.startswith("{")
        }, (method, path)


async def test_unknown_route_is_404_and_wrong_method_405_problems(api: Api) -> None:
    for path in ("/nope", "/deliveries/SO-1/teleport", "/drivers/x/y/z"):
        await problem(await api.client.get(path), 404)
    await problem(await api.client.post("/nope", json={}), 404)
    for method, path in (
        ("DELETE", "/health"),
        ("PUT", "/drivers"),
        ("GET", "/events/seller-order-ready"),
        ("DELETE", "/drivers/drv_1"),
        ("GET", "/deliveries/SO-1/delivered"),
    ):
        resp = await api.client.request(method, path)
        await problem(resp, 405)
        assert "Allow" in resp.headers, (method, path)


async def test_opaque_ids_with_reserved_characters_reach_their_delivery(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    """sellerOrderId is opaque (docs/API.md#seller-order-ready): percent-encoded in the path, it names its delivery."""
    for seller_order_id in ("SO/42", "SO 42?x=1#frag", "100%", "ü-𝄞-東京", "a.b..c"):
        driver, assigned = await assigned_order(api, seller_order_id)
        path = "/deliveries/" + quote(seller_order_id, safe="")
        view = await ok_json(
            await api.client.get(URL(path, encoded=True), headers=driver.auth)
        )
        assert (view["sellerOrderId"], view["assignmentId"]) == (
            seller_order_id,
            assigned["assignmentId"],
        )
        picked = await ok_json(
            await api.client.post(
                URL(path + "/picked-up", encoded=True), headers=driver.auth
            )
        )
        assert picked["status"] == "PICKED_UP"
        assert (await delivery_row(pg_pool, seller_order_id))["status"] == "PICKED_UP"


async def test_shutdown_is_not_lost_when_a_webhook_wake_up_arrives_at_the_same_time(
    pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> None:
    """The ingress stops its sender by cancelling it (app cleanup): a wake-up (a NOTIFY, or
    LISTEN coming up) in the same instant must not swallow that cancellation, or the
    process never finishes shutting down (seen as 120 s teardown hangs of short tests)."""
    sender = WebhookSender(
        pg_pool,
        url=receiver.url,
        secret=receiver.secret,
        schedule_s=(0,),
        timeout_s=2.0,
        poll_interval_s=5.0,
    )
    task = asyncio.create_task(sender.run(), name="sender-under-test")
    await asyncio.sleep(0.5)  # idle: LISTEN is up, the poller waits for a wake-up
    assert not task.done()
    sender.wake()
    task.cancel()
    # A ceiling for a starved machine: a cancellation that is honoured ends at once.
    done, _ = await asyncio.wait({task}, timeout=30.0)
    stopped = task in done
    for _ in range(20):  # whatever the outcome, do not leak the task into teardown
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    assert stopped, "WebhookSender.run() kept running after task.cancel()"
    assert task.cancelled()
