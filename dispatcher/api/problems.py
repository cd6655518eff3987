"""RFC 9457 problem responses: one middleware turns every failure into one."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import ValidationError

from dispatcher.errors import PROBLEM_BASE, DispatchError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

# aiohttp raises these for routing and framing failures; name them like ours.
HTTP_CODES = {
    400: "bad-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
}


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    type_uri: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "type": type_uri or PROBLEM_BASE + HTTP_CODES.get(status, str(status)),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return web.Response(
        status=status, text=json.dumps(body), content_type=PROBLEM_JSON, headers=headers
    )


def from_dispatch_error(exc: DispatchError) -> web.Response:
    headers = None
    if exc.retry_after_s is not None:
        headers = {"Retry-After": str(exc.retry_after_s)}
    return problem_response(
        exc.status,
        exc.title,
        exc.detail,
        type_uri=exc.type_uri,
        errors=exc.errors,
        headers=headers,
    )


def validation_errors(
    exc: ValidationError, prefix: str = "body"
) -> list[dict[str, Any]]:
    """Location and message only: inputs are never echoed back (they may hold secrets)."""
    return [
        {"loc": [prefix, *err["loc"]], "msg": err["msg"]}
        for err in exc.errors(
            include_url=False, include_input=False, include_context=False
        )
    ]


@web.middleware
async def problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except DispatchError as exc:
        return from_dispatch_error(exc)
    except asyncpg.DataError as exc:
        # Input PostgreSQL cannot store (e.g. an unpaired surrogate) that validation let
        # through: still the caller's input, so a 422, never a 500.
        log.info("PostgreSQL refused input on %s: %s", request.path, type(exc).__name__)
        return problem_response(
            422, "Request validation failed", "a value cannot be stored as given"
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return problem_response(
            exc.status, exc.reason, exc.text or exc.reason, headers=headers
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem_response(
            500, "Internal error", "an unexpected error occurred; it was logged"
        )
