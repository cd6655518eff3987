"""create_app: the aiohttp ingress with its resources opened and closed in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from dispatcher.api import driver_stream
from dispatcher.api.body import MAX_BATCH_BODY_BYTES, MAX_BODY_BYTES
from dispatcher.api.keys import (
    DISPATCHER,
    EVENT_HUB,
    INBOUND_IDS,
    METRICS,
    MIRROR,
    OPENAPI,
    PG_POOL,
    SENDER,
    SETTINGS,
)
from dispatcher.api.metrics import Metrics, metrics_middleware
from dispatcher.api.offers import offer_context
from dispatcher.api.openapi import build_openapi
from dispatcher.api.problems import problem_middleware
from dispatcher.api.routes import deliveries, drivers, events, offers, ops, opspage
from dispatcher.api.service import Dispatcher
from dispatcher.api.spec import RouteSpec
from dispatcher.api.standby import StandbyKeeper
from dispatcher.api.zoneclient import ZoneDirectory
from dispatcher.api.zonerouter import ZoneRouter
from dispatcher.config import ResolvedSettings
from dispatcher.store.deliveries import DeliveryStore
from dispatcher.store.drivers import DRIVER_CHANGED_CHANNEL, DriverStore
from dispatcher.store.geo import GeoMirror, connect_redis
from dispatcher.store.inbound_ids import InboundIdStore
from dispatcher.store.listen import Listener
from dispatcher.store.pg import close_pool, create_pool
from dispatcher.webhooks.sender import WebhookSender
from dispatcher.webhooks.signing import DEFAULT_TOLERANCE_S
from dispatcher.zoning import Zoning

SENDER_STOP_TIMEOUT_S = 5.0

__all__ = ["MAX_BODY_BYTES", "ROUTES", "create_app"]

ROUTES: list[RouteSpec] = [
    *events.ROUTES,
    *drivers.ROUTES,
    *driver_stream.ROUTES,
    *deliveries.ROUTES,
    *offers.ROUTES,
    *ops.ROUTES,
    *opspage.ROUTES,
]


def create_app(
    settings: ResolvedSettings, *, zones: ZoneDirectory | None = None
) -> web.Application:
    """The ingress. Ray must already be initialised in this process (see cli.main)."""
    metrics = Metrics()
    app = web.Application(
        # The outer bound; api/body.py's read_body holds each route to its own limit.
        client_max_size=MAX_BATCH_BODY_BYTES,
        # At the body limit, every id reaches a handler and gets a problem; longer lines
        # get api/http_server.py's problem 400 (run the app with its IngressRunner).
        handler_args={
            "max_line_size": MAX_BODY_BYTES,
            "max_field_size": MAX_BODY_BYTES,
            "keepalive_timeout": settings.http_idle_timeout_s,
        },
        middlewares=[metrics_middleware(metrics), problem_middleware],
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[OPENAPI] = build_openapi(ROUTES)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    opspage.add_page_routes(app)

    directory = zones or ZoneDirectory(settings)
    metrics.count_zone_retries(lambda: directory.retries, lambda: directory.failovers)
    app.cleanup_ctx.extend(
        [
            _postgres,
            opspage.ops_view_context,
            _redis,
            driver_stream.event_hub_context,
            _dispatcher(directory),
            offer_context,
            _webhooks,
        ]
    )
    # Driver sockets are closed (1001) before aiohttp waits for the handlers to end.
    app.on_shutdown.append(driver_stream.close_sockets)
    return app


async def _postgres(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    app[PG_POOL] = await create_pool(
        s.database_url, max_size=s.pg_pool_max, command_timeout_s=s.pg_timeout_s
    )
    app[INBOUND_IDS] = InboundIdStore(app[PG_POOL], tolerance_s=DEFAULT_TOLERANCE_S)
    yield
    await close_pool(app[PG_POOL])


async def _redis(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    app[MIRROR] = GeoMirror(
        connect_redis(s.redis_url, s.redis_timeout_s), s.redis_timeout_s
    )
    yield
    await app[MIRROR].aclose()


def _dispatcher(
    directory: ZoneDirectory,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        s = app[SETTINGS]
        pool = app[PG_POOL]
        router = ZoneRouter(Zoning(s.zone_resolution), pool, max_zones=s.max_zones)
        await router.load()
        dispatcher = Dispatcher(
            s,
            drivers=DriverStore(pool),
            deliveries=DeliveryStore(pool),
            router=router,
            zones=directory,
        )
        app[DISPATCHER] = dispatcher
        app[METRICS].count_ping_writes(
            written=lambda: dispatcher.pings_written,
            refused=lambda: dispatcher.pings_refused_on_write,
            dropped=lambda: dispatcher.pings.dropped,
        )
        # Another replica's deactivation reaches this one's ping gate by NOTIFY, and
        # committed driver events reach this replica's sockets the same way.
        # Its connection is also the ingress's early warning that PostgreSQL went away.
        hub = app[EVENT_HUB]

        def listening() -> None:
            dispatcher.database_back()
            hub.wake_all()

        changes = Listener(
            pool,
            {DRIVER_CHANGED_CHANNEL: dispatcher.gate.forget, **hub.channels},
            pg_timeout_s=s.pg_timeout_s,
            on_listening=listening,
            on_lost=dispatcher.database_lost,
            # Pings are refused until it is back: try again every second at most.
            max_backoff_s=1.0,
        )
        tasks = [asyncio.create_task(changes.run_forever(), name="driver-changes")]
        if s.zone_standby:
            keeper = StandbyKeeper(
                s, directory.settings_json, lambda: directory.zone_ids
            )
            tasks.append(asyncio.create_task(keeper.run_forever(), name="standbys"))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await dispatcher.close()

    return context


async def _webhooks(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    sender = WebhookSender(
        app[PG_POOL],
        url=s.vendure_webhook_url,
        secret=s.vendure_webhook_secret,
        schedule_s=s.webhook_schedule_s,
        timeout_s=s.webhook_timeout_s,
        poll_interval_s=s.webhook_poll_interval_s,
        pg_timeout_s=s.pg_timeout_s,
    )
    app[SENDER] = sender
    task = asyncio.create_task(sender.run(), name="webhook-sender")
    yield
    task.cancel()
    # Bounded: shutdown must finish even if the sender misbehaves; its rows stay in
    # the outbox and the next process sends them.
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        async with asyncio.timeout(SENDER_STOP_TIMEOUT_S):
            await task
