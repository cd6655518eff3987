"""Reading and validating request bodies and query parameters."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TypeVar

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from pydantic import BaseModel, ValidationError

from dispatcher.api.keys import SETTINGS
from dispatcher.api.problems import validation_errors
from dispatcher.errors import (
    BadRequestError,
    ClientClosedError,
    NotFoundError,
    PayloadTooLargeError,
    RequestTimeoutError,
    RequestValidationError,
)
from dispatcher.models import NO_CONTROL_CHARS, ORDER_ID_MAX

log = logging.getLogger(__name__)

# Bodies over 64 KiB are answered 413 (docs/API.md#errors)...
MAX_BODY_BYTES = 64 * 1024
# ...except a gateway's ping batch: 1000 pings with recordedAt and 36-character driver ids
# take about 150 KiB.
MAX_BATCH_BODY_BYTES = 256 * 1024

M = TypeVar("M", bound=BaseModel)


# Ids we issue or accept are short printable text; anything else names nothing here.
PATH_ID = re.compile(rf"{NO_CONTROL_CHARS}{{1,{ORDER_ID_MAX}}}")


def path_id(request: web.Request, name: str) -> str:
    """A path parameter, or 404: a control character or an overlong id names nothing
    (and must never reach PostgreSQL, whose text cannot hold NUL)."""
    value = request.match_info[name]
    if PATH_ID.fullmatch(value) is None:
        raise NotFoundError(f"no such {name}")
    return value


async def read_body(request: web.Request, *, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body: 413 past `limit` bytes (also when chunked), 408 when it takes
    longer than DISPATCHER_HTTP_BODY_TIMEOUT_S, 499 when the client goes away."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLargeError(f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(request.app[SETTINGS].http_body_timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"the body is larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError("the body was not received in time") from None
    except ConnectionError:
        log.info(
            "client closed the connection while sending a body to %s", request.method
        )
        raise ClientClosedError("the client closed the connection") from None
    except BadHttpMessage as exc:
        # e.g. a malformed chunk size: the parser's message quotes the bytes, ours does not.
        raise BadRequestError(
            f"the body framing is malformed ({type(exc).__name__})"
        ) from None
    return b"".join(chunks)


def parse(raw: bytes, model: type[M], *, empty_ok: bool = False) -> M:
    if not raw.strip() and empty_ok:
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = validation_errors(exc)
        first = errors[0] if errors else {"loc": ["body"], "msg": "invalid body"}
        where = ".".join(str(part) for part in first["loc"])
        raise RequestValidationError(
            f"{where}: {first['msg']}", errors=errors
        ) from None


async def parse_body(
    request: web.Request, model: type[M], *, empty_ok: bool = False
) -> M:
    return parse(await read_body(request), model, empty_ok=empty_ok)
