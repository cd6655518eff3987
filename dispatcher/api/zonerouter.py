"""ZoneRouter: which zone actor serves a ping or an order, with a bounded zone count."""

from __future__ import annotations

import asyncpg

from dispatcher.errors import ForbiddenError, NotFoundError, RequestValidationError
from dispatcher.store.drivers import driver_active
from dispatcher.store.pg import existing_zones, known_zones, reserve_zone
from dispatcher.zoning import Zoning


class ZoneRouter:
    """Pings go to the zone of their point (creating it, up to `max_zones`).

    Orders go to the zone of their pickup if it exists, else to the nearest existing
    zone within reach; with none, no driver can be in range and no actor is needed.
    """

    def __init__(self, zoning: Zoning, pool: asyncpg.Pool, *, max_zones: int) -> None:
        self.zoning = zoning
        self.pool = pool
        self.max_zones = max_zones
        self.known: set[str] = set()

    async def load(self) -> None:
        self.known = set(await known_zones(self.pool))

    async def zone_for_ping(self, lat: float, lon: float, driver_id: str) -> str:
        """The ping's zone. A new zone (a new actor process) is opened only for an
        active driver, and only while PostgreSQL counts fewer than `max_zones`."""
        zone = self.zoning.zone_of(lat, lon)
        if zone in self.known:
            return zone
        await self.load()
        if zone in self.known:
            return zone
        await self._check_may_open_zone(driver_id)
        # Counted and added in one PostgreSQL step: concurrent pings (from any replica)
        # cannot each see room for one more zone and open one each.
        if not await reserve_zone(self.pool, zone, max_zones=self.max_zones):
            raise RequestValidationError(
                f"location outside the service area: the zone limit ({self.max_zones}) is reached",
                errors=[{"loc": ["body", "lat"], "msg": "outside the service area"}],
            )
        self.known.add(zone)
        return zone

    async def _check_may_open_zone(self, driver_id: str) -> None:
        """Same answers as a rejected ping: unknown 404, deactivated 403."""
        active = await driver_active(self.pool, driver_id)
        if active is None:
            raise NotFoundError("unknown driver")
        if not active:
            raise ForbiddenError("driver is deactivated")

    async def zone_for_order(
        self, lat: float, lon: float, radius_km: float
    ) -> str | None:
        near = self.zoning.zones_near(lat, lon, radius_km)
        if not any(z in self.known for z in near):
            # Another replica may have opened a zone here a moment ago: "no zone in
            # reach" is only ever concluded from PostgreSQL, never from this cache.
            self.known.update(await existing_zones(self.pool, near))
        return next((z for z in near if z in self.known), None)
