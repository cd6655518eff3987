"""Driver routes over HTTP: registration, reads, listing, activation, pings, batches and status."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.config import ResolvedSettings
from dispatcher.store import keys
from dispatcher.store.drivers import hash_token
from dispatcher.zoning import Zoning
from tests.support import (
    BERLIN,
    WAIT_CEILING_S,
    Api,
    Driver,
    geo_members,
    offset,
    problem,
    validation_problem,
)

pytestmark = pytest.mark.integration

DRIVER_VIEW_KEYS = {
    "driverId",
    "name",
    "status",
    "isActive",
    "location",
    "lastSeenAt",
    "zoneId",
    "activeDelivery",
}
MUNICH = (48.137, 11.575)


async def geo_position(
    redis: Redis, zone_id: str, driver_id: str
) -> tuple[float, float] | None:
    """(lat, lon) of a GEO member, or None."""
    [pos] = await redis.geopos(keys.zone_geo(zone_id), driver_id)
    if pos is None:
        return None
    return float(pos[1]), float(pos[0])


async def in_any_geo_key(redis: Redis, driver_id: str) -> bool:
    async for key in redis.scan_iter(match=keys.zone_geo("*")):
        if await redis.zscore(key, driver_id) is not None:
            return True
    return False


async def driver_row(pg_pool: asyncpg.Pool, driver: Driver | str) -> asyncpg.Record:
    driver_id = driver if isinstance(driver, str) else driver.driver_id
    row = await pg_pool.fetchrow("SELECT * FROM drivers WHERE id = $1", driver_id)
    assert row is not None
    return row


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_json(api: Api, path: str, headers: dict[str, str]) -> Any:
    resp = await api.client.get(path, headers=headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


# ---- POST /drivers -----------------------------------------------------------------


async def test_create_driver_returns_a_working_token(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    resp = await api.client.post(
        "/drivers",
        json={"name": "Ana", "phone": "+49 30 1234-567", "vehicleType": "bike"},
        headers=api.admin,
    )
    assert resp.status == 201, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert body == {
        "driverId": body["driverId"],
        "token": body["token"],
        "name": "Ana",
        "status": "OFFLINE",
        "isActive": True,
    }
    assert isinstance(body["driverId"], str) and body["driverId"]
    assert isinstance(body["token"], str) and len(body["token"]) >= 32

    row = await driver_row(pg_pool, body["driverId"])
    assert (row["name"], row["phone"], row["vehicle_type"]) == (
        "Ana",
        "+49 30 1234-567",
        "bike",
    )
    assert (row["status"], row["is_active"], row["lat"], row["zone_id"]) == (
        "OFFLINE",
        True,
        None,
        None,
    )
    # Only a hash of the token is kept.
    assert row["token_hash"] == hash_token(body["token"])
    assert body["token"].encode() not in bytes(row["token_hash"])

    own = await get_json(api, f"/drivers/{body['driverId']}", bearer(body["token"]))
    assert own["driverId"] == body["driverId"] and own["name"] == "Ana"

    # Two registrations never share an id or a token.
    second = await (
        await api.client.post("/drivers", json={"name": "Ana"}, headers=api.admin)
    ).json()
    assert second["driverId"] != body["driverId"] and second["token"] != body["token"]


async def test_create_driver_auth_and_validation(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.create_driver("existing")
    valid = {"name": "New"}
    for headers in (
        {},
        bearer("nope"),
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer "},
    ):
        await problem(
            await api.client.post("/drivers", json=valid, headers=headers), 401
        )
    await problem(
        await api.client.post("/drivers", json=valid, headers=driver.auth), 403
    )

    invalid: list[tuple[str, bytes]] = [
        ("unknown field", json.dumps({"name": "X", "colour": "red"}).encode()),
        (
            "typo in a known field",
            json.dumps({"name": "X", "vehicletype": "car"}).encode(),
        ),
        ("empty name", json.dumps({"name": ""}).encode()),
        ("missing name", json.dumps({"phone": "+4930"}).encode()),
        ("name not a string", json.dumps({"name": 5}).encode()),
        ("name too long", json.dumps({"name": "x" * 201}).encode()),
        ("name with NUL", json.dumps({"name": "a\x00b"}).encode()),
        ("phone with letters", json.dumps({"name": "X", "phone": "call me"}).encode()),
        ("malformed JSON", b'{"name": '),
        ("empty body", b""),
        ("array", b'[{"name": "X"}]'),
    ]
    failures: list[str] = []
    for label, raw in invalid:
        resp = await api.client.post(
            "/drivers",
            data=raw,
            headers={**api.admin, "Content-Type": "application/json"},
        )
        if resp.status != 422:
            failures.append(f"{label}: {resp.status} {await resp.text()}")
            continue
        await validation_problem(resp)
    assert failures == []
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers") == 1


# ---- GET /drivers/{id} and GET /drivers ----------------------------------------------


async def test_get_driver_access_and_fields_after_an_assignment(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    fresh = await api.create_driver("fresh")
    other = await api.create_driver("other")

    view = await get_json(api, f"/drivers/{fresh.driver_id}", api.admin)
    assert set(view) >= DRIVER_VIEW_KEYS
    assert view["driverId"] == fresh.driver_id and view["name"] == "fresh"
    assert (view["status"], view["isActive"]) == ("OFFLINE", True)
    assert (
        view["location"],
        view["lastSeenAt"],
        view["zoneId"],
        view["activeDelivery"],
    ) == (None, None, None, None)
    assert await get_json(api, f"/drivers/{fresh.driver_id}", fresh.auth) == view

    await problem(
        await api.client.get(f"/drivers/{fresh.driver_id}", headers=other.auth), 403
    )
    await problem(await api.client.get(f"/drivers/{fresh.driver_id}"), 401)
    await problem(
        await api.client.get(
            f"/drivers/{fresh.driver_id}", headers=bearer("drv_x.bogus")
        ),
        401,
    )
    await problem(
        await api.client.get("/drivers/drv_does_not_exist", headers=api.admin), 404
    )
    await problem(
        await api.client.get("/drivers/drv_does_not_exist", headers=fresh.auth), 403
    )

    spot = offset(*BERLIN, 0.4, 0.1)
    busy = await api.online_driver(*spot, name="busy")
    before = datetime.now(UTC)
    online = await get_json(api, f"/drivers/{busy.driver_id}", busy.auth)
    assert online["status"] == "AVAILABLE"
    assert (online["location"]["lat"], online["location"]["lon"]) == pytest.approx(spot)
    assert online["zoneId"] == Zoning(api.settings.zone_resolution).zone_of(*spot)
    seen = datetime.fromisoformat(online["lastSeenAt"])
    assert seen.tzinfo is not None and abs((seen - before).total_seconds()) < 10
    assert online["activeDelivery"] is None

    order = await (await api.order("SO-view", *BERLIN)).json()
    assert order["driverId"] == busy.driver_id
    assigned = await get_json(api, f"/drivers/{busy.driver_id}", api.admin)
    assert assigned["status"] == "BUSY"
    assert assigned["activeDelivery"] == {
        "sellerOrderId": "SO-view",
        "assignmentId": order["assignmentId"],
        "status": "ASSIGNED",
    }
    assert (await api.step(busy, "SO-view", "picked-up")).status == 200
    picked = await get_json(api, f"/drivers/{busy.driver_id}", busy.auth)
    assert picked["activeDelivery"]["status"] == "PICKED_UP"
    assert (await api.step(busy, "SO-view", "delivered")).status == 200
    done = await get_json(api, f"/drivers/{busy.driver_id}", busy.auth)
    assert (done["status"], done["activeDelivery"]) == ("AVAILABLE", None)


async def test_list_drivers_filters_by_status_and_zone(api: Api) -> None:
    zoning = Zoning(api.settings.zone_resolution)
    here = offset(*BERLIN, 0.1, 0.1)
    available_here = await api.online_driver(*here, name="available here")
    offline_here = await api.create_driver("offline here")
    assert (await api.ping(offline_here, *offset(*here, 0.05, 0.0))).status == 204
    available_munich = await api.online_driver(*MUNICH, name="available in Munich")
    never_seen = await api.create_driver("never seen")
    berlin_zone = zoning.zone_of(*here)
    assert zoning.zone_of(*offset(*here, 0.05, 0.0)) == berlin_zone
    munich_zone = zoning.zone_of(*MUNICH)

    async def ids(query: str) -> set[str]:
        body = await get_json(api, f"/drivers{query}", api.admin)
        assert set(body) == {"drivers"}
        for item in body["drivers"]:
            assert set(item) >= DRIVER_VIEW_KEYS
        return {d["driverId"] for d in body["drivers"]}

    everyone = [available_here, offline_here, available_munich, never_seen]
    assert await ids("") == {d.driver_id for d in everyone}
    assert await ids("?status=AVAILABLE") == {
        available_here.driver_id,
        available_munich.driver_id,
    }
    assert await ids("?status=OFFLINE") == {
        offline_here.driver_id,
        never_seen.driver_id,
    }
    assert await ids("?status=BUSY") == set()
    assert await ids(f"?zoneId={berlin_zone}") == {
        available_here.driver_id,
        offline_here.driver_id,
    }
    assert await ids(f"?status=AVAILABLE&zoneId={berlin_zone}") == {
        available_here.driver_id
    }
    assert await ids(f"?status=OFFLINE&zoneId={munich_zone}") == set()
    assert await ids("?zoneId=no-such-zone") == set()

    bad = await validation_problem(
        await api.client.get("/drivers?status=SLEEPING", headers=api.admin)
    )
    assert any("status" in [str(p) for p in e["loc"]] for e in bad["errors"]), bad
    await validation_problem(
        await api.client.get("/drivers?status=available", headers=api.admin)
    )
    await problem(await api.client.get("/drivers", headers=available_here.auth), 403)
    await problem(await api.client.get("/drivers"), 401)


# ---- PATCH /drivers/{id} ----------------------------------------------------------------


async def test_deactivated_driver_is_never_dispatched_and_loses_its_token(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    spot = offset(*BERLIN, 0.05, 0.0)
    driver = await api.online_driver(*spot)
    zone = (await driver_row(pg_pool, driver))["zone_id"]
    assert driver.driver_id in await geo_members(redis_client, zone)

    resp = await api.client.patch(
        f"/drivers/{driver.driver_id}", json={"isActive": False}, headers=api.admin
    )
    assert resp.status == 200, await resp.text()
    view = await resp.json()
    assert (view["driverId"], view["isActive"]) == (driver.driver_id, False)
    assert (await driver_row(pg_pool, driver))["is_active"] is False
    assert driver.driver_id not in await geo_members(redis_client, zone)

    # An order right next to them: nobody.
    order = await (await api.order("SO-inactive", *spot)).json()
    assert order == {
        "assigned": False,
        "sellerOrderId": "SO-inactive",
        "reason": "NO_DRIVER_AVAILABLE",
    }
    assert await pg_pool.fetchval("SELECT count(*) FROM deliveries") == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM webhook_outbox") == 0

    # Their token is refused on every driver route.
    await problem(await api.ping(driver, *spot), 403)
    await problem(await api.set_status(driver, "OFFLINE"), 403)
    await problem(
        await api.client.get(f"/drivers/{driver.driver_id}", headers=driver.auth), 403
    )
    assert (await driver_row(pg_pool, driver))["status"] == "AVAILABLE"
    # Even the operator cannot ping for them.
    op_ping = await api.client.patch(
        f"/drivers/{driver.driver_id}/location",
        json={"lat": spot[0], "lon": spot[1]},
        headers=api.admin,
    )
    await problem(op_ping, 403)
    assert driver.driver_id not in await geo_members(redis_client, zone)
    assert (await (await api.order("SO-inactive", *spot)).json())["assigned"] is False

    # Reactivated: dispatchable again.
    resp = await api.client.patch(
        f"/drivers/{driver.driver_id}", json={"isActive": True}, headers=api.admin
    )
    assert resp.status == 200
    assert driver.driver_id in await geo_members(redis_client, zone)
    assert (await (await api.order("SO-inactive", *spot)).json())[
        "driverId"
    ] == driver.driver_id


async def test_patch_driver_auth_and_validation(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.create_driver("patch me")
    path = f"/drivers/{driver.driver_id}"
    await problem(
        await api.client.patch(path, json={"isActive": False}, headers=driver.auth), 403
    )
    await problem(await api.client.patch(path, json={"isActive": False}), 401)
    await problem(
        await api.client.patch(
            "/drivers/drv_missing", json={"isActive": False}, headers=api.admin
        ),
        404,
    )
    for body in (
        {"isactive": False},
        {},
        {"isActive": "no"},
        {"isActive": 0},
        {"isActive": None},
    ):
        await validation_problem(
            await api.client.patch(path, json=body, headers=api.admin)
        )
    row = await driver_row(pg_pool, driver)
    assert (row["is_active"], row["name"]) == (True, "patch me")


# ---- PATCH /drivers/{id}/location --------------------------------------------------------


async def test_ping_updates_postgres_and_geo_only_while_available(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    zoning = Zoning(api.settings.zone_resolution)
    driver = await api.create_driver()
    first = offset(*BERLIN, 0.2, 0.2)
    before = datetime.now(UTC)
    assert (await api.ping(driver, *first)).status == 204
    row = await driver_row(pg_pool, driver)
    assert (row["lat"], row["lon"]) == pytest.approx(first)
    assert row["zone_id"] == zoning.zone_of(*first)
    assert row["last_seen_at"] is not None
    assert before - timedelta(seconds=1) <= row["last_seen_at"] <= datetime.now(UTC)
    assert row["status"] == "OFFLINE"
    zone = row["zone_id"]
    assert driver.driver_id not in await geo_members(redis_client, zone)

    assert (await api.set_status(driver, "AVAILABLE")).status == 200
    assert driver.driver_id in await geo_members(redis_client, zone)
    position = await geo_position(redis_client, zone, driver.driver_id)
    assert position == pytest.approx(first, abs=1e-5)

    second = offset(*first, 0.1, 0.05)
    assert (await api.ping(driver, *second)).status == 204
    moved = await driver_row(pg_pool, driver)
    assert (moved["lat"], moved["lon"]) == pytest.approx(second)
    assert moved["last_seen_at"] >= row["last_seen_at"]
    assert await geo_position(redis_client, zone, driver.driver_id) == pytest.approx(
        second, abs=1e-5
    )

    assert (await api.set_status(driver, "OFFLINE")).status == 200
    assert driver.driver_id not in await geo_members(redis_client, zone)
    third = offset(*second, 0.05, 0.0)
    assert (await api.ping(driver, *third)).status == 204
    assert (await driver_row(pg_pool, driver))["lat"] == pytest.approx(third[0])
    assert driver.driver_id not in await geo_members(redis_client, zone)
    assert (await driver_row(pg_pool, driver))["status"] == "OFFLINE"


async def test_ping_across_a_zone_border_moves_the_driver_between_geo_keys(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    zoning = Zoning(api.settings.zone_resolution)
    # Walk east in 50 m steps until the zone changes: two fixes 50 m apart, two zones.
    here = BERLIN
    while True:
        there = offset(*here, 0.0, 0.05)
        if zoning.zone_of(*there) != zoning.zone_of(*here):
            break
        here = there
    old_zone, new_zone = zoning.zone_of(*here), zoning.zone_of(*there)
    driver = await api.online_driver(*here)
    assert driver.driver_id in await geo_members(redis_client, old_zone)

    assert (await api.ping(driver, *there)).status == 204
    assert (await driver_row(pg_pool, driver))["zone_id"] == new_zone
    assert driver.driver_id in await geo_members(redis_client, new_zone)
    assert driver.driver_id not in await geo_members(redis_client, old_zone)
    order = await (await api.order("SO-border", *here)).json()
    assert order["driverId"] == driver.driver_id


async def test_stale_and_future_recorded_at(api: Api, pg_pool: asyncpg.Pool) -> None:
    driver = await api.online_driver(*BERLIN)
    now = datetime.now(UTC)
    spot = offset(*BERLIN, 0.05, 0.0)
    assert (await api.ping(driver, *spot, recorded_at=now)).status == 204
    accepted = await driver_row(pg_pool, driver)
    assert (accepted["lat"], accepted["lon"]) == pytest.approx(spot)

    # Older than the last accepted fix: ignored, still 204.
    older = offset(*BERLIN, 0.1, 0.0)
    resp = await api.ping(driver, *older, recorded_at=now - timedelta(seconds=5))
    assert resp.status == 204, await resp.text()
    # The same recordedAt again is not newer either.
    assert (await api.ping(driver, *older, recorded_at=now)).status == 204
    unchanged = await driver_row(pg_pool, driver)
    for column in ("lat", "lon", "location_recorded_at", "last_seen_at", "zone_id"):
        assert unchanged[column] == accepted[column], column

    # More than 30 s ahead: 422, nothing changes.
    ahead = await api.ping(
        driver, *older, recorded_at=datetime.now(UTC) + timedelta(seconds=45)
    )
    body = await validation_problem(ahead)
    assert body["status"] == 422
    assert await driver_row(pg_pool, driver) == unchanged

    # A timestamp without an offset is ambiguous: 422.
    naive = await api.client.patch(
        f"/drivers/{driver.driver_id}/location",
        json={
            "lat": older[0],
            "lon": older[1],
            "recordedAt": datetime.now(UTC).replace(tzinfo=None).isoformat(),
        },
        headers=driver.auth,
    )
    await validation_problem(naive)

    # A little clock skew (10 s ahead) is accepted; the heartbeat is never in the future.
    skewed = await api.ping(
        driver, *older, recorded_at=datetime.now(UTC) + timedelta(seconds=10)
    )
    assert skewed.status == 204, await skewed.text()
    row = await driver_row(pg_pool, driver)
    assert (row["lat"], row["lon"]) == pytest.approx(older)
    assert row["last_seen_at"] <= datetime.now(UTC)


async def test_ping_authorization_and_validation(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.online_driver(*BERLIN)
    other = await api.create_driver("other")
    before = await driver_row(pg_pool, driver)
    path = f"/drivers/{driver.driver_id}/location"
    spot = offset(*BERLIN, 0.05, 0.05)
    body = {"lat": spot[0], "lon": spot[1]}

    await problem(await api.client.patch(path, json=body, headers=other.auth), 403)
    await problem(await api.client.patch(path, json=body), 401)
    await problem(
        await api.client.patch(path, json=body, headers=bearer("unknown-token")), 401
    )
    for bad in (
        {"lat": 85.06, "lon": 13.4},
        {"lat": 52.5, "lon": 181.0},
        {"lat": "52.5", "lon": 13.4},
        {"lat": None, "lon": 13.4},
        {"lat": True, "lon": 13.4},
        {"lon": 13.4},
        {},
        {"lat": 52.5, "lon": 13.4, "recordedAt": "yesterday"},
    ):
        await validation_problem(
            await api.client.patch(path, json=bad, headers=driver.auth)
        )
    await validation_problem(
        await api.client.patch(
            path,
            data=b'{"lat": NaN, "lon": 13.4}',
            headers={**driver.auth, "Content-Type": "application/json"},
        )
    )
    assert await driver_row(pg_pool, driver) == before

    # The operator may ping for any driver (gateways).
    resp = await api.client.patch(path, json=body, headers=api.admin)
    assert resp.status == 204, await resp.text()
    await api.settle()
    assert ((await driver_row(pg_pool, driver))["lat"]) == pytest.approx(spot[0])
    await problem(
        await api.client.patch(
            "/drivers/drv_missing/location", json=body, headers=api.admin
        ),
        404,
    )


async def test_implausible_jump_is_a_422_validation_problem_and_changes_nothing(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    """docs/API.md#errors: a 422 is a validation failure, so its body carries `errors` [{loc, msg}]."""
    driver = await api.online_driver(*BERLIN)
    before = await driver_row(pg_pool, driver)
    resp = await api.ping(driver, *offset(*BERLIN, 20.0, 0.0))
    await validation_problem(resp)
    assert await driver_row(pg_pool, driver) == before


async def test_a_ping_never_changes_the_status(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    busy = await api.online_driver(*BERLIN, name="busy")
    assert (await (await api.order("SO-busy", *BERLIN)).json())[
        "driverId"
    ] == busy.driver_id
    offline = await api.create_driver("offline")
    for step_km in (0.05, 0.1, 0.15):
        assert (await api.ping(busy, *offset(*BERLIN, step_km, 0.0))).status == 204
        assert (await api.ping(offline, *offset(*BERLIN, 0.0, step_km))).status == 204
    assert (await driver_row(pg_pool, busy))["status"] == "BUSY"
    assert (await driver_row(pg_pool, offline))["status"] == "OFFLINE"
    assert (await driver_row(pg_pool, busy))["lat"] == pytest.approx(
        offset(*BERLIN, 0.15, 0.0)[0]
    )
    assert not await in_any_geo_key(redis_client, busy.driver_id)
    assert not await in_any_geo_key(redis_client, offline.driver_id)
    # And so another order does not get them.
    assert (await (await api.order("SO-second", *BERLIN)).json())["assigned"] is False


# ---- POST /drivers/locations --------------------------------------------------------------


async def test_batch_pings_accept_valid_items_and_reject_the_rest(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    zoning = Zoning(api.settings.zone_resolution)
    available = await api.online_driver(*BERLIN, name="available")
    offline = await api.create_driver("offline")
    inactive = await api.create_driver("inactive")
    assert (
        await api.client.patch(
            f"/drivers/{inactive.driver_id}",
            json={"isActive": False},
            headers=api.admin,
        )
    ).status == 200
    a_spot, b_spot = offset(*BERLIN, 0.1, 0.0), offset(*BERLIN, 0.0, 0.3)
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    pings: list[Any] = [
        {"driverId": available.driver_id, "lat": a_spot[0], "lon": a_spot[1]},  # 0 ok
        {"driverId": offline.driver_id, "lat": "52.5", "lon": 13.4},  # 1 string lat
        {
            "driverId": offline.driver_id,
            "lat": b_spot[0],
            "lon": b_spot[1],
            "recordedAt": datetime.now(UTC).isoformat(),
        },  # 2 ok
        {
            "driverId": "drv_unknown",
            "lat": b_spot[0],
            "lon": b_spot[1],
        },  # 3 unknown driver
        {"driverId": offline.driver_id, "lat": 95.0, "lon": 13.4},  # 4 out of range
        {"lat": 52.5, "lon": 13.4},  # 5 no driverId
        7,  # 6 not an object
        {
            "driverId": available.driver_id,
            "lat": 52.5,
            "lon": 13.4,
            "recordedAt": future,
        },  # 7 future
        {
            "driverId": inactive.driver_id,
            "lat": b_spot[0],
            "lon": b_spot[1],
        },  # 8 deactivated
        {"driverId": "", "lat": 52.5, "lon": 13.4},  # 9 empty id
        {"driverId": offline.driver_id, "lat": float("nan"), "lon": 13.4},  # 10 NaN
        {
            "driverId": offline.driver_id,
            "lat": 52.5,
            "lon": float("inf"),
        },  # 11 infinity
    ]
    raw = json.dumps(
        {"pings": pings}
    ).encode()  # NaN and Infinity as JavaScript writes them
    assert b"NaN" in raw and b"Infinity" in raw
    resp = await api.client.post(
        "/drivers/locations",
        data=raw,
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["accepted"] == 2, body
    rejected = body["rejected"]
    assert [r["index"] for r in rejected] == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    for item in rejected:
        assert (
            set(item) == {"index", "detail"}
            and isinstance(item["detail"], str)
            and item["detail"]
        )

    await api.settle()
    a_row, b_row = (
        await driver_row(pg_pool, available),
        await driver_row(pg_pool, offline),
    )
    assert (a_row["lat"], a_row["lon"]) == pytest.approx(a_spot)
    assert (b_row["lat"], b_row["lon"]) == pytest.approx(b_spot)
    assert (
        b_row["zone_id"] == zoning.zone_of(*b_spot)
        and b_row["last_seen_at"] is not None
    )
    assert (await driver_row(pg_pool, inactive))["lat"] is None
    assert available.driver_id in await geo_members(
        redis_client, zoning.zone_of(*a_spot)
    )
    assert not await in_any_geo_key(redis_client, offline.driver_id)
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers") == 3

    empty = await api.client.post(
        "/drivers/locations", json={"pings": []}, headers=api.admin
    )
    assert await empty.json() == {"accepted": 0, "rejected": []}


async def test_batch_pings_limits_and_auth(api: Api, pg_pool: asyncpg.Pool) -> None:
    driver = await api.create_driver()
    item = {"driverId": driver.driver_id, "lat": BERLIN[0], "lon": BERLIN[1]}
    await problem(
        await api.client.post(
            "/drivers/locations", json={"pings": [item]}, headers=driver.auth
        ),
        403,
    )
    await problem(
        await api.client.post("/drivers/locations", json={"pings": [item]}), 401
    )
    # 1001 small items stay under the 64 KiB body limit: the item count is what is refused.
    too_many: dict[str, list[dict[str, Any]]] = {"pings": [{}] * 1001}
    await validation_problem(
        await api.client.post("/drivers/locations", json=too_many, headers=api.admin)
    )
    for bad in ({"pings": "all"}, {}, {"pings": None}, [item]):
        await validation_problem(
            await api.client.post("/drivers/locations", json=bad, headers=api.admin)
        )
    assert (await driver_row(pg_pool, driver))["lat"] is None

    # Exactly 1000 items are accepted when they fit in 64 KiB (repeats of one fix are not errors).
    pings = [{"driverId": driver.driver_id, "lat": BERLIN[0], "lon": BERLIN[1]}] * 1000
    raw = json.dumps({"pings": pings}, separators=(",", ":")).encode()
    assert len(raw) <= 64 * 1024
    resp = await api.client.post(
        "/drivers/locations",
        data=raw,
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body == {"accepted": 1000, "rejected": []}
    await api.settle()
    assert (
        (await driver_row(pg_pool, driver))["lat"],
        (await driver_row(pg_pool, driver))["lon"],
    ) == BERLIN


# ---- PATCH /drivers/{id}/status ------------------------------------------------------------


async def test_status_changes_are_reflected_in_postgres_and_geo(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    driver = await api.create_driver()
    other = await api.create_driver("other")
    assert (await api.ping(driver, *BERLIN)).status == 204
    zone = (await driver_row(pg_pool, driver))["zone_id"]

    resp = await api.set_status(driver, "AVAILABLE")
    assert resp.status == 200
    assert await resp.json() == {"driverId": driver.driver_id, "status": "AVAILABLE"}
    assert (await driver_row(pg_pool, driver))["status"] == "AVAILABLE"
    assert driver.driver_id in await geo_members(redis_client, zone)

    # Setting the current status again is harmless.
    assert (await api.set_status(driver, "AVAILABLE")).status == 200
    assert driver.driver_id in await geo_members(redis_client, zone)

    resp = await api.client.patch(
        f"/drivers/{driver.driver_id}/status",
        json={"status": "OFFLINE"},
        headers=api.admin,
    )
    assert await resp.json() == {"driverId": driver.driver_id, "status": "OFFLINE"}
    assert (await driver_row(pg_pool, driver))["status"] == "OFFLINE"
    assert driver.driver_id not in await geo_members(redis_client, zone)

    path = f"/drivers/{driver.driver_id}/status"
    await problem(
        await api.client.patch(path, json={"status": "AVAILABLE"}, headers=other.auth),
        403,
    )
    await problem(await api.client.patch(path, json={"status": "AVAILABLE"}), 401)
    for bad in (
        {"status": "BUSY"},
        {"status": "available"},
        {"status": "SLEEPING"},
        {},
        {"status": None},
    ):
        await validation_problem(
            await api.client.patch(path, json=bad, headers=driver.auth)
        )
    await problem(
        await api.client.patch(
            "/drivers/drv_missing/status", json={"status": "OFFLINE"}, headers=api.admin
        ),
        404,
    )
    assert (await driver_row(pg_pool, driver))["status"] == "OFFLINE"

    # A driver never located can go AVAILABLE, but is not in any GEO key until it pings.
    assert (await api.set_status(other, "AVAILABLE")).status == 200
    assert not await in_any_geo_key(redis_client, other.driver_id)


async def test_busy_driver_cannot_change_status(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    driver = await api.online_driver(*BERLIN)
    assert (await (await api.order("SO-busy", *BERLIN)).json())[
        "driverId"
    ] == driver.driver_id
    for status in ("OFFLINE", "AVAILABLE"):
        await problem(await api.set_status(driver, status), 409)
        resp = await api.client.patch(
            f"/drivers/{driver.driver_id}/status",
            json={"status": status},
            headers=api.admin,
        )
        await problem(resp, 409)
    assert (await driver_row(pg_pool, driver))["status"] == "BUSY"
    assert not await in_any_geo_key(redis_client, driver.driver_id)


# ---- heartbeat and body size ------------------------------------------------------------


async def test_a_fix_older_than_the_heartbeat_ttl_does_not_make_a_driver_dispatchable(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    driver = await api.create_driver()
    assert (await api.set_status(driver, "AVAILABLE")).status == 200
    old = datetime.now(UTC) - timedelta(seconds=api.settings.heartbeat_ttl_s + 30)
    assert (await api.ping(driver, *BERLIN, recorded_at=old)).status == 204
    row = await driver_row(pg_pool, driver)
    assert row["last_seen_at"] == old
    assert not await in_any_geo_key(redis_client, driver.driver_id)
    assert (await (await api.order("SO-old-fix", *BERLIN)).json())["assigned"] is False

    assert (await api.ping(driver, *BERLIN)).status == 204
    assert driver.driver_id in await geo_members(redis_client, row["zone_id"])
    assert (await (await api.order("SO-old-fix", *BERLIN)).json())[
        "driverId"
    ] == driver.driver_id


async def test_a_silent_driver_leaves_the_mirror_and_is_not_dispatched(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
) -> None:
    # Long enough for a ping and the check after it on a starved machine (the driver
    # must still be fresh then), short enough to wait out; the wait is the condition's.
    api: Api = await start_api(make_settings(heartbeat_ttl_s=5.0))
    # Wake the zone's actor first, so its start-up does not eat into the TTL.
    assert (
        await api.ping(await api.create_driver("warm-up"), *offset(*BERLIN, 1.0, 0.0))
    ).status == 204
    driver = await api.online_driver(*BERLIN)
    zone = (await driver_row(pg_pool, driver))["zone_id"]
    assert driver.driver_id in await geo_members(redis_client, zone)
    # Past the TTL, a 0.5 s sweep drops it: wait for that, not for a fixed time.
    deadline = time.monotonic() + WAIT_CEILING_S
    while driver.driver_id in await geo_members(redis_client, zone):
        assert time.monotonic() < deadline, "a silent driver stayed in the mirror"
        await asyncio.sleep(0.1)
    assert (await (await api.order("SO-silent", *BERLIN)).json())["assigned"] is False
    assert (await driver_row(pg_pool, driver))["status"] == "AVAILABLE"

    assert (await api.ping(driver, *BERLIN)).status == 204
    assert (await (await api.order("SO-silent", *BERLIN)).json())[
        "driverId"
    ] == driver.driver_id


async def test_driver_route_bodies_over_64_kib_are_413(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.create_driver()
    big = json.dumps({"name": "x", "pad": "y" * (64 * 1024)}).encode()
    headers = {**api.admin, "Content-Type": "application/json"}
    # (POST /drivers/locations reads up to 256 KiB: test_hostile_http.py covers it.)
    for method, path in (
        ("POST", "/drivers"),
        ("PATCH", f"/drivers/{driver.driver_id}/location"),
        ("PATCH", f"/drivers/{driver.driver_id}/status"),
        ("PATCH", f"/drivers/{driver.driver_id}"),
    ):
        await problem(
            await api.client.request(method, path, data=big, headers=headers), 413
        )
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers") == 1
    assert (await driver_row(pg_pool, driver))["lat"] is None
