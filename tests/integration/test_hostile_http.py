"""Hostile HTTP below the routes: malformed requests on raw sockets, slow clients, clients
that leave mid-body, undecodable header bytes, and the per-route body limits."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from dispatcher.api.body import MAX_BATCH_BODY_BYTES, MAX_BODY_BYTES
from dispatcher.config import ResolvedSettings
from dispatcher.models import MAX_BATCH_PINGS
from tests.rawhttp import RawAnswer, exchange
from tests.support import BERLIN, PROBLEM_JSON, Api, Driver, offset

pytestmark = pytest.mark.integration

# Short on purpose, so the slow-client tests end quickly; the ceilings below are 10x.
SLOW = {
    "http_head_timeout_s": 1.0,
    "http_body_timeout_s": 1.0,
    "http_idle_timeout_s": 2.0,
}
CEILING_S = 30.0


def address(api: Api) -> tuple[str, int]:
    port = api.client.port
    assert port is not None
    return str(api.client.host), port


def malformed_corpus(token: str) -> dict[str, bytes]:
    """Requests aiohttp's parser refuses, most of them carrying `token` where a log line
    or an error body that quotes the request would show it."""
    auth = f"Authorization: Bearer {token}".encode()
    host = b"Host: x\r\n"
    return {
        "control character after the token": b"GET /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"\x01\r\n\r\n",
        "NUL inside the token line": b"GET /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"\x00x\r\n\r\n",
        "DEL after the token": b"GET /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"\x7f\r\n\r\n",
        "token line without a colon": b"GET /drivers HTTP/1.1\r\n"
        + host
        + auth.replace(b":", b"")
        + b"\r\n\r\n",
        "space before the colon": b"GET /drivers HTTP/1.1\r\n"
        + host
        + b"Authorization : Bearer "
        + token.encode()
        + b"\r\n\r\n",
        "token in a header name": b"GET /drivers HTTP/1.1\r\n"
        + host
        + token.encode()
        + b"(): 1\r\n\r\n",
        "control character in the path": b"GET /drivers/"
        + token.encode()
        + b"\x01 HTTP/1.1\r\n"
        + host
        + b"\r\n",
        "space in the path": b"GET /drivers/"
        + token.encode()
        + b" x HTTP/1.1\r\n"
        + host
        + b"\r\n",
        "bad method": b"G\x01T /drivers HTTP/1.1\r\n" + host + auth + b"\r\n\r\n",
        "bad version": b"GET /drivers HTTP/1.x\r\n" + host + auth + b"\r\n\r\n",
        "request line over 64 KiB": b"GET /drivers/"
        + token.encode()
        + b"x" * 70_000
        + b" HTTP/1.1\r\n"
        + host
        + b"\r\n",
        "header over 64 KiB": b"GET /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"x" * 70_000
        + b"\r\n\r\n",
        "bad chunk size": b"POST /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\nzz"
        + token.encode()
        + b"\r\n{}\r\n0\r\n\r\n",
        "chunk size overflow": b"POST /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n" + b"f" * 40 + b"\r\n{}\r\n0\r\n\r\n",
        "non-numeric Content-Length": b"POST /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"\r\nContent-Length: "
        + token.encode()
        + b"\r\n\r\n{}",
        "Content-Length and chunked": b"POST /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        "two different Content-Lengths": b"POST /drivers HTTP/1.1\r\n"
        + host
        + auth
        + b"\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\n\r\n{}x",
        "obsolete line folding": b"GET /drivers HTTP/1.1\r\n"
        + host
        + b"Authorization: Bearer\r\n "
        + token.encode()
        + b"\r\n\r\n",
    }


def assert_problem_without_echo(
    name: str, answer: RawAnswer, secrets: list[str]
) -> list[str]:
    problems = []
    if not 400 <= answer.status < 500:
        problems.append(f"{name}: status {answer.status}")
    if not answer.content_type.startswith(PROBLEM_JSON):
        problems.append(
            f"{name}: {answer.status} {answer.content_type!r} {answer.body[:120]!r}"
        )
    else:
        body = answer.json()
        if body.get("status") != answer.status or not body.get("detail"):
            problems.append(f"{name}: not a problem document: {body}")
    for secret in secrets:
        if secret.encode() in answer.body or secret[:12].encode() in answer.body:
            problems.append(f"{name}: the answer echoes request bytes")
    return problems


async def test_malformed_requests_get_problems_and_no_log_line_holds_their_bytes(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """Every error is an RFC 9457 problem quoting nothing, and nothing any logger writes,
    at any level (aiohttp.server, aiohttp.access, dispatcher, the root), holds the tokens."""
    for name in (
        "",
        "aiohttp",
        "aiohttp.server",
        "aiohttp.access",
        "aiohttp.web",
        "dispatcher",
        "asyncio",
    ):
        caplog.set_level(logging.DEBUG, logger=name)
    driver = await api.create_driver("victim")
    failures: list[str] = []
    for token in (api.settings.admin_token, driver.token):
        for name, request in malformed_corpus(token).items():
            answer = await exchange(*address(api), request)
            failures += assert_problem_without_echo(name, answer, [token])
    logged = (
        "\n".join(
            f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''} {r.args!r} {r.exc_info!r}"
            for r in caplog.records
        )
        + caplog.text
    )
    secrets = [api.settings.admin_token, driver.token, driver.token.split(".")[-1]]
    failures += [
        f"a log record holds a token: {s[:12]}..." for s in secrets if s in logged
    ]
    failures += [
        f"logged at {r.levelname}: {r.name} {r.getMessage()[:80]}"
        for r in caplog.records
        if r.levelno >= logging.ERROR
    ]
    assert failures == [], "\n".join(failures)


async def test_undecodable_header_bytes_are_401_not_500(api: Api) -> None:
    """Non-UTF-8 bytes in a header the service reads, with no credentials at all."""
    driver = await api.create_driver("bytes")
    routes = [
        b"GET /drivers",
        b"GET /zones",
        b"GET /drivers/" + driver.driver_id.encode(),
        b"PATCH /drivers/" + driver.driver_id.encode() + b"/location",
        b"POST /drivers/locations",
        b"GET /deliveries/SO-1",
    ]
    failures: list[str] = []
    for line in routes:
        for value in (
            b"Bearer \xff\xfe",
            b"Bearer " + driver.token.encode() + b"\xff",
            b"\xff\xfe",
        ):
            request = (
                line
                + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
                + value
                + b"\r\nContent-Length: 2\r\n\r\n{}"
            )
            answer = await exchange(*address(api), request)
            failures += [
                f"{line!r} {value!r}: {p}"
                for p in assert_problem_without_echo("", answer, [])
            ]
            if answer.status != 401:
                failures.append(f"{line!r} {value!r}: {answer.status}")
    raw = json.dumps(
        {"sellerOrderId": "SO-1", "pickupLat": BERLIN[0], "pickupLon": BERLIN[1]}
    ).encode()
    good = api.signed_headers(raw)
    for path in (b"/events/seller-order-ready", b"/events/seller-order-cancelled"):
        for header in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            sent = {**good, header: None}
            head = b"".join(
                f"{k}: {v}\r\n".encode() for k, v in sent.items() if v is not None
            )
            head += header.encode() + b": \xff\xfe" + good[header].encode() + b"\r\n"
            request = (
                b"POST "
                + path
                + b" HTTP/1.1\r\nHost: x\r\n"
                + head
                + f"Content-Length: {len(raw)}\r\n\r\n".encode()
                + raw
            )
            answer = await exchange(*address(api), request)
            if answer.status != 401 or not answer.content_type.startswith(PROBLEM_JSON):
                failures.append(
                    f"{path!r} {header}: {answer.status} {answer.body[:100]!r}"
                )
    assert failures == [], "\n".join(failures)


@pytest.fixture
async def slow_api(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
) -> Api:
    api: Api = await start_api(make_settings(**SLOW))
    return api


async def _closed_within(reader: asyncio.StreamReader, ceiling_s: float) -> bytes:
    """Everything the server sends until it closes; fails if it has not closed by then."""
    received = b""
    async with asyncio.timeout(ceiling_s):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def test_slow_heads_bodies_and_idle_connections_are_closed(slow_api: Api) -> None:
    """Slowloris: a request line never finished, headers trickled a byte at a time
    (activity does not extend the deadline), a body never finished, a silent connection.
    Each is closed (with a 408 problem where a request had begun)."""
    host, port = address(slow_api)
    admin = f"Authorization: Bearer {slow_api.settings.admin_token}\r\n".encode()
    partial_line = b"GET /drivers HTT"
    trickled = (
        b"GET /drivers HTTP/1.1\r\nHost: x\r\n" + admin + b"X-Slow: " + b"a" * 200
    )
    partial_body = (
        b"POST /drivers HTTP/1.1\r\nHost: x\r\n"
        + admin
        + b'Content-Length: 100\r\n\r\n{"name"'
    )
    outcomes: dict[str, bytes] = {}

    async def hold(name: str, first: bytes, trickle: bytes = b"") -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(first)
            closing = asyncio.create_task(_closed_within(reader, CEILING_S))
            for byte in trickle:
                if closing.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)
            outcomes[name] = await closing
        finally:
            writer.close()

    await asyncio.gather(
        hold("partial request line", partial_line),
        hold("trickled headers", trickled[:40], trickled[40:]),
        hold("partial body", partial_body),
        hold("silent connection", b""),
    )
    assert outcomes["silent connection"] == b""
    for name in ("partial request line", "trickled headers", "partial body"):
        head, _, body = outcomes[name].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), (name, outcomes[name][:200])
        assert PROBLEM_JSON.encode() in head.lower(), (name, head)
        assert json.loads(body)["status"] == 408
    # The server still serves everyone else.
    answer = await exchange(
        host, port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.status == 200


async def test_a_client_leaving_mid_body_is_a_499_not_a_500(
    api: Api, caplog: pytest.LogCaptureFixture, pg_pool: asyncpg.Pool
) -> None:
    """Counted as what it is (no false 5xx alert) and logged without a traceback."""
    caplog.set_level(logging.DEBUG)
    host, port = address(api)
    for path in (b"POST /drivers", b"POST /drivers/locations"):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(
            path
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + api.settings.admin_token.encode()
            + b'\r\nContent-Length: 1000\r\n\r\n{"name": '
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    deadline = time.monotonic() + CEILING_S
    metrics = ""
    while time.monotonic() < deadline:
        metrics = await (await api.client.get("/metrics")).text()
        if metrics.count('status="499"') >= 2:
            break
        await asyncio.sleep(0.1)
    lines = [
        line
        for line in metrics.splitlines()
        if line.startswith("dispatcher_http_requests_total")
    ]
    assert any(
        'route="/drivers"' in line and 'status="499"' in line for line in lines
    ), lines
    assert any(
        'route="/drivers/locations"' in line and 'status="499"' in line
        for line in lines
    ), lines
    assert not any('status="500"' in line for line in lines), lines
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info
    ], caplog.text[-3000:]
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers") == 0


def full_batch(driver: Driver, count: int) -> dict[str, Any]:
    """`count` pings as a gateway sends them: ids, full-precision floats, recordedAt."""
    now = datetime.now(UTC)
    pings = [
        {
            "driverId": driver.driver_id,
            "lat": BERLIN[0],
            "lon": BERLIN[1],
            "recordedAt": now.isoformat(),
        }
    ]
    for n in range(1, count):
        lat, lon = offset(*BERLIN, 0.001 * n, -0.0007 * n)
        pings.append(
            {
                "driverId": f"drv_{uuid.uuid4().hex}",
                "lat": lat,
                "lon": lon,
                "recordedAt": now.isoformat(),
            }
        )
    return {"pings": pings}


async def test_a_full_batch_of_1000_pings_fits_and_256_kib_plus_one_is_413(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.online_driver(*BERLIN)
    raw = json.dumps(full_batch(driver, MAX_BATCH_PINGS)).encode()
    assert (
        MAX_BODY_BYTES < len(raw) <= MAX_BATCH_BODY_BYTES
    )  # over the other routes' limit
    resp = await api.client.post(
        "/drivers/locations",
        data=raw,
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    result = await resp.json()
    assert result["accepted"] == 1 and len(result["rejected"]) == MAX_BATCH_PINGS - 1

    too_big = raw[:-1] + b" " * (MAX_BATCH_BODY_BYTES + 1 - len(raw)) + raw[-1:]
    assert len(too_big) == MAX_BATCH_BODY_BYTES + 1
    await api.settle()  # the accepted fix is written behind
    before = await pg_pool.fetchval(
        "SELECT location_recorded_at FROM drivers WHERE id = $1", driver.driver_id
    )
    resp = await api.client.post(
        "/drivers/locations",
        data=too_big,
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert resp.status == 413 and resp.headers["Content-Type"].startswith(PROBLEM_JSON)

    async def chunks() -> Any:
        for start in range(0, len(too_big), 8192):
            yield too_big[start : start + 8192]

    resp = await api.client.post(
        "/drivers/locations",
        data=chunks(),
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert resp.status == 413
    # Every other route keeps 64 KiB.
    resp = await api.client.post(
        "/drivers",
        data=b" " * MAX_BODY_BYTES + b"{}",
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert resp.status == 413
    await api.settle()
    assert (
        await pg_pool.fetchval(
            "SELECT location_recorded_at FROM drivers WHERE id = $1", driver.driver_id
        )
        == before
    )


async def test_undecodable_paths_queries_and_json_text_are_4xx(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    """Siblings of the header bytes: percent-encoded non-UTF-8 in a path id or a query,
    raw non-UTF-8 bytes in the path, and lone surrogates in JSON text."""
    host, port = address(api)
    admin = b"Authorization: Bearer " + api.settings.admin_token.encode() + b"\r\n"
    cases = {
        "%ff in a path id": (b"GET /drivers/%ff%fe HTTP/1.1\r\n", b"", {404}),
        "%ff in the zoneId query": (
            b"GET /drivers?zoneId=%ff%fe HTTP/1.1\r\n",
            b"",
            {200, 422},
        ),
        "raw \\xff in the path": (
            b"GET /drivers/\xff\xfe HTTP/1.1\r\n",
            b"",
            {400, 404},
        ),
        "a lone surrogate in a name": (
            b"POST /drivers HTTP/1.1\r\n",
            b'{"name": "a\\udc80b"}',
            {422},
        ),
        "a lone surrogate in a failure reason": (
            b"POST /deliveries/SO-none/failed HTTP/1.1\r\n",
            b'{"reason": "\\ud800"}',
            {404, 422},
        ),
    }
    failures: list[str] = []
    for name, (line, body, statuses) in cases.items():
        head = line + b"Host: x\r\n" + admin + b"Content-Type: application/json\r\n"
        answer = await exchange(
            host, port, head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        if answer.status not in statuses:
            failures.append(f"{name}: {answer.status} {answer.body[:100]!r}")
        elif answer.status >= 400:
            failures += assert_problem_without_echo(name, answer, [])
    assert failures == [], "\n".join(failures)
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers") == 0


async def test_compressed_bodies_are_held_to_the_limit_after_inflating(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    """A gzip body inflating past the route's limit is 413 (a zip bomb), a corrupt one a
    400 or 422 (aiohttp may hand over what inflated before the damage); problems, nothing
    written."""
    bomb = gzip.compress(b'{"name": "' + b" " * (8 * 1024 * 1024) + b'"}')
    assert len(bomb) < MAX_BODY_BYTES
    headers = {
        **api.admin,
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    resp = await api.client.post("/drivers", data=bomb, headers=headers)
    assert resp.status == 413 and resp.headers["Content-Type"].startswith(
        PROBLEM_JSON
    ), await resp.text()
    resp = await api.client.post(
        "/drivers", data=b"\x1f\x8b\x08\x00garbage", headers=headers
    )
    assert resp.status in (400, 422) and resp.headers["Content-Type"].startswith(
        PROBLEM_JSON
    ), await resp.text()
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers") == 0
