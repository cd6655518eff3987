"""The load generator's minimal HTTP/1.1 client: request bytes, response framing, the pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from dispatcher.bench.httpclient import (
    HttpError,
    HttpPool,
    encode_request,
    parse_response,
)
from dispatcher.bench.reqfile import RequestSpec


def test_encode_request_sets_host_and_length() -> None:
    spec = RequestSpec(
        "PATCH",
        "/drivers/d/location",
        (("Authorization", "Bearer t"), ("Content-Length", "9")),
        b"{}",
    )
    assert encode_request(spec, "127.0.0.1:80") == (
        b"PATCH /drivers/d/location HTTP/1.1\r\nHost: 127.0.0.1:80\r\nAuthorization: Bearer t\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )


def test_parse_response_waits_for_the_whole_body() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: x\r\n\r\nhello"
        + b"HTTP/1.1 204"
    )
    assert parse_response(bytearray(raw[:30])) is None
    assert parse_response(bytearray(raw[:-15])) is None
    assert parse_response(bytearray(raw)) == (
        200,
        b"hello",
        True,
        len(raw) - len(b"HTTP/1.1 204"),
    )


def test_parse_response_without_body_and_with_close() -> None:
    raw = bytearray(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert parse_response(raw) == (204, b"", False, len(raw))


def test_parse_response_chunked() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"
    assert parse_response(bytearray(raw[:-2])) is None
    assert parse_response(bytearray(raw)) == (200, b"abcde", True, len(raw))


def test_parse_response_rejects_garbage() -> None:
    with pytest.raises(HttpError):
        parse_response(bytearray(b"SSH-2.0-OpenSSH\r\n\r\n"))


async def _json(request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.json_response({"ok": True})


async def _chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=201)
    await resp.prepare(request)
    await resp.write(b"part1-")
    await resp.write(b"part2")
    await resp.write_eof()
    return resp


async def _slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(0.05)
    return web.Response(status=204)


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("POST", "/json", _json)
    app.router.add_route("GET", "/chunked", _chunked)
    app.router.add_route("GET", "/slow", _slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_pool_talks_to_aiohttp(base_url: str) -> None:
    pool = HttpPool(base_url, 2)
    try:
        post = encode_request(
            RequestSpec(
                "POST", "/json", (("Content-Type", "application/json"),), b"{}"
            ),
            pool.authority,
        )
        assert await pool.request(post) == (200, b'{"ok": true}')
        assert await pool.request(
            encode_request(RequestSpec("GET", "/chunked", (), b""), pool.authority)
        ) == (201, b"part1-part2")
        assert (
            await pool.request(
                encode_request(RequestSpec("GET", "/nope", (), b""), pool.authority)
            )
        )[0] == 404
    finally:
        pool.close()


async def test_pool_never_opens_more_than_its_limit(base_url: str) -> None:
    pool = HttpPool(base_url, 3)
    data = encode_request(RequestSpec("GET", "/slow", (), b""), pool.authority)
    try:
        results = await asyncio.gather(*(pool.request(data) for _ in range(12)))
    finally:
        pool.close()
    assert [status for status, _ in results] == [204] * 12
    assert pool._open <= 3


async def test_pool_reports_refused_connections() -> None:
    pool = HttpPool("http://127.0.0.1:9", 1)
    with pytest.raises(HttpError, match="connect failed"):
        await pool.request(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ValueError):
        HttpPool("https://example.org", 1)
