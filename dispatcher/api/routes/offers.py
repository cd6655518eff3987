"""Offer routes: drivers answer their offers, operators watch and steer dispatches."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from dispatcher.api.auth import require_driver, require_operator
from dispatcher.api.body import parse_body, path_id
from dispatcher.api.keys import DISPATCHER, SETTINGS
from dispatcher.api.offers import OFFER_OPS, OfferRefused
from dispatcher.api.problems import validation_errors
from dispatcher.api.responses import delivery_view, json_model
from dispatcher.api.spec import RouteSpec
from dispatcher.errors import NotFoundError, RequestValidationError
from dispatcher.models import DeliveryView
from dispatcher.offers.wire import (
    DeclineOffer,
    DispatchViewBody,
    ForceAssign,
    OfferAnswered,
    OfferList,
    OfferQuery,
)


async def _delivery(request: web.Request, seller_order_id: str) -> web.Response:
    found = await request.app[DISPATCHER].get_delivery(seller_order_id)
    if found is None:
        raise NotFoundError(f"no delivery for sellerOrderId {seller_order_id!r}")
    return json_model(delivery_view(*found))


async def list_offers(request: web.Request) -> web.StreamResponse:
    driver_id = path_id(request, "driverId")
    await require_driver(request, driver_id)
    try:
        query = OfferQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise RequestValidationError(
            "invalid query", errors=validation_errors(exc, "query")
        ) from None
    if await request.app[DISPATCHER].get_driver(driver_id) is None:
        raise NotFoundError(f"driver {driver_id} not found")
    return json_model(
        await request.app[OFFER_OPS].driver_offers(driver_id, query.status)
    )


async def accept_offer(request: web.Request) -> web.StreamResponse:
    driver_id = path_id(request, "driverId")
    await require_driver(request, driver_id)
    offer_id = path_id(request, "offerId")
    try:
        order = await request.app[OFFER_OPS].accept(driver_id, offer_id)
    except OfferRefused as exc:
        return exc.response
    return await _delivery(request, order)


async def decline_offer(request: web.Request) -> web.StreamResponse:
    driver_id = path_id(request, "driverId")
    await require_driver(request, driver_id)
    offer_id = path_id(request, "offerId")
    body = await parse_body(request, DeclineOffer, empty_ok=True)
    try:
        await request.app[OFFER_OPS].decline(driver_id, offer_id, body.reason)
    except OfferRefused as exc:
        return exc.response
    return json_model(OfferAnswered(offer_id=offer_id, status="DECLINED"))


async def get_dispatch(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    order = path_id(request, "sellerOrderId")
    found = await request.app[OFFER_OPS].dispatch(order)
    if found is None:
        raise NotFoundError(f"no dispatch for sellerOrderId {order!r}")
    return json_model(found)


async def force_assign(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    order = path_id(request, "sellerOrderId")
    body = await parse_body(request, ForceAssign)
    await request.app[DISPATCHER].settle_pings()
    try:
        await request.app[OFFER_OPS].force_assign(order, body.driver_id)
    except OfferRefused as exc:
        return exc.response
    return await _delivery(request, order)


async def redispatch(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    order = path_id(request, "sellerOrderId")
    await request.app[DISPATCHER].settle_pings()
    try:
        found = await request.app[OFFER_OPS].redispatch(
            order, request.app[SETTINGS].dispatch_deadline_s
        )
    except OfferRefused as exc:
        return exc.response
    return json_model(found)


_DRIVER_ERRORS = (401, 403, 404, 409, 413, 422, 503)
ROUTES = [
    RouteSpec(
        "GET",
        "/drivers/{driverId}/offers",
        list_offers,
        "The driver's offers, newest first",
        "driver",
        {200: OfferList},
        query=OfferQuery,
        errors=(401, 403, 404, 422, 503),
        tags=("offers",),
    ),
    RouteSpec(
        "POST",
        "/drivers/{driverId}/offers/{offerId}/accept",
        accept_offer,
        "Accept an offer: the driver is booked (409 with a reason when refused)",
        "driver",
        {200: DeliveryView},
        errors=_DRIVER_ERRORS,
        tags=("offers",),
    ),
    RouteSpec(
        "POST",
        "/drivers/{driverId}/offers/{offerId}/decline",
        decline_offer,
        "Decline an offer; the next candidate is offered at once",
        "driver",
        {200: OfferAnswered},
        body=DeclineOffer,
        errors=_DRIVER_ERRORS,
        tags=("offers",),
    ),
    RouteSpec(
        "GET",
        "/dispatches/{sellerOrderId}",
        get_dispatch,
        "A dispatch with each offer and its outcome",
        "operator",
        {200: DispatchViewBody},
        errors=(401, 403, 404, 503),
        tags=("offers",),
    ),
    RouteSpec(
        "POST",
        "/dispatches/{sellerOrderId}/assign",
        force_assign,
        "Force-assign an AVAILABLE driver; withdraws the open offers",
        "operator",
        {200: DeliveryView},
        body=ForceAssign,
        errors=_DRIVER_ERRORS,
        tags=("offers",),
    ),
    RouteSpec(
        "POST",
        "/dispatches/{sellerOrderId}/redispatch",
        redispatch,
        "Start the dispatch again (new attempt, new deadline)",
        "operator",
        {200: DispatchViewBody},
        errors=(401, 403, 404, 409, 503),
        tags=("offers",),
    ),
]
