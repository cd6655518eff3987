"""Hypothesis properties: request models on arbitrary JSON, geo maths, zoning coverage."""

from __future__ import annotations

import contextlib
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st
from pydantic import BaseModel, ValidationError

from dispatcher.api.body import parse
from dispatcher.api.routes.drivers import DriverQuery, _batch_item, to_ping
from dispatcher.errors import RequestValidationError
from dispatcher.geo import EARTH_RADIUS_KM, MAX_LATITUDE, bounding_box, haversine_km
from dispatcher.models import (
    BatchPing,
    BatchPings,
    BatchPingsEnvelope,
    CreateDriver,
    EmptyBody,
    FailDelivery,
    LocationPing,
    SellerOrderCancelled,
    SellerOrderReady,
    StatusChange,
    UpdateDriver,
)
from dispatcher.zoning import Zoning
from tests.support import destination

# About two minutes of generated examples in all: with the fault suite, behind `slow`.
pytestmark = pytest.mark.slow

# Deterministic and bounded for CI; `--hypothesis-seed` or a profile can widen it.
PROPERTY = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
REQUEST_MODELS: list[type[BaseModel]] = [
    SellerOrderReady,
    SellerOrderCancelled,
    LocationPing,
    BatchPing,
    BatchPingsEnvelope,
    BatchPings,
    CreateDriver,
    UpdateDriver,
    StatusChange,
    FailDelivery,
    EmptyBody,
]
FIELD_NAMES = sorted(
    {
        alias
        for model in REQUEST_MODELS
        for name, f in model.model_fields.items()
        for alias in (name, f.alias or name)
    }
    | {"lat", "lon"}
)

# ---- arbitrary JSON ----------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.sampled_from(["", "\x00", "NaN", "52.5"]),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=6)
    ),
    max_leaves=25,
)
# Objects that look like the real bodies, so validation gets past the first field.
bodyish = st.dictionaries(keys, json_values, max_size=8)


def encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda m: m.__name__)
@PROPERTY
@given(value=st.one_of(bodyish, json_values))
def test_request_models_raise_only_validation_errors_on_any_json(
    model: type[BaseModel], value: Any
) -> None:
    with contextlib.suppress(ValidationError):
        model.model_validate_json(encode(value))
    with _only(RequestValidationError):
        parse(encode(value), model)


@PROPERTY
@given(raw=st.binary(max_size=200))
def test_any_bytes_are_a_validation_error_or_a_model(raw: bytes) -> None:
    for model in REQUEST_MODELS:
        with _only(ValidationError):
            model.model_validate_json(raw)


@PROPERTY
@given(item=st.one_of(bodyish, json_values))
def test_a_batch_item_is_a_ping_or_a_validation_error(item: Any) -> None:
    with _only(ValidationError):
        _batch_item(item)


@PROPERTY
@given(
    query=st.dictionaries(
        st.sampled_from(["status", "zoneId", "limit", "x"]), st.text(max_size=40)
    )
)
def test_query_strings_are_a_query_or_a_validation_error(query: dict[str, str]) -> None:
    with _only(ValidationError):
        DriverQuery.model_validate(query)


class _only:
    """Lets `allowed` (or nothing) escape; anything else fails the property."""

    def __init__(self, allowed: type[BaseException]) -> None:
        self.allowed = allowed

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if kind is None or issubclass(kind, self.allowed):
            return True
        raise AssertionError(f"{kind.__name__} escaped: {exc!r}") from exc


# ---- valid inputs round-trip -----------------------------------------------------------

lats = st.floats(min_value=-MAX_LATITUDE, max_value=MAX_LATITUDE, allow_nan=False)
lons = st.floats(min_value=-180.0, max_value=180.0, allow_nan=False)
order_ids = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_characters="".join(map(chr, [*range(32), 127]))
    ),
    min_size=1,
    max_size=128,
)
aware = st.datetimes(
    min_value=datetime(1971, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [UTC, *(timezone(timedelta(hours=h)) for h in (-12, -3, 1, 5, 14))]
    ),
)


@PROPERTY
@given(
    seller_order_id=st.one_of(
        order_ids, st.integers(min_value=0, max_value=10**20).map(str)
    ),
    lat=lats,
    lon=lons,
    nested=st.booleans(),
    drop=st.none() | st.tuples(lats, lons),
)
def test_valid_orders_round_trip_in_both_shapes(
    seller_order_id: str,
    lat: float,
    lon: float,
    nested: bool,
    drop: tuple[float, float] | None,
) -> None:
    body: dict[str, Any] = {"sellerOrderId": seller_order_id}
    body.update(
        {"pickup": {"lat": lat, "lon": lon}}
        if nested
        else {"pickupLat": lat, "pickupLon": lon}
    )
    if drop is not None:
        body["drop"] = {"lat": drop[0], "lon": drop[1]}
    event = SellerOrderReady.model_validate_json(encode(body))
    assert (event.seller_order_id, event.pickup_point) == (seller_order_id, (lat, lon))
    assert (None if event.drop is None else (event.drop.lat, event.drop.lon)) == drop
    again = SellerOrderReady.model_validate_json(event.model_dump_json(by_alias=True))
    assert again == event
    if (
        seller_order_id.isascii()
        and seller_order_id.isdigit()
        and len(seller_order_id) <= 18
    ):
        as_number = SellerOrderReady.model_validate_json(
            encode({**body, "sellerOrderId": int(seller_order_id)})
        )
        assert as_number.seller_order_id == str(int(seller_order_id))


@PROPERTY
# Driver ids are printable: control characters are refused (models.BatchPing).
@given(
    driver_id=st.text(
        st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=64
    ),
    lat=lats,
    lon=lons,
    recorded=st.none() | aware,
)
def test_valid_pings_round_trip(
    driver_id: str, lat: float, lon: float, recorded: datetime | None
) -> None:
    body: dict[str, Any] = {"driverId": driver_id, "lat": lat, "lon": lon}
    if recorded is not None:
        body["recordedAt"] = recorded.isoformat()
    ping = BatchPing.model_validate_json(encode(body))
    assert (ping.driver_id, ping.lat, ping.lon, ping.recorded_at) == (
        driver_id,
        lat,
        lon,
        recorded,
    )
    assert BatchPing.model_validate_json(ping.model_dump_json(by_alias=True)) == ping
    assert _batch_item(body) == ping
    now = datetime.now(UTC)
    if recorded is None or recorded <= now:
        fix = to_ping(driver_id, ping, now)
        assert fix.recorded_at == (now if recorded is None else recorded)
        assert fix.recorded_at.utcoffset() == timedelta(0)


@PROPERTY
@example(stamp="9999-12-31T23:59:59-14:00")
@example(stamp="0001-01-01T00:00:00+00:01")
@given(stamp=st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()))
def test_any_accepted_recorded_at_gives_a_fix_or_a_validation_error(stamp: str) -> None:
    """Bug (open): an offset that moves the time past year 1..9999 in UTC makes
    `astimezone` raise OverflowError, answered 500 (test_hostile_limits has the HTTP form)."""
    try:
        ping = LocationPing.model_validate_json(
            encode({"lat": 1.0, "lon": 2.0, "recordedAt": stamp})
        )
    except ValidationError:
        return
    with _only(RequestValidationError):
        to_ping("drv_x", ping, datetime.now(UTC))


@PROPERTY
@given(name=st.text(min_size=1, max_size=200), active=st.none() | st.booleans())
def test_operator_bodies_round_trip_or_refuse_control_characters(
    name: str, active: bool | None
) -> None:
    body = {"name": name} if active is None else {"name": name, "isActive": active}
    control = any(ord(c) < 32 or ord(c) == 127 for c in name)
    try:
        update = UpdateDriver.model_validate_json(encode(body))
    except ValidationError:
        assert control
        return
    assert not control and (update.name, update.is_active) == (name, active)
    assert CreateDriver.model_validate_json(encode({"name": name})).name == name


# ---- geo maths ---------------------------------------------------------------------------------


any_lat = st.floats(min_value=-90.0, max_value=90.0)
any_lon = st.floats(min_value=-180.0, max_value=180.0)
# Centres biased towards the edges: the antimeridian and Redis' latitude limit.
edge_lat = st.one_of(
    lats,
    st.floats(min_value=MAX_LATITUDE - 1.0, max_value=MAX_LATITUDE),
    st.floats(min_value=-MAX_LATITUDE, max_value=-MAX_LATITUDE + 1.0),
)
edge_lon = st.one_of(
    lons,
    st.floats(min_value=179.0, max_value=180.0),
    st.floats(min_value=-180.0, max_value=-179.0),
)
HALF_CIRCUMFERENCE_KM = math.pi * EARTH_RADIUS_KM


@PROPERTY
@given(
    a=st.tuples(any_lat, any_lon),
    b=st.tuples(any_lat, any_lon),
    c=st.tuples(any_lat, any_lon),
)
def test_haversine_is_a_metric_on_the_sphere(
    a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]
) -> None:
    ab, ba = haversine_km(*a, *b), haversine_km(*b, *a)
    assert ab == pytest.approx(ba, abs=1e-6)
    assert 0.0 <= ab <= HALF_CIRCUMFERENCE_KM + 1e-6
    assert haversine_km(*a, *a) == 0.0
    assert haversine_km(*a, *c) <= ab + haversine_km(*b, *c) + 1e-6
    # Longitudes 360 degrees apart are the same place.
    assert haversine_km(a[0], a[1], b[0], b[1] + 360.0) == pytest.approx(ab, abs=1e-6)


@PROPERTY
@given(
    lat=edge_lat,
    lon=edge_lon,
    radius=st.floats(min_value=0.001, max_value=100.0),
    bearing=st.floats(min_value=0.0, max_value=360.0),
    share=st.floats(min_value=0.0, max_value=1.0),
)
def test_bounding_box_contains_every_point_within_the_radius(
    lat: float, lon: float, radius: float, bearing: float, share: float
) -> None:
    plat, plon = destination(lat, lon, bearing, radius * share)
    assume(haversine_km(lat, lon, plat, plon) <= radius)
    min_lat, max_lat, min_lon, max_lon = bounding_box(lat, lon, radius)
    assert min_lat <= plat <= max_lat
    # The box is not wrapped at ±180: PICK_SQL also tries the longitude shifted by 360.
    assert any(min_lon <= plon + shift <= max_lon for shift in (-360.0, 0.0, 360.0)), (
        plon,
        min_lon,
        max_lon,
    )


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(
    resolution=st.sampled_from([4, 5, 6]),
    lat=edge_lat,
    lon=edge_lon,
    radius=st.floats(min_value=0.01, max_value=15.0),
    bearing=st.floats(min_value=0.0, max_value=360.0),
    share=st.floats(min_value=0.0, max_value=1.0),
)
def test_zones_near_covers_every_point_within_the_radius(
    resolution: int, lat: float, lon: float, radius: float, bearing: float, share: float
) -> None:
    zoning = Zoning(resolution)
    plat, plon = destination(lat, lon, bearing, radius * share)
    assume(haversine_km(lat, lon, plat, plon) <= radius)
    plon = (plon + 180.0) % 360.0 - 180.0
    near = zoning.zones_near(lat, lon, radius)
    assert near[0] == zoning.zone_of(lat, lon)
    assert zoning.zone_of(plat, plon) in near
