"""Vendure's signed events: seller order ready (assign) and cancelled."""

from __future__ import annotations

from aiohttp import web

from dispatcher.api.inbound import CANCELLED, READY, accept_event
from dispatcher.api.keys import DISPATCHER, METRICS
from dispatcher.api.offers import cancel_dispatch
from dispatcher.api.responses import delivery_view, json_model, json_text
from dispatcher.api.spec import RouteSpec
from dispatcher.errors import ConflictError, NotFoundError
from dispatcher.messages import AssignRequest
from dispatcher.models import (
    AssignedResponse,
    DeliveryView,
    SellerOrderCancelled,
    SellerOrderReady,
    UnassignedResponse,
)
from dispatcher.offers.wire import AwaitingResponse, DispatchViewBody

REPLAYED_HEADER = "Idempotent-Replayed"


async def seller_order_ready(request: web.Request) -> web.StreamResponse:
    event = await accept_event(request, READY, SellerOrderReady)
    lat, lon = event.pickup_point
    drop = event.drop
    req = AssignRequest(
        seller_order_id=event.seller_order_id,
        pickup_lat=lat,
        pickup_lon=lon,
        drop_lat=None if drop is None else drop.lat,
        drop_lon=None if drop is None else drop.lon,
    )
    result = await request.app[DISPATCHER].assign(req)
    request.app[METRICS].assignments.labels(result.kind, result.path).inc()
    if result.kind == "conflict":
        raise ConflictError(
            f"sellerOrderId {req.seller_order_id!r} is already assigned with a different pickup location"
        )
    headers = {REPLAYED_HEADER: "true"} if result.kind == "replayed" else None
    return json_text(result.body, headers=headers)


async def seller_order_cancelled(request: web.Request) -> web.StreamResponse:
    event = await accept_event(request, CANCELLED, SellerOrderCancelled)
    # An order still waiting for an accept has no delivery: its offers are withdrawn.
    waiting = await cancel_dispatch(request.app, event.seller_order_id)
    if waiting is not None:
        return json_model(waiting)
    dispatcher = request.app[DISPATCHER]
    await dispatcher.step(event.seller_order_id, "cancelled", reason=event.reason)
    found = await dispatcher.get_delivery(event.seller_order_id)
    if found is None:
        raise NotFoundError(f"no delivery for sellerOrderId {event.seller_order_id!r}")
    return json_model(delivery_view(*found))


ROUTES = [
    RouteSpec(
        "POST",
        "/events/seller-order-ready",
        seller_order_ready,
        "Assign the nearest dispatchable driver to a seller order (idempotent on sellerOrderId)",
        "signature",
        # AwaitingResponse: in the offer modes (docs/OFFERS.md).
        {200: AssignedResponse | UnassignedResponse | AwaitingResponse},
        body=SellerOrderReady,
        errors=(401, 409, 413, 422, 503),
        tags=("events",),
    ),
    RouteSpec(
        "POST",
        "/events/seller-order-cancelled",
        seller_order_cancelled,
        "Cancel the order's delivery and free its driver (idempotent)",
        "signature",
        # DispatchViewBody: an order still waiting for an accept (offer modes).
        {200: DeliveryView | DispatchViewBody},
        body=SellerOrderCancelled,
        errors=(401, 404, 409, 413, 422, 503),
        tags=("events",),
    ),
]
