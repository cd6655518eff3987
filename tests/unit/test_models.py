"""Request models: both event shapes, strict types, coordinate and id limits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from dispatcher.geo import MAX_LATITUDE
from dispatcher.models import (
    AssignedResponse,
    CreateDriver,
    LocationPing,
    SellerOrderReady,
    UpdateDriver,
)


def ready(**fields: Any) -> SellerOrderReady:
    return SellerOrderReady.model_validate_json(json.dumps(fields))


def test_flat_and_nested_shapes_give_the_same_pickup() -> None:
    flat = ready(sellerOrderId="SO-1", pickupLat=52.52, pickupLon=13.405)
    nested = ready(
        eventId="e-1",
        sellerOrderId="SO-1",
        channelId="default",
        pickup={"lat": 52.52, "lon": 13.405},
        drop={"lat": 52.5, "lon": 13.42},
        somethingNew=True,
    )
    assert flat.pickup_point == nested.pickup_point == (52.52, 13.405)
    assert nested.drop is not None and (nested.drop.lat, nested.drop.lon) == (
        52.5,
        13.42,
    )


def test_integer_order_ids_become_strings() -> None:
    assert ready(sellerOrderId=42, pickupLat=1, pickupLon=2).seller_order_id == "42"


@pytest.mark.parametrize(
    "fields",
    [
        {"pickupLat": 1, "pickupLon": 2},
        {"sellerOrderId": "", "pickupLat": 1, "pickupLon": 2},
        {"sellerOrderId": "x" * 129, "pickupLat": 1, "pickupLon": 2},
        {"sellerOrderId": "a\x00b", "pickupLat": 1, "pickupLon": 2},
        {"sellerOrderId": True, "pickupLat": 1, "pickupLon": 2},
        {"sellerOrderId": "SO", "pickupLat": "52.5", "pickupLon": 2},
        {"sellerOrderId": "SO", "pickupLat": None, "pickupLon": 2},
        {"sellerOrderId": "SO", "pickupLat": MAX_LATITUDE + 1e-6, "pickupLon": 2},
        {"sellerOrderId": "SO", "pickupLat": 1, "pickupLon": 180.5},
        {"sellerOrderId": "SO", "pickupLat": 1},
        {
            "sellerOrderId": "SO",
            "pickupLat": 1,
            "pickupLon": 2,
            "pickup": {"lat": 3, "lon": 2},
        },
        {"sellerOrderId": "SO"},
    ],
)
def test_bad_events_are_rejected(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ready(**fields)


@pytest.mark.parametrize(
    "raw",
    [
        '{"lat": NaN, "lon": 1}',
        '{"lat": 1e999, "lon": 1}',
        '{"lat": -Infinity, "lon": 1}',
    ],
)
def test_non_finite_coordinates_are_rejected(raw: str) -> None:
    with pytest.raises(ValidationError):
        LocationPing.model_validate_json(raw)


def test_recorded_at_must_carry_a_timezone() -> None:
    ok = LocationPing.model_validate_json(
        '{"lat": 1, "lon": 2, "recordedAt": "2026-11-22T10:00:00Z"}'
    )
    assert ok.recorded_at is not None and ok.recorded_at.utcoffset() is not None
    with pytest.raises(ValidationError):
        LocationPing.model_validate_json(
            '{"lat": 1, "lon": 2, "recordedAt": "2026-11-22T10:00:00"}'
        )


def test_operator_bodies_reject_unknown_fields_and_empty_updates() -> None:
    with pytest.raises(ValidationError):
        CreateDriver.model_validate_json('{"name": "Ada", "nmae": "typo"}')
    with pytest.raises(ValidationError):
        UpdateDriver.model_validate_json("{}")
    assert UpdateDriver.model_validate_json('{"isActive": false}').is_active is False


def test_responses_serialize_in_camel_case() -> None:
    body = AssignedResponse(
        seller_order_id="SO",
        driver_id="d",
        assignment_id="a",
        distance_km=0.84,
        zone_id="z",
    ).model_dump_json()
    assert json.loads(body) == {
        "assigned": True,
        "sellerOrderId": "SO",
        "driverId": "d",
        "assignmentId": "a",
        "distanceKm": 0.84,
        "zoneId": "z",
    }
