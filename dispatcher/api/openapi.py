"""The OpenAPI 3.1 document, generated from the RouteSpecs and their pydantic models."""

from __future__ import annotations

import re
import types
from collections.abc import Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from dispatcher import __version__
from dispatcher.api.spec import RouteSpec
from dispatcher.models import Problem

REF = "#/components/schemas/{model}"
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "operator": [{"bearer": []}],
    "driver": [{"bearer": []}],
    "signature": [{"webhookSignature": []}],
    "none": [],
}
PATH_PARAM = re.compile(r"{(\w+)}")
# A WebSocket route's 101: its schema describes the messages the server sends on it.
DESCRIPTIONS = {
    101: "Switching Protocols: a WebSocket; the server sends JSON messages of this schema"
}


def _models(annotation: Any) -> list[type[BaseModel]]:
    if annotation is None:
        return []
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _models(arg)]
    return [annotation]


def _schema_of(annotation: Any) -> dict[str, Any]:
    refs = [{"$ref": REF.format(model=m.__name__)} for m in _models(annotation)]
    return refs[0] if len(refs) == 1 else {"oneOf": refs}


def build_openapi(routes: Sequence[RouteSpec]) -> dict[str, Any]:
    models: set[type[BaseModel]] = {Problem}
    for route in routes:
        models.update(_models(route.body))
        for annotation in route.responses.values():
            models.update(_models(annotation))
    ordered = sorted(models, key=lambda m: m.__name__)
    _, schema = models_json_schema(
        [
            (m, "validation" if _is_request(m, routes) else "serialization")
            for m in ordered
        ],
        ref_template=REF,
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dispatcher",
            "version": __version__,
            "description": "Assigns delivery drivers to Vendure seller orders.",
        },
        "paths": paths,
        "components": {
            "schemas": schema.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "webhookSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "webhook-signature",
                    "description": "Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature",
                },
            },
        },
    }


def _is_request(model: type[BaseModel], routes: Sequence[RouteSpec]) -> bool:
    return any(model in _models(r.body) or model is r.query for r in routes)


def _operation(route: RouteSpec) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.handler.__name__,
        "tags": list(route.tags),
        "security": SECURITY[route.auth],
        "responses": {},
    }
    params = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        }
        for name in PATH_PARAM.findall(route.path)
    ]
    if route.query is not None:
        for name, prop in route.query.model_json_schema(by_alias=True)[
            "properties"
        ].items():
            params.append(
                {"name": name, "in": "query", "required": False, "schema": prop}
            )
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": route.body.__name__ != "EmptyBody",
            "content": {"application/json": {"schema": _schema_of(route.body)}},
        }
    for status, annotation in route.responses.items():
        response: dict[str, Any] = {
            "description": DESCRIPTIONS.get(
                status, "success" if status < 400 else "see body"
            )
        }
        if annotation is not None:
            response["content"] = {
                route.content_type: {"schema": _schema_of(annotation)}
            }
        elif status != 204:
            response["content"] = {route.content_type: {}}
        op["responses"][str(status)] = response
    for status in route.errors:
        op["responses"][str(status)] = {
            "description": "problem",
            "content": {"application/problem+json": {"schema": _schema_of(Problem)}},
        }
    return op
