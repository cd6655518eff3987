"""Delivery routes: read one, and the driver's lifecycle steps."""

from __future__ import annotations

from aiohttp import web

from dispatcher.api.auth import authenticate
from dispatcher.api.body import parse_body, path_id
from dispatcher.api.keys import DISPATCHER
from dispatcher.api.responses import delivery_view, json_model
from dispatcher.api.spec import RouteSpec
from dispatcher.errors import ForbiddenError, NotFoundError
from dispatcher.models import DeliveryView, EmptyBody, FailDelivery


async def _authorized_delivery(request: web.Request) -> web.Response:
    """The delivery view, for the operator or the assigned driver only."""
    seller_order_id = path_id(request, "sellerOrderId")
    principal = await authenticate(request)
    found = await request.app[DISPATCHER].get_delivery(seller_order_id)
    if found is None:
        raise NotFoundError(f"no delivery for sellerOrderId {seller_order_id!r}")
    row, history = found
    if not principal.may_act_for(row["driver_id"]):
        raise ForbiddenError(
            "only the assigned driver or an operator may see or advance this delivery"
        )
    return json_model(delivery_view(row, history))


async def get_delivery(request: web.Request) -> web.StreamResponse:
    return await _authorized_delivery(request)


async def _advance(
    request: web.Request, step: str, reason: str | None
) -> web.StreamResponse:
    await request.app[DISPATCHER].step(
        path_id(request, "sellerOrderId"), step, reason=reason
    )
    return await _authorized_delivery(request)


async def picked_up(request: web.Request) -> web.StreamResponse:
    await _authorized_delivery(request)
    await parse_body(request, EmptyBody, empty_ok=True)
    return await _advance(request, "picked-up", None)


async def delivered(request: web.Request) -> web.StreamResponse:
    await _authorized_delivery(request)
    await parse_body(request, EmptyBody, empty_ok=True)
    return await _advance(request, "delivered", None)


async def failed(request: web.Request) -> web.StreamResponse:
    await _authorized_delivery(request)
    body = await parse_body(request, FailDelivery)
    return await _advance(request, "failed", body.reason)


_ERRORS = (401, 403, 404, 409, 413, 422, 503)
ROUTES = [
    RouteSpec(
        "GET",
        "/deliveries/{sellerOrderId}",
        get_delivery,
        "A delivery with its history",
        "driver",
        {200: DeliveryView},
        errors=(401, 403, 404, 503),
        tags=("deliveries",),
    ),
    RouteSpec(
        "POST",
        "/deliveries/{sellerOrderId}/picked-up",
        picked_up,
        "The driver picked the order up",
        "driver",
        {200: DeliveryView},
        body=EmptyBody,
        errors=_ERRORS,
        tags=("deliveries",),
    ),
    RouteSpec(
        "POST",
        "/deliveries/{sellerOrderId}/delivered",
        delivered,
        "Delivered; frees the driver",
        "driver",
        {200: DeliveryView},
        body=EmptyBody,
        errors=_ERRORS,
        tags=("deliveries",),
    ),
    RouteSpec(
        "POST",
        "/deliveries/{sellerOrderId}/failed",
        failed,
        "Failed with a reason; frees the driver",
        "driver",
        {200: DeliveryView},
        body=FailDelivery,
        errors=_ERRORS,
        tags=("deliveries",),
    ),
]
