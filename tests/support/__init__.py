"""Test helpers: a real webhook receiver, a signed-request client, driver factories."""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import h3
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from dispatcher.actors.core import ZoneCore
from dispatcher.api.keys import DISPATCHER
from dispatcher.config import ResolvedSettings
from dispatcher.geo import EARTH_RADIUS_KM
from dispatcher.messages import Ping, PingVerdict
from dispatcher.store import keys
from dispatcher.webhooks.signing import sign
from dispatcher.zoning import Zoning

# Re-exported: the names most tests import from here.
from tests.support.waits import WAIT_CEILING_S as WAIT_CEILING_S
from tests.support.webhooks import WebhookReceiver as WebhookReceiver

BERLIN = (52.52, 13.405)
Point = tuple[float, float]
PROBLEM_JSON = "application/problem+json"
# The tables of the core dispatch state (the first migration creates them).
CORE_TABLES = (
    "zones",
    "drivers",
    "deliveries",
    "delivery_history",
    "webhook_outbox",
    "webhook_endpoints",
)
# Every table: each test starts with all of them empty.
ALL_TABLES = (
    *CORE_TABLES,
    "driver_events",
    "driver_event_seq",
    "inbound_webhooks",
    "dispatches",
    "offers",
)

# Every route of docs/API.md#routes: (method, path).
API_ROUTES: list[tuple[str, str]] = [
    ("post", "/events/seller-order-ready"),
    ("post", "/events/seller-order-cancelled"),
    ("post", "/drivers"),
    ("get", "/drivers"),
    ("get", "/drivers/{driverId}"),
    ("get", "/drivers/{driverId}/events"),
    ("patch", "/drivers/{driverId}"),
    ("patch", "/drivers/{driverId}/location"),
    ("post", "/drivers/locations"),
    ("patch", "/drivers/{driverId}/status"),
    ("get", "/deliveries/{sellerOrderId}"),
    ("post", "/deliveries/{sellerOrderId}/picked-up"),
    ("post", "/deliveries/{sellerOrderId}/delivered"),
    ("post", "/deliveries/{sellerOrderId}/failed"),
    # Offers (cascade and wave modes).
    ("get", "/drivers/{driverId}/offers"),
    ("post", "/drivers/{driverId}/offers/{offerId}/accept"),
    ("post", "/drivers/{driverId}/offers/{offerId}/decline"),
    ("get", "/dispatches/{sellerOrderId}"),
    ("post", "/dispatches/{sellerOrderId}/assign"),
    ("post", "/dispatches/{sellerOrderId}/redispatch"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/zones"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/ops/snapshot"),
]


# A valid body for each guarded route (None: no body), so that only what a test makes
# hostile (the credentials, a path id) decides the answer.
VALID_BODIES: dict[tuple[str, str], dict[str, Any] | None] = {
    ("POST", "/drivers"): {"name": "intruder"},
    ("GET", "/drivers"): None,
    ("POST", "/drivers/locations"): {"pings": []},
    ("GET", "/drivers/{driverId}"): None,
    # Not a WebSocket upgrade: credentials are judged first, then 426.
    ("GET", "/drivers/{driverId}/events"): None,
    ("PATCH", "/drivers/{driverId}"): {"isActive": False},
    ("PATCH", "/drivers/{driverId}/location"): {"lat": BERLIN[0], "lon": BERLIN[1]},
    ("PATCH", "/drivers/{driverId}/status"): {"status": "OFFLINE"},
    ("GET", "/deliveries/{sellerOrderId}"): None,
    ("POST", "/deliveries/{sellerOrderId}/picked-up"): None,
    ("POST", "/deliveries/{sellerOrderId}/delivered"): None,
    ("POST", "/deliveries/{sellerOrderId}/failed"): {"reason": "shop closed"},
    ("GET", "/zones"): None,
    ("GET", "/ops/snapshot"): None,
    ("GET", "/drivers/{driverId}/offers"): None,
    ("POST", "/drivers/{driverId}/offers/{offerId}/accept"): None,
    ("POST", "/drivers/{driverId}/offers/{offerId}/decline"): {},
    ("GET", "/dispatches/{sellerOrderId}"): None,
    ("POST", "/dispatches/{sellerOrderId}/assign"): {"driverId": "drv_nobody"},
    ("POST", "/dispatches/{sellerOrderId}/redispatch"): None,
    ("POST", "/events/seller-order-ready"): {
        "sellerOrderId": "SO-x",
        "pickupLat": 52.52,
        "pickupLon": 13.405,
    },
    ("POST", "/events/seller-order-cancelled"): {"sellerOrderId": "SO-x"},
}


def destination(
    lat: float, lon: float, bearing_deg: float, km: float
) -> tuple[float, float]:
    """The point `km` away from (lat, lon) on a great circle (exact spherical formula);
    the longitude is not wrapped."""
    phi1, lmb1, theta = math.radians(lat), math.radians(lon), math.radians(bearing_deg)
    delta = km / EARTH_RADIUS_KM
    phi2 = math.asin(
        math.sin(phi1) * math.cos(delta)
        + math.cos(phi1) * math.sin(delta) * math.cos(theta)
    )
    lmb2 = lmb1 + math.atan2(
        math.sin(theta) * math.sin(delta) * math.cos(phi1),
        math.cos(delta) - math.sin(phi1) * math.sin(phi2),
    )
    return math.degrees(phi2), math.degrees(lmb2)


@dataclass
class Driver:
    driver_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Api:
    """The service under test, spoken to over real HTTP with real signatures and tokens."""

    def __init__(
        self, client: TestClient[Any, Any], settings: ResolvedSettings
    ) -> None:
        self.client = client
        self.settings = settings
        # remote_api (tests/faults) passes an aiohttp ClientSession typed as Any.
        self.in_process = isinstance(cast(object, client), TestClient)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token}"}

    def signed_headers(
        self, raw: bytes, *, secret: str | None = None, timestamp: int | None = None
    ) -> dict[str, str]:
        msg_id = "evt_" + uuid.uuid4().hex
        ts = int(time.time()) if timestamp is None else timestamp
        signature = sign(secret or self.settings.inbound_secret, msg_id, ts, raw)
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": signature,
            "content-type": "application/json",
        }

    async def signed_post(
        self, path: str, payload: dict[str, Any] | bytes, **kw: Any
    ) -> Any:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await self.client.post(
            path, data=raw, headers=self.signed_headers(raw, **kw)
        )

    async def order(
        self, seller_order_id: str, lat: float, lon: float, **extra: Any
    ) -> Any:
        body = {
            "sellerOrderId": seller_order_id,
            "pickupLat": lat,
            "pickupLon": lon,
            **extra,
        }
        return await self.signed_post("/events/seller-order-ready", body)

    async def cancel(self, seller_order_id: str) -> Any:
        return await self.signed_post(
            "/events/seller-order-cancelled", {"sellerOrderId": seller_order_id}
        )

    async def create_driver(self, name: str = "Driver") -> Driver:
        resp = await self.client.post(
            "/drivers", json={"name": name}, headers=self.admin
        )
        assert resp.status == 201, await resp.text()
        body = await resp.json()
        return Driver(body["driverId"], body["token"])

    async def ping(
        self,
        driver: Driver,
        lat: float,
        lon: float,
        recorded_at: datetime | None = None,
    ) -> Any:
        payload: dict[str, Any] = {"lat": lat, "lon": lon}
        if recorded_at is not None:
            payload["recordedAt"] = recorded_at.isoformat()
        resp = await self.client.patch(
            f"/drivers/{driver.driver_id}/location", json=payload, headers=driver.auth
        )
        if self.in_process:
            # In-process only: an out-of-process ingress may be killed mid-test.
            await self.settle()
        return resp

    async def settle(self) -> None:
        """Wait until the fixes the ingress acknowledged are written (write-behind), so
        a test can read PostgreSQL and Redis directly."""
        if self.in_process:
            await self.client.app[DISPATCHER].settle_pings(timeout_s=None)
            return
        # Out of process: the ingress's read barrier (reads see acknowledged fixes).
        resp = await self.client.get(
            "/drivers", params={"limit": "1"}, headers=self.admin
        )
        assert resp.status == 200, await resp.text()

    async def set_status(self, driver: Driver, status: str) -> Any:
        return await self.client.patch(
            f"/drivers/{driver.driver_id}/status",
            json={"status": status},
            headers=driver.auth,
        )

    async def online_driver(
        self, lat: float, lon: float, name: str = "Driver"
    ) -> Driver:
        """A dispatchable driver: registered, AVAILABLE, and pinged at (lat, lon)."""
        driver = await self.create_driver(name)
        resp = await self.set_status(driver, "AVAILABLE")
        assert resp.status == 200, await resp.text()
        resp = await self.ping(driver, lat, lon)
        assert resp.status == 204, await resp.text()
        return driver

    async def step(
        self,
        driver: Driver,
        seller_order_id: str,
        step: str,
        body: dict[str, Any] | None = None,
    ) -> Any:
        return await self.client.post(
            f"/deliveries/{seller_order_id}/{step}",
            json=body or {},
            headers=driver.auth,
        )


def offset(
    lat: float, lon: float, north_km: float, east_km: float
) -> tuple[float, float]:
    """A point `north_km` north and `east_km` east of (lat, lon) (small distances)."""
    import math

    dlat = north_km / 111.195
    dlon = east_km / (111.195 * math.cos(math.radians(lat)))
    return lat + dlat, lon + dlon


async def geo_members(redis: Redis, zone_id: str) -> set[str]:
    """Driver ids in the zone's Redis GEO key."""
    return as_text(await redis.zrange(keys.zone_geo(zone_id), 0, -1))


async def problem(resp: ClientResponse, status: int) -> dict[str, Any]:
    """The RFC 9457 body of an error answer, after checking its shape."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.headers["Content-Type"].startswith(PROBLEM_JSON), resp.headers[
        "Content-Type"
    ]
    body: dict[str, Any] = json.loads(text)
    assert body["status"] == status
    for key in ("type", "title", "detail"):
        assert isinstance(body[key], str) and body[key], body
    return body


async def validation_problem(resp: ClientResponse) -> dict[str, Any]:
    body = await problem(resp, 422)
    errors = body["errors"]
    assert isinstance(errors, list) and errors, body
    for item in errors:
        assert set(item) >= {"loc", "msg"}, item
        assert isinstance(item["loc"], list) and isinstance(item["msg"], str), item
    return body


def zone_cells(home: str) -> list[str]:
    """The home cell and its six neighbours: seven zones that share borders."""
    cells = [str(c) for c in h3.grid_disk(home, 1)]
    return [home, *sorted(c for c in cells if c != home)]


def point_in(rng: random.Random, zoning: Zoning, cell: str) -> Point:
    """A uniformly random point strictly inside `cell`."""
    clat, clon = zoning.centre_of(cell)
    reach = float(h3.average_hexagon_edge_length(zoning.resolution, "km"))
    while True:
        point = offset(
            clat, clon, rng.uniform(-reach, reach), rng.uniform(-reach, reach)
        )
        if zoning.zone_of(*point) == cell:
            return point


def as_text(values: Any) -> set[str]:
    """Members of a bytes-mode Redis reply as strings."""
    return {v.decode() if isinstance(v, bytes) else str(v) for v in values}


async def located_drivers(core: ZoneCore, spots: list[Point]) -> list[str]:
    """Drivers registered, AVAILABLE, and located through `core`'s ping path."""
    ids = []
    for n, _ in enumerate(spots):
        record, _ = await core.drivers.create(f"z{n}", None, None)
        await core.drivers.set_status(record.id, "AVAILABLE")
        ids.append(record.id)
    now = datetime.now(UTC)
    verdicts = await core.apply_pings(
        [Ping(d, *p, now) for d, p in zip(ids, spots, strict=True)]
    )
    assert verdicts == [PingVerdict.ACCEPTED] * len(ids)
    return ids


def with_headers(headers: dict[str, str], **changes: str | None) -> dict[str, str]:
    """A copy of `headers` with each change applied (`webhook_id=...` sets `webhook-id`;
    None removes the header)."""
    out = dict(headers)
    for name, value in changes.items():
        key = name.replace("_", "-")
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out
