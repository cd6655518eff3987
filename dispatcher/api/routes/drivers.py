"""Driver routes: registration, reads, activation, location pings, status."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from aiohttp import web
from pydantic import ConfigDict, Field, ValidationError

from dispatcher.api.auth import require_driver, require_operator
from dispatcher.api.body import (
    MAX_BATCH_BODY_BYTES,
    parse,
    parse_body,
    path_id,
    read_body,
)
from dispatcher.api.keys import DISPATCHER, METRICS
from dispatcher.api.problems import validation_errors
from dispatcher.api.ratelimit import check_ping_rate, ping_limiter, rate_limited_detail
from dispatcher.api.responses import driver_view, json_model
from dispatcher.api.spec import RouteSpec
from dispatcher.errors import (
    DispatchError,
    ForbiddenError,
    NotFoundError,
    RequestValidationError,
    ServiceUnavailableError,
    TooManyRequestsError,
)
from dispatcher.messages import Ping, PingVerdict
from dispatcher.models import (
    NO_CONTROL,
    BatchPing,
    BatchPingResult,
    BatchPings,
    BatchPingsEnvelope,
    CreateDriver,
    DriverCreated,
    DriverList,
    DriverStatusView,
    DriverView,
    LocationPing,
    PingRejection,
    RequestModel,
    StatusChange,
    UpdateDriver,
)

# Phones' clocks drift a little; a fix further in the future than this would block
# every later, correct fix (older recordedAt are ignored), so it is refused.
MAX_CLOCK_SKEW = timedelta(seconds=30)
DEFAULT_LIST_LIMIT = 500
# The `dispatcher_pings_total` verdict label of pings refused by the per-driver rate limit.
RATE_LIMITED = "rate_limited"


class DriverQuery(RequestModel):
    # Query strings are text: "limit=10" must coerce.
    model_config = ConfigDict(strict=False)
    status: Literal["AVAILABLE", "BUSY", "OFFLINE"] | None = None
    zone_id: str | None = Field(default=None, max_length=32, pattern=NO_CONTROL)
    limit: Annotated[int, Field(ge=1, le=5000)] = DEFAULT_LIST_LIMIT


def to_ping(driver_id: str, body: LocationPing, now: datetime) -> Ping:
    try:
        recorded = (
            body.recorded_at.astimezone(UTC) if body.recorded_at is not None else now
        )
    except OverflowError:
        # e.g. 9999-12-31T23:59:59-14:00 is past the last representable UTC instant.
        raise RequestValidationError(
            "recordedAt is out of range",
            errors=[
                {
                    "loc": ["body", "recordedAt"],
                    "msg": "outside the representable range",
                }
            ],
        ) from None
    if recorded > now + MAX_CLOCK_SKEW:
        raise RequestValidationError(
            "recordedAt is in the future",
            errors=[
                {"loc": ["body", "recordedAt"], "msg": "more than 30 s in the future"}
            ],
        )
    return Ping(driver_id=driver_id, lat=body.lat, lon=body.lon, recorded_at=recorded)


VERDICT_ERRORS: dict[PingVerdict, type[DispatchError]] = {
    PingVerdict.UNKNOWN_DRIVER: NotFoundError,
    PingVerdict.INACTIVE: ForbiddenError,
    PingVerdict.TOO_FAST: RequestValidationError,
}
VERDICT_DETAILS = {
    PingVerdict.UNKNOWN_DRIVER: "unknown driver",
    PingVerdict.INACTIVE: "driver is deactivated",
    PingVerdict.TOO_FAST: "implausible jump: faster than the maximum speed since the last fix",
}


async def create_driver(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    body = await parse_body(request, CreateDriver)
    record, token = await request.app[DISPATCHER].create_driver(
        body.name, body.phone, body.vehicle_type
    )
    created = DriverCreated(
        driver_id=record.id,
        token=token,
        name=record.name,
        status="OFFLINE",
        is_active=record.is_active,
    )
    return json_model(created, status=201)


async def list_drivers(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    try:
        query = DriverQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise RequestValidationError(
            "invalid query", errors=validation_errors(exc, "query")
        ) from None
    await request.app[DISPATCHER].settle_pings()
    records = await request.app[DISPATCHER].list_drivers(
        query.status, query.zone_id, query.limit
    )
    return json_model(DriverList(drivers=[driver_view(r) for r in records]))


async def get_driver(request: web.Request) -> web.StreamResponse:
    driver_id = path_id(request, "driverId")
    await require_driver(request, driver_id)
    await request.app[DISPATCHER].settle_pings()
    record = await request.app[DISPATCHER].get_driver(driver_id)
    if record is None:
        raise NotFoundError(f"driver {driver_id} not found")
    return json_model(driver_view(record))


async def update_driver(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    body = await parse_body(request, UpdateDriver)
    record = await request.app[DISPATCHER].update_driver(
        path_id(request, "driverId"),
        is_active=body.is_active,
        name=body.name,
        auto_accept=body.auto_accept,
    )
    return json_model(driver_view(record))


async def ping_location(request: web.Request) -> web.StreamResponse:
    driver_id = path_id(request, "driverId")
    await require_driver(request, driver_id, check_active=False)
    # After authentication, so nobody can drain another driver's bucket.
    try:
        check_ping_rate(request, driver_id)
    except TooManyRequestsError:
        request.app[METRICS].count_pings(RATE_LIMITED)
        raise
    ping = to_ping(
        driver_id, await parse_body(request, LocationPing), datetime.now(UTC)
    )
    verdict = await request.app[DISPATCHER].ping(ping)
    request.app[METRICS].count_pings(verdict.value)
    error = VERDICT_ERRORS.get(verdict)
    if error is not None:
        detail = VERDICT_DETAILS[verdict]
        errors = (
            [{"loc": ["body"], "msg": detail}]
            if error is RequestValidationError
            else None
        )
        raise error(detail, errors=errors)
    return web.Response(status=204)


async def ping_batch(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    items = _batch_items(await read_body(request, limit=MAX_BATCH_BODY_BYTES))
    now = datetime.now(UTC)
    limiter = ping_limiter(request.app)
    metrics = request.app[METRICS]
    # A batch takes one token per driver it names, however many of that driver's
    # fixes it carries; when there is none, each of that driver's entries is rejected.
    waits: dict[str, float] = {}
    rejected: list[PingRejection] = []
    pings: list[Ping] = []
    positions: list[int] = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, ValidationError):
                raise item
            fix = to_ping(item.driver_id, item, now)
        except (ValidationError, DispatchError) as exc:
            rejected.append(PingRejection(index=index, detail=_reason(exc)))
            continue
        wait = waits.get(fix.driver_id)
        if wait is None:
            wait = waits[fix.driver_id] = limiter.take(fix.driver_id)
        if wait > 0:
            metrics.count_pings(RATE_LIMITED)
            rejected.append(
                PingRejection(index=index, detail=rate_limited_detail(limiter, wait))
            )
            continue
        pings.append(fix)
        positions.append(index)
    outcomes = await request.app[DISPATCHER].ping_many(pings)
    unavailable = next(
        (o.error for o in outcomes if isinstance(o.error, ServiceUnavailableError)),
        None,
    )
    if unavailable is not None:
        # Retrying the whole batch is safe (fixes are idempotent by recordedAt), so a
        # gateway is told to retry rather than shown pings as "rejected".
        raise unavailable
    counts: Counter[PingVerdict] = Counter()
    for index, outcome in zip(positions, outcomes, strict=True):
        if outcome.verdict is not None:
            counts[outcome.verdict] += 1
        if outcome.verdict is not None and outcome.verdict not in VERDICT_ERRORS:
            continue
        detail = (
            VERDICT_DETAILS[outcome.verdict]
            if outcome.verdict is not None
            else str(outcome.error)
        )
        rejected.append(PingRejection(index=index, detail=detail))
    for verdict, count in counts.items():
        metrics.count_pings(verdict.value, count)
    accepted = counts[PingVerdict.ACCEPTED] + counts[PingVerdict.STALE]
    rejected.sort(key=lambda r: r.index)
    return json_model(BatchPingResult(accepted=accepted, rejected=rejected))


def _batch_items(raw: bytes) -> list[BatchPing] | list[BatchPing | ValidationError]:
    """The batch's items, each valid or with its validation error."""
    with contextlib.suppress(ValidationError):
        # The common case, every item valid: one pass in pydantic-core.
        return BatchPings.model_validate_json(raw).pings
    envelope = parse(raw, BatchPingsEnvelope)
    items: list[BatchPing | ValidationError] = []
    for item in envelope.pings:
        try:
            items.append(_batch_item(item))
        except ValidationError as exc:
            items.append(exc)
    return items


def _batch_item(item: object) -> BatchPing:
    # Items arrive decoded; re-encoding lets them be validated exactly as JSON bodies.
    return BatchPing.model_validate_json(json.dumps(item, allow_nan=True))


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False, include_input=False)[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'item'}: {first['msg']}"
    return str(exc)


async def change_status(request: web.Request) -> web.StreamResponse:
    driver_id = path_id(request, "driverId")
    await require_driver(request, driver_id)
    body = await parse_body(request, StatusChange)
    record = await request.app[DISPATCHER].set_status(driver_id, body.status)
    return json_model(DriverStatusView(driver_id=record.id, status=record.status))


ROUTES = [
    RouteSpec(
        "POST",
        "/drivers",
        create_driver,
        "Register a driver; returns its token once",
        "operator",
        {201: DriverCreated},
        body=CreateDriver,
        errors=(401, 403, 413, 422, 503),
        tags=("drivers",),
    ),
    RouteSpec(
        "GET",
        "/drivers",
        list_drivers,
        "List drivers, optionally by status and zone",
        "operator",
        {200: DriverList},
        query=DriverQuery,
        errors=(401, 403, 422, 503),
        tags=("drivers",),
    ),
    RouteSpec(
        "POST",
        "/drivers/locations",
        ping_batch,
        "Batched location pings (gateways), at most 1000",
        "operator",
        {200: BatchPingResult},
        body=BatchPings,
        errors=(401, 403, 413, 422, 503),
        tags=("drivers",),
    ),
    RouteSpec(
        "GET",
        "/drivers/{driverId}",
        get_driver,
        "One driver with location and active delivery",
        "driver",
        {200: DriverView},
        errors=(401, 403, 404, 503),
        tags=("drivers",),
    ),
    RouteSpec(
        "PATCH",
        "/drivers/{driverId}",
        update_driver,
        "Activate or deactivate a driver, rename",
        "operator",
        {200: DriverView},
        body=UpdateDriver,
        errors=(401, 403, 404, 413, 422, 503),
        tags=("drivers",),
    ),
    RouteSpec(
        "PATCH",
        "/drivers/{driverId}/location",
        ping_location,
        "Location ping: refreshes location and heartbeat; never changes status",
        "driver",
        {204: None},
        body=LocationPing,
        errors=(401, 403, 404, 413, 422, 429, 503),
        tags=("drivers",),
    ),
    RouteSpec(
        "PATCH",
        "/drivers/{driverId}/status",
        change_status,
        "Go AVAILABLE or OFFLINE",
        "driver",
        {200: DriverStatusView},
        body=StatusChange,
        errors=(401, 403, 404, 409, 413, 422, 503),
        tags=("drivers",),
    ),
]
