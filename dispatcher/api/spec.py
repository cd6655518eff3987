"""RouteSpec: one declaration per route, used both to route and to document it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = Literal["none", "operator", "driver", "signature"]


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth
    # status -> response model (a model class, a union of them, or None for no body)
    responses: Mapping[int, Any]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    content_type: str = "application/json"
    tags: tuple[str, ...] = field(default_factory=tuple)
