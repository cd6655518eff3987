"""Operational routes: health, readiness, zones, metrics, the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib

import ray
from aiohttp import web

from dispatcher.api.auth import require_operator
from dispatcher.api.keys import (
    DISPATCHER,
    METRICS,
    MIRROR,
    OPENAPI,
    SENDER,
    SETTINGS,
)
from dispatcher.api.offers import refresh_offer_metrics
from dispatcher.api.responses import json_model
from dispatcher.api.spec import RouteSpec
from dispatcher.errors import DispatchError
from dispatcher.models import Health, Readiness, ZoneList, ZoneView

# /zones asks every zone actor; a restarting one must not hold the answer up.
ZONE_STATS_TIMEOUT_S = 2.0
# A GCS that cannot list resources this fast is not fit to route orders.
RAY_PROBE_TIMEOUT_S = 2.0


async def _ray_answers() -> bool:
    """Ray is ready when its control store answers, not merely when init() ran."""
    if not ray.is_initialized():
        return False
    try:
        async with asyncio.timeout(RAY_PROBE_TIMEOUT_S):
            await asyncio.to_thread(ray.cluster_resources)
    except Exception:
        return False
    return True


async def health(request: web.Request) -> web.StreamResponse:
    return json_model(Health())


async def ready(request: web.Request) -> web.StreamResponse:
    app = request.app
    dispatcher = app[DISPATCHER]
    pg_ok, redis_ok, ray_ok = await asyncio.gather(
        dispatcher.database_answers(), app[MIRROR].ping(), _ray_answers()
    )
    zones = pending = 0
    if pg_ok:
        try:
            zones = len(await dispatcher.zone_ids())
            pending = await dispatcher.outbox_pending()
        except DispatchError:
            pg_ok = False
    webhooks = "unconfigured"
    if app[SETTINGS].vendure_webhook_url is not None:
        webhooks = (
            "disabled" if pg_ok and await app[SENDER].endpoint_disabled() else "ok"
        )
    body = Readiness(
        postgres="ok" if pg_ok else "down",
        redis="ok" if redis_ok else "degraded",
        ray="ok" if ray_ok else "down",
        zones=zones,
        outbox_pending=pending,
        webhooks=webhooks,
    )
    app[METRICS].redis_up.set(1 if redis_ok else 0)
    app[METRICS].outbox_pending.set(pending)
    return json_model(body, status=200 if pg_ok and ray_ok else 503)


async def zones(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    dispatcher = request.app[DISPATCHER]
    await dispatcher.settle_pings()
    zone_ids = await dispatcher.zone_ids()
    open_offers = await dispatcher.open_offer_counts()

    async def view(zone_id: str) -> ZoneView:
        try:
            async with asyncio.timeout(ZONE_STATS_TIMEOUT_S):
                stats = await dispatcher.zone_stats(zone_id)
        except (DispatchError, TimeoutError):
            return ZoneView(
                zone_id=zone_id,
                drivers=0,
                available=0,
                actor="restarting",
                open_offers=open_offers.get(zone_id, 0),
            )
        return ZoneView(
            zone_id=zone_id,
            drivers=stats.drivers,
            available=stats.available,
            actor="alive",
            open_offers=open_offers.get(zone_id, 0),
        )

    return json_model(
        ZoneList(zones=list(await asyncio.gather(*(view(z) for z in zone_ids))))
    )


async def metrics(request: web.Request) -> web.StreamResponse:
    app = request.app
    with contextlib.suppress(DispatchError):
        app[METRICS].outbox_pending.set(await app[DISPATCHER].outbox_pending())
    await refresh_offer_metrics(app)
    return web.Response(
        body=app[METRICS].render(), content_type="text/plain", charset="utf-8"
    )


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[OPENAPI])


ROUTES = [
    RouteSpec(
        "GET",
        "/health",
        health,
        "Liveness: 200 while the process runs",
        "none",
        {200: Health},
        tags=("ops",),
    ),
    RouteSpec(
        "GET",
        "/ready",
        ready,
        "Readiness of each dependency; 503 without PostgreSQL or Ray",
        "none",
        {200: Readiness, 503: Readiness},
        tags=("ops",),
    ),
    RouteSpec(
        "GET",
        "/zones",
        zones,
        "Zone actors and their driver counts",
        "operator",
        {200: ZoneList},
        errors=(401, 403, 503),
        tags=("ops",),
    ),
    RouteSpec(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        "none",
        {200: None},
        content_type="text/plain",
        tags=("ops",),
    ),
    RouteSpec(
        "GET",
        "/openapi.json",
        openapi,
        "This document",
        "none",
        {200: None},
        tags=("ops",),
    ),
]
