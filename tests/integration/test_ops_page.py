"""The operator page's routes: the snapshot against PostgreSQL, the page's headers and assets."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import h3
import pytest

from dispatcher.config import ResolvedSettings
from tests.support import BERLIN, Api, offset, problem

pytestmark = pytest.mark.integration

StartApi = Callable[[ResolvedSettings], Awaitable[Api]]


async def snapshot(api: Api) -> dict[str, Any]:
    resp = await api.client.get("/ops/snapshot", headers=api.admin)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = await resp.json()
    return body


async def test_snapshot_needs_the_operator_token_in_a_header(api: Api) -> None:
    await problem(await api.client.get("/ops/snapshot"), 401)
    wrong = {"Authorization": "Bearer adm_wrong"}
    await problem(await api.client.get("/ops/snapshot", headers=wrong), 401)
    driver = await api.create_driver()
    await problem(await api.client.get("/ops/snapshot", headers=driver.auth), 403)
    # A token in the query string is no token.
    resp = await api.client.get(
        "/ops/snapshot", params={"token": api.settings.admin_token}
    )
    await problem(resp, 401)


async def test_snapshot_draws_each_driver_in_its_state_as_postgresql_holds_it(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    available = await api.online_driver(*offset(*BERLIN, 0.5, 0.0), name="Ada")
    busy = await api.online_driver(*BERLIN, name="Bo")
    stale = await api.online_driver(*offset(*BERLIN, 0.0, 3.0), name="Cy")
    offline = await api.create_driver("Di")
    resp = await api.order("SO-ops-1", *offset(*BERLIN, 0.0, 0.05))
    assert (await resp.json())["driverId"] == busy.driver_id
    # Silent for longer than the heartbeat TTL, as PostgreSQL's clock sees it.
    await pg_pool.execute(
        "UPDATE drivers SET last_seen_at = now() - interval '1 hour' WHERE id = $1",
        stale.driver_id,
    )

    snap = await snapshot(api)
    states = {d["driverId"]: d["state"] for d in snap["drivers"]}
    assert states == {
        available.driver_id: "available",
        busy.driver_id: "busy",
        stale.driver_id: "stale",
    }
    assert offline.driver_id not in states
    rows = await pg_pool.fetch("SELECT id, lat, lon, zone_id FROM drivers")
    where = {r["id"]: (r["lat"], r["lon"], r["zone_id"]) for r in rows}
    for d in snap["drivers"]:
        assert (d["lat"], d["lon"], d["zoneId"]) == where[d["driverId"]]
    bo = next(d for d in snap["drivers"] if d["driverId"] == busy.driver_id)
    assert bo["sellerOrderId"] == "SO-ops-1" and bo["name"] == "Bo"

    counts = snap["counts"]
    assert counts == {
        "drivers": 3,
        "available": 1,
        "offered": 0,
        "busy": 1,
        "stale": 1,
        "offline": 1,
        "waiting": 0,
        "offeredOrders": 0,
        "unassigned": 0,
        "assigned": 1,
        "pickedUp": 0,
    }
    assert [
        (d["sellerOrderId"], d["driverId"], d["status"]) for d in snap["deliveries"]
    ] == [("SO-ops-1", busy.driver_id, "ASSIGNED")]

    zone_ids = {r["zone_id"] for r in await pg_pool.fetch("SELECT zone_id FROM zones")}
    assert {z["zoneId"] for z in snap["zones"]} == zone_ids
    for zone in snap["zones"]:
        assert [tuple(p) for p in zone["outline"]] == [
            tuple(p) for p in h3.cell_to_boundary(zone["zoneId"])
        ]
    assert sum(z["drivers"] for z in snap["zones"]) == 3
    assert snap["map"] == {"tileUrl": None, "tileAttribution": None}
    assert snap["offerMode"] == "auto"

    # The step is reflected at once: picked up, then delivered frees the driver.
    assert (await api.step(busy, "SO-ops-1", "picked-up")).status == 200
    snap = await snapshot(api)
    assert snap["counts"]["pickedUp"] == 1 and snap["counts"]["assigned"] == 0
    assert (await api.step(busy, "SO-ops-1", "delivered")).status == 200
    snap = await snapshot(api)
    assert snap["deliveries"] == []
    assert {d["driverId"]: d["state"] for d in snap["drivers"]}[
        busy.driver_id
    ] == "available"


async def test_snapshot_queues_offered_waiting_and_unassigned_orders(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    api = await start_api(make_settings(offer_mode="cascade", offer_timeout_s=60))
    near = await api.online_driver(*offset(*BERLIN, 0.2, 0.0))
    assert (await api.order("SO-ops-offered", *BERLIN)).status == 200
    # Nobody within reach of this one: it gives up at once and needs a person.
    assert (await api.order("SO-ops-nobody", *offset(*BERLIN, 60.0, 0.0))).status == 200

    snap = await snapshot(api)
    offered = snap["queue"]["offered"]
    assert [o["sellerOrderId"] for o in offered] == ["SO-ops-offered"]
    offer = await pg_pool.fetchrow(
        "SELECT offer_id, driver_id, expires_at FROM offers WHERE status = 'OPEN'"
    )
    assert offer is not None
    [shown] = offered[0]["offers"]
    assert shown["offerId"] == offer["offer_id"]
    assert shown["driverId"] == near.driver_id
    assert shown["expiresAt"] == offer["expires_at"].isoformat().replace("+00:00", "Z")
    assert {d["driverId"]: d["state"] for d in snap["drivers"]} == {
        near.driver_id: "offered"
    }

    unassigned = {
        r["seller_order_id"]
        for r in await pg_pool.fetch(
            "SELECT seller_order_id FROM dispatches WHERE status = 'UNASSIGNED'"
        )
    }
    assert {o["sellerOrderId"] for o in snap["queue"]["unassigned"]} == unassigned
    assert snap["counts"]["unassigned"] == len(unassigned)
    assert snap["counts"]["offeredOrders"] == 1
    assert snap["offerMode"] == "cascade"


async def test_the_page_is_served_with_a_strict_policy_and_only_its_own_assets(
    api: Api,
) -> None:
    resp = await api.client.get("/ops")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "img-src 'self' data:;" in csp
    html = await resp.text()
    # No inline script and no handler attributes: the policy would refuse them.
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    assert re.search(r"\son[a-z]+=", html) is None
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(s.startswith("/ops/static/") for s in sources)
    for source in sources:
        asset = await api.client.get(source)
        assert asset.status == 200, source
        assert asset.headers["X-Content-Type-Options"] == "nosniff"

    js = await api.client.get("/ops/static/vendor/leaflet/leaflet.js")
    assert js.headers["Content-Type"].startswith("text/javascript")
    assert 'version="1.9.4"' in await js.text()
    await problem(await api.client.get("/ops/static/nope.js"), 404)
    await problem(await api.client.get("/ops/static/../opsview.py"), 404)
    await problem(await api.client.get("/ops/static/%2e%2e/opsview.py"), 404)


async def test_configured_tiles_reach_the_snapshot_and_the_policy(
    start_api: StartApi, make_settings: Callable[..., ResolvedSettings]
) -> None:
    api = await start_api(
        make_settings(
            map_tile_url="https://{s}.tiles.example.net/{z}/{x}/{y}.png",
            map_tile_attribution="© Example <contributors>",
        )
    )
    csp = (await api.client.get("/ops")).headers["Content-Security-Policy"]
    assert "img-src 'self' data: https://*.tiles.example.net;" in csp
    snap = await snapshot(api)
    assert snap["map"] == {
        "tileUrl": "https://{s}.tiles.example.net/{z}/{x}/{y}.png",
        "tileAttribution": "© Example <contributors>",
    }
