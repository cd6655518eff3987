"""Vendure's signed events: one signature authorizes exactly one event on one route."""

from __future__ import annotations

import json
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

from dispatcher.api.auth import verify_inbound
from dispatcher.api.body import parse, read_body
from dispatcher.api.keys import INBOUND_IDS
from dispatcher.errors import UnauthorizedError
from dispatcher.models import CANCELLED_EVENT, READY_EVENT, READY_ONLY_FIELDS

M = TypeVar("M", bound=BaseModel)

READY = READY_EVENT
CANCELLED = CANCELLED_EVENT
# The model's fields by their JSON names and by their Python names (both are accepted).
_READY_ONLY_KEYS = frozenset(READY_ONLY_FIELDS) | {"pickup_lat", "pickup_lon"}


def _bound_to(event_type: str, raw: bytes) -> None:
    """401 unless the body can be an event of `event_type` (Standard Webhooks signs
    id, timestamp and body, not the URL, so the body must name its event)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return  # not JSON: the model refuses it with a 422
    if not isinstance(body, dict):
        return
    declared = body.get("type")
    if declared is not None and declared != event_type:
        raise UnauthorizedError(f"the signed event is not a {event_type} event")
    if event_type == CANCELLED and _READY_ONLY_KEYS & body.keys():
        raise UnauthorizedError(f"the signed event is not a {event_type} event")


async def accept_event(request: web.Request, event_type: str, model: type[M]) -> M:
    """The event's body, once its signature, its event type and its webhook-id hold.

    The id is recorded only for a valid body (bad input writes nothing). The same id
    with the same body on the same route is a sender's retry and passes again; the
    same id on another route or with another body is a replay: 401.
    """
    raw = await read_body(request)
    signed = verify_inbound(request, raw)
    _bound_to(event_type, raw)
    event = parse(raw, model)
    ids = request.app[INBOUND_IDS]
    if not await ids.claim(
        signed.webhook_id, event_type, raw, signed_at=signed.timestamp
    ):
        raise UnauthorizedError("this webhook-id was already used for another event")
    return event
