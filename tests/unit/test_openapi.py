"""The OpenAPI document covers every route of the contract with resolvable schemas."""

from __future__ import annotations

from typing import Any

from dispatcher.api.app import ROUTES
from dispatcher.api.openapi import build_openapi
from tests.support import CONTRACT_ROUTES


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def test_every_contract_route_is_documented() -> None:
    doc = build_openapi(ROUTES)
    assert doc["openapi"].startswith("3.1")
    documented = {
        (method, path) for path, ops in doc["paths"].items() for method in ops
    }
    assert documented == set(CONTRACT_ROUTES)


def test_every_reference_resolves_and_problems_are_described() -> None:
    doc = build_openapi(ROUTES)
    schemas = doc["components"]["schemas"]
    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas
    ready = doc["paths"]["/events/seller-order-ready"]["post"]
    assert {"401", "409", "413", "422", "503"} <= set(ready["responses"])
    assert ready["security"] == [{"webhookSignature": []}]
    assert "Problem" in schemas
