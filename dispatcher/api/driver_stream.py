"""GET /drivers/{driverId}/events: a driver's WebSocket event stream (auth, resume, live push)."""

from __future__ import annotations

import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Final, Literal

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dispatcher.api.auth import Principal, require_driver
from dispatcher.api.body import path_id
from dispatcher.api.event_hub import (
    CLOSE_GOING_AWAY,
    CLOSE_TIMEOUT_S,
    CLOSE_TRY_AGAIN,
    EventHub,
)
from dispatcher.api.keys import DISPATCHER, EVENT_HUB, METRICS, PG_POOL, SETTINGS
from dispatcher.api.problems import validation_errors
from dispatcher.api.spec import RouteSpec
from dispatcher.api.stream_metrics import StreamMetrics
from dispatcher.errors import (
    NotFoundError,
    RequestValidationError,
    UnauthorizedError,
    UpgradeRequiredError,
)
from dispatcher.models import RequestModel
from dispatcher.store.driver_events import DriverEventStore
from dispatcher.store.pg import DOWN_ERRORS

# A browser cannot set headers on a WebSocket: it authenticates with its first message,
# within this long, or the socket is closed with CLOSE_UNAUTHENTICATED.
AUTH_TIMEOUT_S: Final = 5.0
CLOSE_UNAUTHENTICATED: Final = 4401
CLOSE_FORBIDDEN: Final = 4403
AUTH_CLOSE_REASONS: Final = {
    CLOSE_UNAUTHENTICATED: b'send {"type": "auth", "token": ...} first',
    CLOSE_FORBIDDEN: b"this token may not watch this driver",
    CLOSE_TRY_AGAIN: b"database unavailable; reconnect with after",
}
# Tokens in URLs end up in access logs and browser history: refused, never read.
QUERY_TOKEN_NAMES: Final = ("token", "access_token")
# The client only ever sends its auth message (and control frames).
MAX_CLIENT_MESSAGE: Final = 4096
# aiohttp waits this long for the client's answer to a ping before closing the socket.
PONG_WAIT_FRACTION: Final = 0.5


def silent_client_closed_after_s(heartbeat_s: float) -> float:
    """A client that stops answering is closed this long after its last frame:
    one heartbeat until the ping, then aiohttp's wait for the pong (heartbeat / 2)."""
    return heartbeat_s * (1 + PONG_WAIT_FRACTION)


class StreamQuery(RequestModel):
    # Query strings are text: "after=5" must coerce.
    model_config = ConfigDict(strict=False)
    after: int | None = Field(default=None, ge=0, le=2**63 - 1)


class EventMessage(BaseModel):
    """One event on the socket; `seq` counts up from 1 per driver, with no gaps."""

    seq: int
    type: str = Field(
        description="delivery.assigned, delivery.cancelled, delivery.picked_up, "
        "delivery.delivered, delivery.failed, offer.created, offer.withdrawn, offer.expired"
    )
    at: datetime
    data: dict[str, Any]


class ResyncMessage(BaseModel):
    """The events after `after` were pruned: refetch the driver's state over REST."""

    type: Literal["resync"]


def _query(request: web.Request) -> StreamQuery:
    if any(name in request.query for name in QUERY_TOKEN_NAMES):
        raise UnauthorizedError(
            "tokens are never accepted in the query string; send Authorization: Bearer "
            'or a first message {"type": "auth", "token": ...}'
        )
    try:
        return StreamQuery.model_validate(dict(request.query))
    except ValidationError as exc:
        raise RequestValidationError(
            "invalid query", errors=validation_errors(exc, "query")
        ) from None


async def _header_principal(request: web.Request, driver_id: str) -> Principal | None:
    """401/403 before the upgrade when a bearer token came; None when none came."""
    if "Authorization" not in request.headers:
        return None
    principal = await require_driver(request, driver_id)
    if (
        principal.is_operator
        and await request.app[DISPATCHER].get_driver(driver_id) is None
    ):
        raise NotFoundError(f"no driver {driver_id!r}")
    return principal


async def _message_auth(
    request: web.Request, ws: web.WebSocketResponse, driver_id: str
) -> int | None:
    """The first message must be `{"type": "auth", "token"}`; returns a close code or None.

    The close reasons say nothing about other drivers, only that this token may not
    watch this driver.
    """
    try:
        msg = await ws.receive(timeout=AUTH_TIMEOUT_S)
    except TimeoutError:
        return CLOSE_UNAUTHENTICATED
    if msg.type is not WSMsgType.TEXT:
        return CLOSE_UNAUTHENTICATED
    try:
        body = json.loads(msg.data)
    except ValueError:
        return CLOSE_UNAUTHENTICATED
    token = (
        body.get("token")
        if isinstance(body, dict) and body.get("type") == "auth"
        else None
    )
    if not isinstance(token, str) or not token:
        return CLOSE_UNAUTHENTICATED
    settings, dispatcher = request.app[SETTINGS], request.app[DISPATCHER]
    if hmac.compare_digest(token.encode(), settings.admin_token.encode()):
        return (
            None
            if await dispatcher.get_driver(driver_id) is not None
            else CLOSE_FORBIDDEN
        )
    owner = await dispatcher.token_owner(token)
    if owner is None:
        return CLOSE_UNAUTHENTICATED
    if owner != driver_id or not await dispatcher.driver_is_active(owner):
        return CLOSE_FORBIDDEN
    return None


async def driver_events(request: web.Request) -> web.StreamResponse:
    driver_id = path_id(request, "driverId")
    query = _query(request)
    principal = await _header_principal(request, driver_id)
    settings = request.app[SETTINGS]
    ws = web.WebSocketResponse(
        heartbeat=settings.event_heartbeat_s,
        # permessage-deflate keeps ~93 KiB of zlib state per socket; events are small.
        compress=False,
        timeout=CLOSE_TIMEOUT_S,
        max_msg_size=MAX_CLIENT_MESSAGE,
    )
    if not ws.can_prepare(request).ok:
        if principal is None:
            # A plain request without credentials: the auth message needs a socket.
            raise UnauthorizedError(
                "missing bearer token (Authorization: Bearer <token>)"
            )
        raise UpgradeRequiredError(
            "this route is a WebSocket: send an Upgrade: websocket request"
        )
    hub = request.app[EVENT_HUB]
    position = await hub.store.position(driver_id)
    await ws.prepare(request)
    if principal is None:
        try:
            code = await _message_auth(request, ws, driver_id)
        except DOWN_ERRORS:
            # Upgraded already: no 503 possible, a close code the client retries on.
            code = CLOSE_TRY_AGAIN
        if code is not None:
            hub.metrics.count_close(code)
            with contextlib.suppress(Exception):
                await ws.close(code=code, message=AUTH_CLOSE_REASONS[code])
            return ws
    try:
        sub = await hub.open(driver_id, ws, query.after, position)
    except DOWN_ERRORS:
        hub.metrics.count_close(CLOSE_TRY_AGAIN)
        await ws.close(
            code=CLOSE_TRY_AGAIN, message=b"database unavailable; reconnect with after"
        )
        return ws
    try:
        # Server to driver only: what the client sends is read (pongs, close) and dropped.
        async for _ in ws:
            pass
    finally:
        if not sub.closing:
            # Closed by the client, or by the heartbeat (1006): not by the hub.
            hub.metrics.count_close(ws.close_code or 1006)
        hub.release(sub)
    return ws


async def event_hub_context(app: web.Application) -> AsyncIterator[None]:
    """The replica's EventHub: its reader, catch-up and pruner run while the app does."""
    s = app[SETTINGS]
    hub = EventHub(
        DriverEventStore(app[PG_POOL], pg_timeout_s=s.pg_timeout_s),
        StreamMetrics(app[METRICS].registry),
        catch_up_interval_s=s.event_catch_up_interval_s,
        retention_s=s.event_retention_h * 3600.0,
        prune_interval_s=s.event_prune_interval_s,
    )
    app[EVENT_HUB] = hub
    hub.start()
    yield
    await hub.stop()


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: every socket is closed with 1001 before the handlers are waited for."""
    if EVENT_HUB in app:
        await app[EVENT_HUB].close_all(CLOSE_GOING_AWAY, "server shutting down")


ROUTES = [
    RouteSpec(
        "GET",
        "/drivers/{driverId}/events",
        driver_events,
        "The driver's event stream: a WebSocket of JSON messages (server to driver only). "
        'Bearer token on the upgrade, or a first message {"type": "auth", "token"} within 5 s '
        "(else close 4401). `after` replays the events with a larger seq first; past the "
        'retention the first message is {"type": "resync"}. Close codes: 4001 replaced by a '
        "newer socket, 4401/4403 auth message refused, 1013 too far behind (reconnect with "
        "after), 1001 server shutting down.",
        "driver",
        {101: EventMessage | ResyncMessage},
        query=StreamQuery,
        errors=(401, 403, 404, 422, 426),
        tags=("drivers",),
    ),
]
