"""Dispatcher: the operations behind the HTTP routes, over zone actors and the stores."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from dispatcher.api.orderbatcher import OrderBatcher
from dispatcher.api.pingbuffer import PingBuffer
from dispatcher.api.pinggate import PingGate
from dispatcher.api.zoneclient import ZoneDirectory
from dispatcher.api.zonerouter import ZoneRouter
from dispatcher.config import ResolvedSettings
from dispatcher.errors import DatabaseUnavailableError, DispatchError
from dispatcher.messages import (
    AssignRequest,
    AssignResult,
    Ping,
    PingVerdict,
    ZoneStats,
)
from dispatcher.models import assigned_body, unassigned_body
from dispatcher.rules import replay
from dispatcher.store import outbox
from dispatcher.store.deliveries import DeliveryStore
from dispatcher.store.drivers import DriverRecord, DriverStore
from dispatcher.store.offers import OfferStore
from dispatcher.store.pg import known_zones, ping_database

log = logging.getLogger(__name__)

# Longest wait of a read or an order for the pings queued before it (normally one
# flush, ~10 ms; a zone actor's first start takes a second or two).
SETTLE_TIMEOUT_S = 5.0
# Orders of one zone in one actor call at most: a zone books them one after the other,
# so this bounds how long the last one waits (about 2 ms each).
ORDER_BATCH_MAX = 16


@dataclass(frozen=True, slots=True)
class PingOutcome:
    verdict: PingVerdict | None
    error: DispatchError | None = None


class Dispatcher:
    """Routes work to zone actors; lifecycle writes go to PostgreSQL here and the
    driver's zone actor then refreshes its shard and mirror from PostgreSQL."""

    def __init__(
        self,
        settings: ResolvedSettings,
        *,
        drivers: DriverStore,
        deliveries: DeliveryStore,
        router: ZoneRouter,
        zones: ZoneDirectory,
    ) -> None:
        self.settings = settings
        self.drivers = drivers
        self.deliveries = deliveries
        self.router = router
        self.zones = zones
        self.gate = PingGate(
            drivers.last_fixes, max_speed_kmh=settings.max_ping_speed_kmh
        )
        self.pings = PingBuffer(
            zones.apply_pings,
            interval_s=settings.ping_flush_interval_ms / 1000.0,
            max_batch=settings.ping_batch_max,
            max_age_s=settings.heartbeat_ttl_s,
            on_applied=self._pings_written,
        )
        self.orders = OrderBatcher(zones.assign_many, max_batch=ORDER_BATCH_MAX)
        # A driver going OFFLINE or deactivated gives back his open offer at once.
        self.offer_store = OfferStore(drivers.pool, render=assigned_body)
        # Fixes written to PostgreSQL, and those it refused after this ingress had
        # acknowledged them (metrics).
        self.pings_written = 0
        self.pings_refused_on_write = 0
        # False from the moment this ingress's LISTEN connection to PostgreSQL is lost
        # until it is back: pings are then refused (503) rather than acknowledged.
        self.database_up = True

    def database_lost(self) -> None:
        self.database_up = False

    def database_back(self) -> None:
        self.database_up = True
        # Changes to drivers may have been missed while nobody listened.
        self.gate.clear()

    async def close(self) -> None:
        await self.orders.close()
        await self.pings.close()

    async def settle_pings(self, timeout_s: float | None = SETTLE_TIMEOUT_S) -> None:
        """Wait until the fixes this ingress acknowledged are written (reads and
        orders see them: read-your-writes through one ingress).

        Bounded: with PostgreSQL hung, a flush takes the whole actor-call timeout, and
        the read or order behind it must still answer in bounded time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self.pings.settle()
        except TimeoutError:
            log.warning(
                "queued pings not written within %g s; answering without them",
                timeout_s,
            )

    # ---- operations (readiness, /zones, metrics) -------------------------------------

    async def database_answers(self) -> bool:
        return await ping_database(self.deliveries.pool)

    async def zone_ids(self) -> list[str]:
        return await known_zones(self.deliveries.pool)

    async def outbox_pending(self) -> int:
        return await outbox.pending(self.deliveries.pool)

    async def open_offer_counts(self) -> dict[str, int]:
        return await self.offer_store.open_offer_counts()

    async def shutdown_zones(self) -> None:
        """End the zone actors this ingress knows (a single-process `serve` owns them)."""
        await self.zones.shutdown_all(sorted(self.router.known))

    async def zone_stats(self, zone_id: str) -> ZoneStats:
        return await self.zones.stats(zone_id)

    # ---- reads and driver admin: the handlers' one way to the stores ------------------

    async def get_delivery(
        self, seller_order_id: str
    ) -> tuple[asyncpg.Record, list[asyncpg.Record]] | None:
        """The delivery row and its history, or None."""
        return await self.deliveries.get(seller_order_id)

    async def get_driver(self, driver_id: str) -> DriverRecord | None:
        return await self.drivers.get(driver_id)

    async def list_drivers(
        self, status: str | None, zone_id: str | None, limit: int
    ) -> list[DriverRecord]:
        return await self.drivers.list_drivers(status, zone_id, limit)

    async def create_driver(
        self, name: str, phone: str | None, vehicle_type: str | None
    ) -> tuple[DriverRecord, str]:
        """The new driver (OFFLINE, active) and its token, shown this once."""
        return await self.drivers.create(name, phone, vehicle_type)

    async def token_owner(self, token: str) -> str | None:
        """The driver a bearer token names, or None."""
        return await self.drivers.token_owner(token)

    async def driver_is_active(self, driver_id: str) -> bool:
        return await self.drivers.is_active(driver_id)

    # ---- orders -----------------------------------------------------------------------

    async def assign(self, req: AssignRequest) -> AssignResult:
        await self.settle_pings()
        zone = await self.router.zone_for_order(
            req.pickup_lat, req.pickup_lon, self.settings.search_radius_km
        )
        if zone is None:
            # No zone within reach means no located driver within reach: answer
            # without waking an actor. A retry may still find one later.
            existing = await self.deliveries.existing(req.seller_order_id)
            if existing is not None:
                return replay(req, existing)
            return AssignResult(
                "unassigned", unassigned_body(req.seller_order_id), "none"
            )
        return await self.orders.assign(zone, req)

    async def step(
        self, seller_order_id: str, step: str, reason: str | None = None
    ) -> None:
        result = await self.deliveries.step(seller_order_id, step, reason=reason)
        if result.changed:
            await self.refresh_driver(result.driver_id)

    # ---- drivers ----------------------------------------------------------------------

    async def ping(self, ping: Ping) -> PingVerdict:
        outcome = (await self.ping_many([ping]))[0]
        if outcome.error is not None:
            raise outcome.error
        assert outcome.verdict is not None
        return outcome.verdict

    async def ping_many(self, pings: Sequence[Ping]) -> list[PingOutcome]:
        """Judge each fix and queue the accepted ones for their zones (write-behind).

        A fix is acknowledged only if it can be written: while PostgreSQL is known to
        be down, or a zone's last flush failed, its fixes get that error (a 503).
        """
        if not self.database_up:
            # PostgreSQL is known to be down: a fix acknowledged now could only wait in
            # the queue, so the caller is told to retry (docs/API.md#errors).
            down = DatabaseUnavailableError(
                "PostgreSQL unavailable: lost the connection"
            )
            return [PingOutcome(None, down) for _ in pings]
        outcomes: list[PingOutcome | None] = [None] * len(pings)
        routable: list[tuple[int, str]] = []
        for index, ping in enumerate(pings):
            try:
                zone = await self.router.zone_for_ping(
                    ping.lat, ping.lon, ping.driver_id
                )
            except DispatchError as exc:
                outcomes[index] = PingOutcome(None, exc)
                continue
            failure = self.pings.failure(zone)
            if failure is not None:
                outcomes[index] = PingOutcome(None, failure)
                continue
            routable.append((index, zone))
        verdicts = await self.gate.judge([pings[i] for i, _ in routable])
        # No await from the verdicts to the queue: the gate and the queue agree.
        for (index, zone), verdict in zip(routable, verdicts, strict=True):
            if verdict is PingVerdict.ACCEPTED:
                self.pings.offer(zone, pings[index])
            outcomes[index] = PingOutcome(verdict)
        return [o for o in outcomes if o is not None]

    def _pings_written(
        self, pings: Sequence[Ping], verdicts: Sequence[PingVerdict]
    ) -> None:
        self.gate.applied(pings, verdicts)
        written = sum(v is PingVerdict.ACCEPTED for v in verdicts)
        self.pings_written += written
        self.pings_refused_on_write += len(verdicts) - written

    async def set_status(self, driver_id: str, status: str) -> DriverRecord:
        await self.settle_pings()
        record = await self.drivers.set_status(driver_id, status)
        if status == "OFFLINE":
            await self._release_offer(driver_id)
        await self.refresh_driver(driver_id, record.zone_id)
        return record

    async def update_driver(
        self,
        driver_id: str,
        *,
        is_active: bool | None,
        name: str | None,
        auto_accept: bool | None = None,
    ) -> DriverRecord:
        await self.settle_pings()
        record = await self.drivers.update(
            driver_id, is_active=is_active, name=name, auto_accept=auto_accept
        )
        self.gate.forget(driver_id)
        if is_active is False:
            await self._release_offer(driver_id)
        await self.refresh_driver(driver_id, record.zone_id)
        return record

    async def _release_offer(self, driver_id: str) -> None:
        changes = await self.offer_store.release_driver(driver_id)
        await self.wake_dispatches(changes.wake)

    async def wake_dispatches(self, wake: Mapping[str, str]) -> None:
        """Ask each dispatch's zone (order -> zone) to look at it now."""
        for order, zone_id in wake.items():
            try:
                await self.zones.advance_dispatch(zone_id, order)
            except DispatchError as exc:
                # The dispatch's timer, its zone's restart or the backstop moves it on.
                log.info("dispatch %s: zone %s not woken: %s", order, zone_id, exc)

    async def refresh_driver(self, driver_id: str, zone_id: str | None = None) -> None:
        """Let the driver's zone actor bring its shard and mirror up to PostgreSQL."""
        if zone_id is None:
            record = await self.drivers.get(driver_id)
            zone_id = None if record is None else record.zone_id
        if zone_id is None:
            return
        try:
            await self.zones.refresh(zone_id, [driver_id])
        except DispatchError as exc:
            # PostgreSQL already holds the change; the zone's sweeper repairs the
            # mirror when it is back, and the lookup double-checks in PostgreSQL.
            log.warning(
                "refresh of driver %s in zone %s deferred: %s", driver_id, zone_id, exc
            )
