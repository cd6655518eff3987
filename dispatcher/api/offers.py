"""The ingress side of offers: answers and operator actions, metrics, the backstop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dispatcher.api.keys import DISPATCHER, METRICS, PG_POOL, SETTINGS
from dispatcher.api.problems import PROBLEM_JSON
from dispatcher.api.service import Dispatcher
from dispatcher.errors import (
    PROBLEM_BASE,
    DispatchError,
)
from dispatcher.models import Point, assigned_body
from dispatcher.offers.policy import (
    OFFER_GRACE_S,
    PENDING_RETRY_S,
    Done,
    Expire,
    GiveUp,
    OfferRules,
    Wait,
    next_step,
)
from dispatcher.offers.wire import (
    DispatchViewBody,
    OfferItem,
    OfferList,
)
from dispatcher.store.offers import (
    Changes,
    OfferRefusedError,
    OfferStore,
    offer_counts,
)

log = logging.getLogger(__name__)

# The backstop ends a dispatch its zone left open this long after deadline + grace:
# room for a zone that is merely slow (its own timer fires at deadline + grace).
BACKSTOP_SLACK_S = 2.0
# Steps the backstop takes on one dispatch (expire what is left, then give up).
BACKSTOP_STEPS = 4
ACCEPT_TIME_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 25, 30, 60, 120)


class OfferOps:
    """The ingress side of offers: answers and operator actions go to PostgreSQL here,
    then the zones and the mirror follow (best effort: the zone timers and the
    backstop catch up on anything missed)."""

    def __init__(
        self, store: OfferStore, dispatcher: Dispatcher, rules: OfferRules
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.rules = rules
        self.accepted_after = Histogram(
            "dispatcher_offer_accept_seconds",
            "time from an offer to its accept",
            buckets=ACCEPT_TIME_BUCKETS,
            registry=None,
        )

    async def follow(self, changes: Changes) -> None:
        for driver_id in sorted(changes.drivers):
            await self.dispatcher.refresh_driver(driver_id)
        await self.dispatcher.wake_dispatches(changes.wake)

    # ---- answers and operator actions (the offer routes) -------------------------------

    async def driver_offers(self, driver_id: str, status: str | None) -> OfferList:
        rows = await self.store.driver_offers(driver_id, status)
        return OfferList(offers=[offer_item(dict(r)) for r in rows])

    async def accept(self, driver_id: str, offer_id: str) -> str:
        """The accepted order's id; OfferRefused when refused."""
        try:
            changes = await self.store.accept(driver_id, offer_id)
        except OfferRefusedError as exc:
            await self.follow(exc.changes)
            raise OfferRefused(exc) from None
        await self.follow(changes)
        if changes.accept_age_s is not None:
            self.accepted_after.observe(changes.accept_age_s)
        assert changes.order is not None
        return changes.order

    async def decline(self, driver_id: str, offer_id: str, reason: str | None) -> None:
        try:
            changes = await self.store.decline(driver_id, offer_id, reason)
        except OfferRefusedError as exc:
            await self.follow(exc.changes)
            raise OfferRefused(exc) from None
        await self.follow(changes)

    async def dispatch(self, seller_order_id: str) -> DispatchViewBody | None:
        found = await self.store.dispatch_with_offers(seller_order_id)
        return None if found is None else dispatch_body(*found)

    async def force_assign(self, seller_order_id: str, driver_id: str) -> None:
        try:
            changes = await self.store.force_assign(seller_order_id, driver_id)
        except OfferRefusedError as exc:
            raise OfferRefused(exc) from None
        await self.follow(changes)

    async def redispatch(
        self, seller_order_id: str, deadline_s: float
    ) -> DispatchViewBody:
        try:
            changes = await self.store.redispatch(seller_order_id, deadline_s)
        except OfferRefusedError as exc:
            raise OfferRefused(exc) from None
        await self.follow(changes)
        found = await self.dispatch(seller_order_id)
        assert found is not None
        return found

    async def wake_stalled(self) -> int:
        """The backstop's first half: a dispatch whose timer should have fired (its zone
        restarting or gone) gets its zone called, which restarts the zone if need be;
        the new incarnation resumes every open dispatch it owns."""
        stalled = await self.store.stalled(BACKSTOP_SLACK_S, PENDING_RETRY_S)
        by_zone: dict[str, list[str]] = {}
        for order, zone_id in stalled:
            by_zone.setdefault(zone_id, []).append(order)

        async def wake_zone(zone_id: str, orders: list[str]) -> None:
            # The first call restarts a dead zone, which then resumes all its open
            # dispatches at start; the rest are woken together after it.
            await self.follow(Changes(wake={orders[0]: zone_id}))
            await asyncio.gather(
                *(self.follow(Changes(wake={o: zone_id})) for o in orders[1:])
            )

        await asyncio.gather(*(wake_zone(z, orders) for z, orders in by_zone.items()))
        return len(stalled)

    async def finish_overdue(self) -> int:
        """The backstop: end dispatches whose zone did not (wedged, or gone for good).
        Only expiry and giving up happen here, decided by the same policy."""
        finished = 0
        for order in await self.store.overdue(BACKSTOP_SLACK_S, OFFER_GRACE_S):
            for _ in range(BACKSTOP_STEPS):
                loaded = await self.store.load(order)
                if loaded is None:
                    break
                step = next_step(self.rules, loaded.view, loaded.now)
                if isinstance(step, Done | Wait):
                    break
                if isinstance(step, Expire):
                    await self.follow(
                        await self.store.expire(order, step.offer_ids, fence=None)
                    )
                elif isinstance(step, GiveUp):
                    if await self.store.give_up(order, rules=self.rules, fence=None):
                        finished += 1
                        break
                    # Not ended: the locked row said otherwise (a redispatch); read again.
                else:
                    # Past the deadline a new round is impossible; a zone still has it.
                    break
        if finished:
            log.warning(
                "offer backstop ended %d dispatches their zones left open", finished
            )
        return finished


OFFER_OPS = web.AppKey("offer_ops", OfferOps)


class OfferRefused(Exception):
    """An answer or operator action refused with a named reason: its 409 problem."""

    def __init__(self, exc: OfferRefusedError) -> None:
        super().__init__(exc.detail)
        self.response = refused(exc)


class OfferCollector(Collector):
    """Offer and dispatch counts read from PostgreSQL (all replicas and zones), cached
    by the last `/metrics` request."""

    def __init__(self) -> None:
        self.offers: dict[str, int] = {}
        self.gave_up: int = 0

    async def refresh(self, pool: asyncpg.Pool) -> None:
        self.offers, self.gave_up = await offer_counts(pool)

    def collect(self) -> Any:
        total = CounterMetricFamily(
            "dispatcher_offers", "offers by outcome", labels=["outcome"]
        )
        for outcome in ("ACCEPTED", "DECLINED", "EXPIRED", "WITHDRAWN"):
            total.add_metric([outcome.lower()], self.offers.get(outcome, 0))
        yield total
        yield GaugeMetricFamily(
            "dispatcher_offers_open",
            "offers waiting for an answer",
            value=self.offers.get("OPEN", 0),
        )
        yield CounterMetricFamily(
            "dispatcher_dispatches_given_up",
            "dispatches that ended unassigned",
            value=self.gave_up,
        )


OFFER_COLLECTOR = web.AppKey("offer_collector", OfferCollector)


async def refresh_offer_metrics(app: web.Application) -> None:
    with contextlib.suppress(
        DispatchError, OSError, asyncpg.PostgresError, TimeoutError
    ):
        await app[OFFER_COLLECTOR].refresh(app[PG_POOL])


async def offer_context(app: web.Application) -> AsyncIterator[None]:
    """The ingress's offer side and its backstop task (after the dispatcher exists)."""
    settings = app[SETTINGS]
    ops = OfferOps(
        OfferStore(app[PG_POOL], render=assigned_body),
        app[DISPATCHER],
        settings.offer_rules(),
    )
    app[OFFER_OPS] = ops
    collector = OfferCollector()
    app[OFFER_COLLECTOR] = collector
    registry = app[METRICS].registry
    registry.register(collector)
    registry.register(ops.accepted_after)
    task = asyncio.create_task(
        _backstop(ops, settings.offer_backstop_interval_s), name="offer-backstop"
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _backstop(ops: OfferOps, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await ops.finish_overdue()
            await ops.wake_stalled()
        except Exception as exc:
            log.info("offer backstop skipped: %s", exc)


# ---- answers ---------------------------------------------------------------------------


def refused(exc: OfferRefusedError) -> web.Response:
    """409 problem naming the reason (docs/OFFERS.md)."""
    body = {
        "type": PROBLEM_BASE + "offer-refused",
        "title": "Offer refused",
        "status": 409,
        "detail": exc.detail,
        "reason": exc.reason,
    }
    return web.Response(status=409, text=json.dumps(body), content_type=PROBLEM_JSON)


def offer_item(row: Mapping[str, Any]) -> OfferItem:
    drop = (
        None
        if row["drop_lat"] is None
        else Point(lat=row["drop_lat"], lon=row["drop_lon"])
    )
    return OfferItem(
        offer_id=row["offer_id"],
        seller_order_id=row["seller_order_id"],
        driver_id=row["driver_id"],
        status=row["status"],
        round=row["round"],
        pickup=Point(lat=row["pickup_lat"], lon=row["pickup_lon"]),
        drop=drop,
        distance_km=row["distance_km"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        answered_at=row["answered_at"],
        reason=row["reason"],
    )


def dispatch_body(
    dispatch: asyncpg.Record, offers: Sequence[asyncpg.Record]
) -> DispatchViewBody:
    place = {
        k: dispatch[k] for k in ("pickup_lat", "pickup_lon", "drop_lat", "drop_lon")
    }
    return DispatchViewBody(
        seller_order_id=dispatch["seller_order_id"],
        status=dispatch["status"],
        mode=dispatch["mode"],
        attempt=dispatch["attempt"],
        round=dispatch["round"],
        deadline_at=dispatch["deadline_at"],
        driver_id=dispatch["driver_id"],
        reason=dispatch["reason"],
        offers=[offer_item({**dict(o), **place}) for o in offers],
    )


async def cancel_dispatch(
    app: web.Application, seller_order_id: str
) -> DispatchViewBody | None:
    """Vendure's cancel, for an order whose dispatch booked nobody yet: its offers are
    withdrawn. None: no such dispatch (the delivery, if any, is cancelled as usual)."""
    ops = app[OFFER_OPS]
    changes = await ops.store.cancel(seller_order_id)
    if changes is None:
        return None
    await ops.follow(changes)
    found = await ops.store.dispatch_with_offers(seller_order_id)
    assert found is not None
    return dispatch_body(*found)
