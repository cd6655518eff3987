"""The ceiling reference: the service's ping validation and a 204, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dispatcher.bench.references import create_reference_app


@pytest.fixture
async def ceiling() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client: TestClient[web.Request, web.Application] = TestClient(
        TestServer(create_reference_app("ceiling"))
    )
    await client.start_server()
    yield client
    await client.close()


async def test_ceiling_accepts_a_valid_ping(
    ceiling: TestClient[web.Request, web.Application],
) -> None:
    resp = await ceiling.patch(
        "/drivers/drv_1/location", data=b'{"lat": 52.5, "lon": 13.4}'
    )
    assert resp.status == 204


async def test_ceiling_validates_like_the_service(
    ceiling: TestClient[web.Request, web.Application],
) -> None:
    for body in (
        b'{"lat": "52.5", "lon": 13.4}',
        b'{"lat": 95, "lon": 13.4}',
        b"not json",
        b'{"lat": 1, "lon": 2, "recordedAt": "2026-01-01T00:00:00"}',
    ):
        resp = await ceiling.patch("/drivers/drv_1/location", data=body)
        assert resp.status == 422, body


def test_naive_needs_redis() -> None:
    with pytest.raises(ValueError, match="redis"):
        create_reference_app("naive")
