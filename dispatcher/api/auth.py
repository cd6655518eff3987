"""Who is calling: Standard Webhooks signatures for Vendure, bearer tokens for the rest."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from dispatcher.api.keys import DISPATCHER, SETTINGS
from dispatcher.errors import ForbiddenError, UnauthorizedError
from dispatcher.webhooks.signing import (
    InvalidSignatureError,
    SignedMessage,
    verify_message,
)


@dataclass(frozen=True, slots=True)
class Principal:
    """An operator (driver_id None) or exactly one driver."""

    driver_id: str | None

    @property
    def is_operator(self) -> bool:
        return self.driver_id is None

    def may_act_for(self, driver_id: str) -> bool:
        return self.is_operator or self.driver_id == driver_id


def verify_inbound(request: web.Request, body: bytes) -> SignedMessage:
    """Vendure's events: signature over the raw body, 300 s tolerance; else 401."""
    try:
        return verify_message(
            [request.app[SETTINGS].inbound_secret], request.headers, body
        )
    except InvalidSignatureError as exc:
        raise UnauthorizedError(f"invalid webhook signature: {exc}") from None


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("missing bearer token (Authorization: Bearer <token>)")
    # Non-UTF-8 header bytes arrive as surrogates that cannot be encoded for the
    # comparison; no token we issue holds anything but printable ASCII.
    if not (token.isascii() and token.isprintable()):
        raise UnauthorizedError("malformed bearer token")
    return token.strip()


def _is_admin(request: web.Request, token: str) -> bool:
    return hmac.compare_digest(
        token.encode(), request.app[SETTINGS].admin_token.encode()
    )


async def require_operator(request: web.Request) -> Principal:
    principal = await authenticate(request)
    if not principal.is_operator:
        raise ForbiddenError("this route needs the operator token")
    return principal


async def authenticate(request: web.Request, *, check_active: bool = True) -> Principal:
    """The operator, or the active driver the token names.

    `check_active=False` is for pings only: their batched write refuses inactive
    drivers itself (answered 403), which saves a round trip per ping.
    """
    token = _bearer(request)
    if _is_admin(request, token):
        return Principal(None)
    dispatcher = request.app[DISPATCHER]
    driver_id = await dispatcher.token_owner(token)
    if driver_id is None:
        raise UnauthorizedError("unknown token")
    if check_active and not await dispatcher.driver_is_active(driver_id):
        raise ForbiddenError(f"driver {driver_id} is deactivated")
    return Principal(driver_id)


async def require_driver(
    request: web.Request, driver_id: str, *, check_active: bool = True
) -> Principal:
    principal = await authenticate(request, check_active=check_active)
    if not principal.may_act_for(driver_id):
        raise ForbiddenError("a driver token may only act for its own driver")
    return principal
