"""Dispatcher: the operations behind the HTTP routes, over zone actors and the stores."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.actors.batcher import PingBatcher
from dispatcher.actors.client import ZoneDirectory
from dispatcher.actors.core import replay
from dispatcher.actors.messages import AssignRequest, AssignResult, Ping, PingVerdict
from dispatcher.actors.router import ZoneRouter
from dispatcher.config import ResolvedSettings
from dispatcher.errors import DispatchError, ZoneUnavailableError
from dispatcher.models import UnassignedResponse
from dispatcher.store.deliveries import DeliveryStore
from dispatcher.store.drivers import DriverRecord, DriverStore

log = logging.getLogger(__name__)


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
        self.batcher = PingBatcher(
            zones.apply_pings,
            interval_s=settings.ping_flush_interval_ms / 1000.0,
            max_batch=settings.ping_batch_max,
        )

    async def close(self) -> None:
        await self.batcher.close()

    # ---- orders -----------------------------------------------------------------------

    async def assign(self, req: AssignRequest) -> AssignResult:
        zone = await self.router.zone_for_order(req.pickup_lat, req.pickup_lon, self.settings.search_radius_km)
        if zone is None:
            # No zone within reach means no located driver within reach: answer
            # without waking an actor. A retry may still find one later.
            existing = await self.deliveries.existing(req.seller_order_id)
            if existing is not None:
                return replay(req, existing)
            body = UnassignedResponse(seller_order_id=req.seller_order_id).model_dump_json()
            return AssignResult("unassigned", body, "none")
        return await self.zones.assign(zone, req)

    async def step(self, seller_order_id: str, step: str, reason: str | None = None) -> None:
        result = await self.deliveries.step(seller_order_id, step, reason=reason)
        if result.changed:
            await self._refresh_driver(result.driver_id)

    # ---- drivers ----------------------------------------------------------------------

    async def ping(self, ping: Ping) -> PingVerdict:
        zone = await self.router.zone_for_ping(ping.lat, ping.lon, ping.driver_id)
        return await self.batcher.submit(zone, ping)

    async def ping_many(self, pings: Sequence[Ping]) -> list[PingOutcome]:
        """Route each ping to its zone; one zone's failure does not fail the others."""
        by_zone: dict[str, list[int]] = {}
        outcomes: list[PingOutcome | None] = [None] * len(pings)
        for index, ping in enumerate(pings):
            try:
                zone = await self.router.zone_for_ping(ping.lat, ping.lon, ping.driver_id)
            except DispatchError as exc:
                outcomes[index] = PingOutcome(None, exc)
                continue
            by_zone.setdefault(zone, []).append(index)

        async def one_zone(zone: str, indexes: list[int]) -> None:
            try:
                verdicts = await self.batcher.submit_many(zone, [pings[i] for i in indexes])
            except DispatchError as exc:
                for i in indexes:
                    outcomes[i] = PingOutcome(None, exc)
                return
            for i, verdict in zip(indexes, verdicts, strict=True):
                outcomes[i] = PingOutcome(verdict)

        await asyncio.gather(*(one_zone(z, idx) for z, idx in by_zone.items()))
        return [o if o is not None else PingOutcome(None, ZoneUnavailableError("lost")) for o in outcomes]

    async def set_status(self, driver_id: str, status: str) -> DriverRecord:
        record = await self.drivers.set_status(driver_id, status)
        await self._refresh_driver(driver_id, record.zone_id)
        return record

    async def update_driver(self, driver_id: str, *, is_active: bool | None, name: str | None) -> DriverRecord:
        record = await self.drivers.update(driver_id, is_active=is_active, name=name)
        await self._refresh_driver(driver_id, record.zone_id)
        return record

    async def _refresh_driver(self, driver_id: str, zone_id: str | None = None) -> None:
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
            log.warning("refresh of driver %s in zone %s deferred: %s", driver_id, zone_id, exc)
