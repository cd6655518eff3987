"""What the load is made of: where drivers are, and the exact requests, stored one per line."""

from __future__ import annotations

import json
import math
import random
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.bench.reqfile import RequestSpec
from dispatcher.models import MAX_BATCH_PINGS
from dispatcher.webhooks.signing import sign
from dispatcher.zoning import Zoning

# CONTRACT §3's body limit (dispatcher/api/app.py MAX_BODY_BYTES, not imported: that
# module pulls in Ray); a unit test keeps the two equal.
MAX_BODY_BYTES = 64 * 1024
# The service's default zone resolution (DISPATCHER_ZONE_RESOLUTION); the bench runs
# `serve` with its defaults, so clusters placed inside one such cell stay one zone.
ZONE_RESOLUTION = 5
# One degree of latitude, for turning km offsets into coordinates.
KM_PER_DEG_LAT = 111.32
# Coordinates are sent to 6 decimals (≈ 0.1 m), as a phone app would.
COORD_DECIMALS = 6

# Scenario 1 and 3 cities; scenario 2 uses the eight cells in ORDER_CITIES. Distinct
# cities keep each scenario's drivers out of the others' searches in one shared stack.
PINGS_CITY = (52.5200, 13.4050)  # Berlin
LOOKUP_CITY = (48.8566, 2.3522)  # Paris
ORDER_CITIES = (
    (53.5511, 9.9937),  # Hamburg
    (48.1351, 11.5820),  # Munich
    (50.9375, 6.9603),  # Cologne
    (50.1109, 8.6821),  # Frankfurt
    (48.7758, 9.1829),  # Stuttgart
    (51.2277, 6.7735),  # Düsseldorf
    (51.3397, 12.3731),  # Leipzig
    (51.0504, 13.7373),  # Dresden
)
# A city of scenario 1: drivers spread over a disc this wide (several zones).
CITY_RADIUS_KM = 12.0
# Scenario 2: each zone's drivers stay this close to their cell's centre, well inside
# a resolution-5 cell (≈ 8.6 km inner radius), so 8 cities are exactly 8 zones.
ZONE_CLUSTER_RADIUS_KM = 3.0
# Scenario 3 "dense centre": this share of drivers within a Gaussian of this sigma.
DENSE_SHARE = 0.6
DENSE_SIGMA_KM = 1.5
# Seconds of unmeasured orders before the orders scenario's first run.
ORDER_WARMUP_S = 2.0


@dataclass(frozen=True, slots=True)
class Driver:
    driver_id: str
    token: str
    lat: float
    lon: float


# ---- geometry ------------------------------------------------------------------------


def offset(
    lat: float, lon: float, north_km: float, east_km: float
) -> tuple[float, float]:
    """The point `north_km`/`east_km` away (flat-earth approximation, fine below 50 km)."""
    dlat = north_km / KM_PER_DEG_LAT
    dlon = east_km / (KM_PER_DEG_LAT * math.cos(math.radians(lat)))
    return round(lat + dlat, COORD_DECIMALS), round(lon + dlon, COORD_DECIMALS)


def disc_points(
    rng: random.Random, centre: tuple[float, float], radius_km: float, n: int
) -> list[tuple[float, float]]:
    """n points uniformly spread over a disc."""
    points = []
    for _ in range(n):
        r = radius_km * math.sqrt(rng.random())
        angle = rng.uniform(0.0, 2.0 * math.pi)
        points.append(
            offset(centre[0], centre[1], r * math.cos(angle), r * math.sin(angle))
        )
    return points


def dense_city_points(
    rng: random.Random, centre: tuple[float, float], n: int
) -> list[tuple[float, float]]:
    """A city with a dense centre: a Gaussian core plus a uniform disc around it."""
    core = round(n * DENSE_SHARE)
    points = []
    for _ in range(core):
        north, east = rng.gauss(0.0, DENSE_SIGMA_KM), rng.gauss(0.0, DENSE_SIGMA_KM)
        points.append(offset(centre[0], centre[1], north, east))
    points.extend(disc_points(rng, centre, CITY_RADIUS_KM, n - core))
    return points


def zone_centres(cities: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Centre of the service's zone (H3 cell) holding each city."""
    zoning = Zoning(ZONE_RESOLUTION)
    return [zoning.centre_of(zoning.zone_of(lat, lon)) for lat, lon in cities]


def zoned_points(
    rng: random.Random, centres: Sequence[tuple[float, float]], n: int
) -> list[tuple[float, float]]:
    """n points shared round-robin over tight clusters, one per zone centre."""
    return [
        disc_points(rng, centres[i % len(centres)], ZONE_CLUSTER_RADIUS_KM, 1)[0]
        for i in range(n)
    ]


def make_drivers(points: Sequence[tuple[float, float]]) -> list[Driver]:
    """Drivers with ids and tokens shaped like the service's own (`drv_` + 20 hex)."""
    drivers = []
    for lat, lon in points:
        driver_id = "drv_" + uuid.uuid4().hex[:20]
        drivers.append(
            Driver(driver_id, f"{driver_id}.{secrets.token_urlsafe(32)}", lat, lon)
        )
    return drivers


# ---- requests ------------------------------------------------------------------------

JSON_HEADER = ("Content-Type", "application/json")


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def ping_request(driver: Driver) -> RequestSpec:
    """PATCH /drivers/{id}/location with the driver's own token."""
    headers = (("Authorization", f"Bearer {driver.token}"), JSON_HEADER)
    body = _json({"lat": driver.lat, "lon": driver.lon})
    return RequestSpec("PATCH", f"/drivers/{driver.driver_id}/location", headers, body)


def batch_bodies(
    drivers: Sequence[Driver],
    *,
    max_items: int = MAX_BATCH_PINGS,
    max_bytes: int = MAX_BODY_BYTES,
) -> list[bytes]:
    """POST /drivers/locations bodies: as many pings as fit both limits, every driver once."""
    bodies: list[bytes] = []
    items: list[bytes] = []
    size = len(b'{"pings":[]}')
    for d in drivers:
        item = _json({"driverId": d.driver_id, "lat": d.lat, "lon": d.lon})
        extra = len(item) + (1 if items else 0)
        if items and (len(items) >= max_items or size + extra > max_bytes):
            bodies.append(b'{"pings":[' + b",".join(items) + b"]}")
            items, size, extra = [], len(b'{"pings":[]}'), len(item)
        items.append(item)
        size += extra
    if items:
        bodies.append(b'{"pings":[' + b",".join(items) + b"]}")
    return bodies


def batch_request(body: bytes, admin_token: str) -> RequestSpec:
    headers = (("Authorization", f"Bearer {admin_token}"), JSON_HEADER)
    return RequestSpec("POST", "/drivers/locations", headers, body)


def order_request(
    seller_order_id: str, pickup: tuple[float, float], secret: str, now_s: int
) -> RequestSpec:
    """seller-order-ready signed with the inbound secret (Standard Webhooks)."""
    body = _json(
        {
            "sellerOrderId": seller_order_id,
            "pickupLat": pickup[0],
            "pickupLon": pickup[1],
        }
    )
    msg_id = f"msg_{uuid.uuid4().hex}"
    headers = (
        JSON_HEADER,
        ("webhook-id", msg_id),
        ("webhook-timestamp", str(now_s)),
        ("webhook-signature", sign(secret, msg_id, now_s, body)),
    )
    return RequestSpec("POST", "/events/seller-order-ready", headers, body)


def order_requests(
    prefix: str, pickups: Sequence[tuple[float, float]], n: int, secret: str
) -> list[RequestSpec]:
    """n distinct orders (ids `prefix-i`), pickups rotating; signed now, valid for 300 s."""
    now_s = int(time.time())
    return [
        order_request(f"{prefix}-{i}", pickups[i % len(pickups)], secret, now_s)
        for i in range(n)
    ]
