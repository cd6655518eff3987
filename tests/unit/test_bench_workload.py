"""Bench workload: driver placement, request bodies within the API's limits, the request file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dispatcher.api.app import MAX_BODY_BYTES
from dispatcher.bench.reqfile import (
    RequestSpec,
    decode_line,
    encode_line,
    read_requests,
    write_requests,
)
from dispatcher.bench.workload import (
    CITY_RADIUS_KM,
    MAX_BODY_BYTES as BENCH_MAX_BODY_BYTES,
    ORDER_CITIES,
    PINGS_CITY,
    ZONE_RESOLUTION,
    batch_bodies,
    dense_city_points,
    disc_points,
    make_drivers,
    order_request,
    ping_request,
    zone_centres,
    zoned_points,
)
from dispatcher.geo import haversine_km
from dispatcher.models import (
    MAX_BATCH_PINGS,
    BatchPing,
    BatchPingsEnvelope,
    LocationPing,
)
from dispatcher.webhooks.signing import new_secret, verify
from dispatcher.zoning import Zoning


def test_body_limit_matches_the_service() -> None:
    assert BENCH_MAX_BODY_BYTES == MAX_BODY_BYTES


def test_disc_points_stay_inside_the_disc() -> None:
    points = disc_points(random.Random(1), PINGS_CITY, CITY_RADIUS_KM, 500)
    assert len(points) == 500
    # The flat-earth offset is within a few metres over 12 km.
    assert (
        max(haversine_km(*PINGS_CITY, lat, lon) for lat, lon in points)
        <= CITY_RADIUS_KM * 1.01
    )


def test_dense_city_has_most_drivers_near_the_centre() -> None:
    points = dense_city_points(random.Random(2), PINGS_CITY, 2000)
    near = sum(haversine_km(*PINGS_CITY, lat, lon) <= 3.0 for lat, lon in points)
    assert near > 1000


def test_order_fleet_is_exactly_eight_zones() -> None:
    centres = zone_centres(ORDER_CITIES)
    points = zoned_points(random.Random(3), centres, 800)
    zoning = Zoning(ZONE_RESOLUTION)
    zones = {zoning.zone_of(lat, lon) for lat, lon in points}
    assert len(zones) == 8


def test_ping_request_is_a_valid_ping_for_its_driver() -> None:
    (driver,) = make_drivers([(52.5, 13.4)])
    spec = ping_request(driver)
    assert spec.method == "PATCH"
    assert spec.path == f"/drivers/{driver.driver_id}/location"
    assert ("Authorization", f"Bearer {driver.token}") in spec.headers
    assert driver.token.startswith(driver.driver_id + ".")
    LocationPing.model_validate_json(spec.body)


def test_batch_bodies_fit_the_limits_and_carry_every_driver_once() -> None:
    drivers = make_drivers(disc_points(random.Random(4), PINGS_CITY, 5.0, 2500))
    bodies = batch_bodies(drivers)
    seen: list[str] = []
    sizes = []
    for body in bodies:
        assert len(body) <= MAX_BODY_BYTES
        envelope = BatchPingsEnvelope.model_validate_json(body)
        assert 0 < len(envelope.pings) <= MAX_BATCH_PINGS
        sizes.append(len(envelope.pings))
        seen += [BatchPing.model_validate(p).driver_id for p in envelope.pings]
    assert seen == [d.driver_id for d in drivers]
    # Service-shaped ids take about 70 bytes per ping: 1000 do not fit 64 KiB.
    assert 800 < sizes[0] < MAX_BATCH_PINGS


def test_batch_bodies_respect_a_small_item_limit() -> None:
    drivers = make_drivers([(1.0, 1.0)] * 5)
    assert [
        len(json.loads(b)["pings"]) for b in batch_bodies(drivers, max_items=2)
    ] == [2, 2, 1]


def test_order_request_is_signed_with_the_inbound_secret() -> None:
    secret = new_secret()
    spec = order_request("SO-1", (52.5, 13.4), secret, 1_700_000_000)
    headers = dict(spec.headers)
    assert (
        verify([secret], headers, spec.body, now=1_700_000_000) == headers["webhook-id"]
    )
    assert json.loads(spec.body) == {
        "sellerOrderId": "SO-1",
        "pickupLat": 52.5,
        "pickupLon": 13.4,
    }


def test_request_file_round_trips(tmp_path: Path) -> None:
    specs = [
        RequestSpec(
            "PATCH",
            "/a",
            (("Authorization", "Bearer x.y"), ("webhook-signature", "v1,ab+/=")),
            b'{"a":1}',
        ),
        RequestSpec("GET", "/b", (), b""),
    ]
    path = tmp_path / "r.requests"
    assert write_requests(path, specs) == 2
    assert read_requests(path) == specs
    assert path.stat().st_mode & 0o077 == 0


def test_request_file_refuses_separators() -> None:
    with pytest.raises(ValueError):
        encode_line(RequestSpec("GET", "/a\tb", (), b""))
    with pytest.raises(ValueError):
        encode_line(RequestSpec("POST", "/a", (), b"x\ny"))
    assert decode_line(encode_line(RequestSpec("GET", "/", (), b"{}"))).body == b"{}"
