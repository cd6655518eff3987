"""Reading and validating request bodies and query parameters."""

from __future__ import annotations

import re
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from dispatcher.api.problems import validation_errors
from dispatcher.errors import NotFoundError, RequestValidationError

M = TypeVar("M", bound=BaseModel)


# Ids we issue or accept are short printable text; anything else names nothing here.
PATH_ID = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


def path_id(request: web.Request, name: str) -> str:
    """A path parameter, or 404: a control character or an overlong id names nothing
    (and must never reach PostgreSQL, whose text cannot hold NUL)."""
    value = request.match_info[name]
    if PATH_ID.fullmatch(value) is None:
        raise NotFoundError(f"no such {name}")
    return value


async def read_body(request: web.Request) -> bytes:
    """The raw body; aiohttp answers 413 past the app's client_max_size."""
    return await request.read()


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
