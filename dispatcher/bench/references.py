"""The two references, each a bare aiohttp process: the ceiling (validate, 204) and the naive baseline (+ one Redis pipeline)."""

# Pipeline methods are typed as awaitables but only queue commands; execute() runs them.
# mypy: disable-error-code="unused-awaitable"

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Literal

import redis.asyncio as aioredis
from aiohttp import web
from pydantic import ValidationError

from dispatcher.models import LocationPing

# Printed once the socket listens; the bench waits for it.
READY_LINE = "reference listening on"
# The seed design's heartbeat: a key per driver that expires when pings stop.
HEARTBEAT_TTL_S = 60
# Own key prefix, so the baseline never touches the service's mirror keys.
KEY_PREFIX = "bench:naive:"

# redis-py's default pool fails with MaxConnectionsError when requests pile up (an
# open-loop run does that); a blocking pool of this size makes them queue instead,
# as wrk's 32 connections would never need more.
NAIVE_REDIS_CONNECTIONS = 64
NAIVE_POOL_WAIT_S = 10.0

Kind = Literal["ceiling", "naive"]
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis", aioredis.Redis)


async def ceiling_ping(request: web.Request) -> web.StreamResponse:
    """Parse and validate the body exactly as the service does, then 204: no I/O at all."""
    try:
        LocationPing.model_validate_json(await request.read())
    except ValidationError:
        return web.Response(status=422)
    return web.Response(status=204)


async def naive_ping(request: web.Request) -> web.StreamResponse:
    """The seed design: one Redis pipeline per ping (GEOADD, HSET status, SET heartbeat EX)."""
    try:
        ping = LocationPing.model_validate_json(await request.read())
    except ValidationError:
        return web.Response(status=422)
    driver_id = request.match_info["driverId"]
    pipe = request.app[REDIS].pipeline(transaction=False)
    pipe.geoadd(f"{KEY_PREFIX}geo", (ping.lon, ping.lat, driver_id))
    pipe.hset(f"{KEY_PREFIX}driver:{driver_id}", "status", "AVAILABLE")
    pipe.set(f"{KEY_PREFIX}heartbeat:{driver_id}", str(time.time()), ex=HEARTBEAT_TTL_S)
    await pipe.execute()
    return web.Response(status=204)


def create_reference_app(kind: Kind, redis_url: str | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    handler = ceiling_ping if kind == "ceiling" else naive_ping
    app.router.add_route("PATCH", "/drivers/{driverId}/location", handler)
    if kind == "naive":
        if redis_url is None:
            raise ValueError("the naive baseline needs --redis-url")

        async def redis_client(app: web.Application) -> AsyncIterator[None]:
            pool = aioredis.BlockingConnectionPool.from_url(
                redis_url,
                max_connections=NAIVE_REDIS_CONNECTIONS,
                timeout=NAIVE_POOL_WAIT_S,
            )
            app[REDIS] = aioredis.Redis(connection_pool=pool)
            yield
            await app[REDIS].aclose()

        app.cleanup_ctx.append(redis_client)
    return app


async def serve(kind: Kind, port: int, redis_url: str | None) -> None:
    # Same server setup as `dispatcher serve`: no access log, loopback only.
    runner = web.AppRunner(
        create_reference_app(kind, redis_url), access_log=None, handle_signals=False
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"{READY_LINE} http://127.0.0.1:{port} ({kind})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dispatcher.bench.references")
    parser.add_argument("--kind", choices=("ceiling", "naive"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    asyncio.run(serve(args.kind, args.port, args.redis_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
