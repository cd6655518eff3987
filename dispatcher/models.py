"""Pydantic v2 wire models: every request and response body of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from dispatcher.geo import MAX_LATITUDE
from dispatcher.rules import Assignment

MAX_BATCH_PINGS = 1000


def _int_id_to_str(value: Any) -> Any:
    # Vendure ids are often integers; a JSON number names the same order as its string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    # JSON (and JSON Schema's "integer") has no separate integer type: 42.0 is 42.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value


# Text that may be logged or stored: no control characters (PostgreSQL text cannot hold NUL).
NO_CONTROL_CHARS = r"[^\x00-\x1f\x7f]"
NO_CONTROL = rf"^{NO_CONTROL_CHARS}+$"
# The same rule for optional text, which may be empty.
NO_CONTROL_OR_EMPTY = rf"^{NO_CONTROL_CHARS}*$"
ORDER_ID_MAX = 128
# Opaque id: 1-128 characters, no control characters; an integer names the order of its
# decimal string, so it may have at most 128 characters too (sign included).
ORDER_ID_SCHEMA = {
    "anyOf": [
        {
            "type": "string",
            "minLength": 1,
            "maxLength": ORDER_ID_MAX,
            "pattern": NO_CONTROL,
        },
        {
            "type": "integer",
            "minimum": -(10 ** (ORDER_ID_MAX - 1) - 1),
            "maximum": 10**ORDER_ID_MAX - 1,
        },
    ],
    "description": "An opaque id; a JSON integer (also 42.0) names the same order as its decimal"
    " string. Send ids beyond 2^53 as strings: few JSON parsers keep such numbers exact.",
}
OrderId = Annotated[
    str,
    BeforeValidator(_int_id_to_str),
    Field(min_length=1, max_length=ORDER_ID_MAX, pattern=NO_CONTROL),
    WithJsonSchema(ORDER_ID_SCHEMA, mode="validation"),
]
Latitude = Annotated[
    float, Field(ge=-MAX_LATITUDE, le=MAX_LATITUDE, allow_inf_nan=False)
]
Longitude = Annotated[float, Field(ge=-180.0, le=180.0, allow_inf_nan=False)]
DriverStatus = Literal["AVAILABLE", "BUSY", "OFFLINE"]
DeliveryStatus = Literal["ASSIGNED", "PICKED_UP", "DELIVERED", "FAILED", "CANCELLED"]
ShortText = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_CONTROL)]


class RequestModel(BaseModel):
    """Strict request body: wrong JSON types are errors, never coerced."""

    model_config = ConfigDict(
        strict=True,
        frozen=True,
        extra="ignore",
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
    )


class OperatorRequestModel(RequestModel):
    """Operator bodies reject unknown fields, so a typo (`isactive`) is not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        serialize_by_alias=True,
        validate_by_name=True,
        validate_by_alias=True,
    )


class LatLon(RequestModel):
    lat: Latitude
    lon: Longitude


READY_EVENT = "seller-order-ready"
CANCELLED_EVENT = "seller-order-cancelled"
# Fields only an order-ready event carries: a cancel body holding any of them is an
# order-ready message sent to the wrong route (api/inbound.py refuses it).
READY_ONLY_FIELDS = ("pickup", "pickupLat", "pickupLon", "drop")


class SellerOrderReady(RequestModel):
    """Both body shapes: flat `pickupLat/pickupLon` or nested `pickup {lat, lon}`.

    The schema names one shape at a time (the server also takes both when they agree).
    """

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["pickup"],
                    "properties": {
                        "pickup": {"type": "object"},
                        "pickupLat": {"type": "null"},
                        "pickupLon": {"type": "null"},
                    },
                },
                {
                    "required": ["pickupLat", "pickupLon"],
                    "properties": {
                        "pickupLat": {"type": "number"},
                        "pickupLon": {"type": "number"},
                        "pickup": {"type": "null"},
                    },
                },
            ]
        }
    )

    type: Literal["seller-order-ready"] | None = Field(
        default=None, description="Optional; when sent, it must name this event."
    )
    seller_order_id: OrderId
    # Ignored, but still text that could be logged: no control characters.
    event_id: str | None = Field(
        default=None, max_length=256, pattern=NO_CONTROL_OR_EMPTY
    )
    channel_id: str | None = Field(
        default=None, max_length=256, pattern=NO_CONTROL_OR_EMPTY
    )
    pickup_lat: Latitude | None = None
    pickup_lon: Longitude | None = None
    pickup: LatLon | None = None
    drop: LatLon | None = None

    @model_validator(mode="after")
    def _one_pickup(self) -> SellerOrderReady:
        flat = (self.pickup_lat, self.pickup_lon)
        if self.pickup is None:
            if None in flat:
                raise ValueError(
                    "pickup location required: pickupLat and pickupLon, or pickup {lat, lon}"
                )
        elif flat != (None, None) and flat != (self.pickup.lat, self.pickup.lon):
            raise ValueError("pickupLat/pickupLon and pickup disagree")
        return self

    @property
    def pickup_point(self) -> tuple[float, float]:
        if self.pickup is not None:
            return self.pickup.lat, self.pickup.lon
        assert self.pickup_lat is not None and self.pickup_lon is not None
        return self.pickup_lat, self.pickup_lon


# Free text such as a failure reason: newlines allowed, NUL never (PostgreSQL text).
Reason = Annotated[str, Field(min_length=1, max_length=500, pattern=r"^[^\x00]+$")]


class SellerOrderCancelled(RequestModel):
    """No order-ready field may appear: a signed order-ready body is never a cancel."""

    model_config = ConfigDict(
        json_schema_extra={
            "not": {"anyOf": [{"required": [name]} for name in READY_ONLY_FIELDS]}
        }
    )

    type: Literal["seller-order-cancelled"] | None = Field(
        default=None, description="Optional; when sent, it must name this event."
    )
    seller_order_id: OrderId
    reason: Reason | None = None


class LocationPing(RequestModel):
    lat: Latitude
    lon: Longitude
    recorded_at: AwareDatetime | None = None


class BatchPing(LocationPing):
    driver_id: Annotated[str, Field(min_length=1, max_length=64, pattern=NO_CONTROL)]


class BatchPingsEnvelope(RequestModel):
    # Items are validated one by one so one bad ping does not reject its batch.
    pings: Annotated[list[Any], Field(max_length=MAX_BATCH_PINGS)]


class BatchPings(RequestModel):
    """Schema-only twin of BatchPingsEnvelope, for the OpenAPI document."""

    pings: Annotated[list[BatchPing], Field(max_length=MAX_BATCH_PINGS)]


class CreateDriver(OperatorRequestModel):
    name: ShortText
    phone: (
        Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[0-9+() .-]+$")]
        | None
    ) = None
    vehicle_type: (
        Annotated[str, Field(min_length=1, max_length=40, pattern=NO_CONTROL)] | None
    ) = None


class UpdateDriver(OperatorRequestModel):
    """At least one change: `{}` (or only nulls) is refused."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {
                    "required": ["isActive"],
                    "properties": {"isActive": {"type": "boolean"}},
                },
                {"required": ["name"], "properties": {"name": {"type": "string"}}},
            ]
        }
    )

    is_active: bool | None = None
    name: ShortText | None = None
    # Booked at once when chosen, in every offer mode.
    auto_accept: bool | None = None

    @model_validator(mode="after")
    def _something(self) -> UpdateDriver:
        if self.is_active is None and self.name is None and self.auto_accept is None:
            raise ValueError("nothing to change: give isActive, name and/or autoAccept")
        return self


class StatusChange(RequestModel):
    status: Literal["AVAILABLE", "OFFLINE"]


class FailDelivery(RequestModel):
    reason: Reason


class EmptyBody(RequestModel):
    """Steps that carry no data accept `{}` or no body at all."""


# ---- responses -------------------------------------------------------------------


class AssignedResponse(ResponseModel):
    assigned: Literal[True] = True
    seller_order_id: str
    driver_id: str
    assignment_id: str
    distance_km: float
    zone_id: str


class UnassignedResponse(ResponseModel):
    assigned: Literal[False] = False
    seller_order_id: str
    reason: Literal["NO_DRIVER_AVAILABLE"] = "NO_DRIVER_AVAILABLE"


def assigned_body(assignment: Assignment) -> str:
    """The answer to an order that booked a driver; stored, so replays send these bytes."""
    return AssignedResponse(
        seller_order_id=assignment.seller_order_id,
        driver_id=assignment.driver_id,
        assignment_id=assignment.assignment_id,
        distance_km=assignment.distance_km,
        zone_id=assignment.zone_id,
    ).model_dump_json()


def unassigned_body(seller_order_id: str) -> str:
    """The answer to an order no driver could take."""
    return UnassignedResponse(seller_order_id=seller_order_id).model_dump_json()


class Point(ResponseModel):
    lat: float
    lon: float


class DriverCreated(ResponseModel):
    driver_id: str
    token: str
    name: str
    status: DriverStatus
    is_active: bool


class ActiveDelivery(ResponseModel):
    seller_order_id: str
    assignment_id: str
    status: DeliveryStatus


class DriverView(ResponseModel):
    driver_id: str
    name: str
    phone: str | None
    vehicle_type: str | None
    status: DriverStatus
    is_active: bool
    location: Point | None
    last_seen_at: datetime | None
    zone_id: str | None
    active_delivery: ActiveDelivery | None
    # Booked at once when chosen, in the offer modes too (docs/OFFERS.md).
    auto_accept: bool = False


class DriverList(ResponseModel):
    drivers: list[DriverView]


class DriverStatusView(ResponseModel):
    driver_id: str
    status: DriverStatus


class PingRejection(ResponseModel):
    index: int
    detail: str


class BatchPingResult(ResponseModel):
    accepted: int
    rejected: list[PingRejection]


class HistoryEntry(ResponseModel):
    status: DeliveryStatus
    at: datetime


class DeliveryView(ResponseModel):
    seller_order_id: str
    status: DeliveryStatus
    driver_id: str
    assignment_id: str
    zone_id: str
    distance_km: float
    pickup: Point
    drop: Point | None
    assigned_at: datetime
    picked_up_at: datetime | None
    delivered_at: datetime | None
    failed_at: datetime | None
    cancelled_at: datetime | None
    failure_reason: str | None
    history: list[HistoryEntry]


class Health(ResponseModel):
    status: Literal["ok"] = "ok"


class Readiness(ResponseModel):
    postgres: Literal["ok", "down"]
    redis: Literal["ok", "degraded"]
    ray: Literal["ok", "down"]
    zones: int
    outbox_pending: int
    webhooks: Literal["ok", "unconfigured", "disabled"]


class ZoneView(ResponseModel):
    zone_id: str
    drivers: int
    available: int
    actor: Literal["alive", "restarting"]
    # Offers of this zone's dispatches waiting for an answer (cascade and wave).
    open_offers: int = 0


class ZoneList(ResponseModel):
    zones: list[ZoneView]


class ProblemItem(ResponseModel):
    loc: list[str | int]
    msg: str


class Problem(ResponseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemItem] | None = None
