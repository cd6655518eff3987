"""ZoneActor: the Ray shell around ZoneCore; opens its own pool and Redis client."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import cast

import ray
from ray.actor import ActorClass

from dispatcher.actors.core import ZoneCore
from dispatcher.actors.hosting import current_node, is_excluded
from dispatcher.config import ResolvedSettings
from dispatcher.errors import StaleEpochError
from dispatcher.messages import (
    AssignRequest,
    AssignResult,
    PingBatch,
    PingVerdict,
    ZonePlacement,
    ZoneState,
    ZoneStats,
)
from dispatcher.store.deliveries import DeliveryStore
from dispatcher.store.drivers import DriverStore
from dispatcher.store.geo import GeoMirror, connect_redis
from dispatcher.store.pg import create_pool
from dispatcher.zoning import Zoning

log = logging.getLogger(__name__)

# Assignment and upkeep run one at a time per zone: a small pool is enough.
ZONE_POOL_SIZE = 3
# Ping batches of a zone in flight at once: one per ingress replica (see PingBuffer),
# so a few replicas' flushes overlap their round trips.
PING_POOL_SIZE = 3


class ZoneActor:
    """One per zone, named `zone:<id>`. State lives in PostgreSQL; the in-memory shard
    and the mirror are rebuilt from it whenever this process (re)starts."""

    def __init__(self, zone_id: str, settings_json: str) -> None:
        self._started_at = time.time()
        self._active_at = 0.0
        logging.basicConfig(level=logging.INFO)
        self.zone_id = zone_id
        self._settings_json = settings_json
        self.settings = ResolvedSettings.model_validate_json(settings_json)
        node_id = current_node()
        # Ray restarts an actor with its first options: one created before its node was
        # closed (drained) or began dying can come back there. Refusing to start ends
        # this actor for good (Ray does not retry a failed constructor) and frees the
        # name; the next call re-creates the zone with the closed nodes excluded.
        if is_excluded(self.settings.ray_namespace, node_id):
            raise NodeClosedError(f"zone {zone_id}: node {node_id} is closed to zones")
        self._core: ZoneCore | None = None
        self._starting = asyncio.Lock()
        # Set by drain(): this incarnation handed the zone over and must never take it
        # back (a late call would otherwise start a core and bump the epoch again).
        self._drained = False

    async def _ready(self) -> ZoneCore:
        # Started lazily on the first call: Ray runs __init__ synchronously, and a
        # failed start (PostgreSQL down) is then retried by the next call.
        if self._core is not None:
            return self._core
        async with self._starting:
            if self._drained:
                raise StaleEpochError(f"zone {self.zone_id} moved to a new incarnation")
            if self._core is None:
                s = self.settings
                # Both pools connect at once: a restarted zone answers that much sooner.
                pools = await asyncio.gather(
                    create_pool(
                        s.database_url,
                        max_size=ZONE_POOL_SIZE,
                        command_timeout_s=s.pg_timeout_s,
                        stateless=True,
                    ),
                    # A location fix is superseded seconds later: its commit need not wait for
                    # the WAL flush. At most the last ~0.6 s of fixes can be lost if PostgreSQL
                    # itself crashes; bookings use the durable pool.
                    create_pool(
                        s.database_url,
                        max_size=PING_POOL_SIZE,
                        command_timeout_s=s.pg_timeout_s,
                        server_settings={"synchronous_commit": "off"},
                        stateless=True,
                    ),
                    return_exceptions=True,
                )
                pool, ping_pool = pools
                if isinstance(pool, BaseException) or isinstance(
                    ping_pool, BaseException
                ):
                    for opened in pools:
                        if not isinstance(opened, BaseException):
                            await opened.close()
                    raise (
                        pool
                        if isinstance(pool, BaseException)
                        else cast(BaseException, ping_pool)
                    )
                mirror = GeoMirror(
                    connect_redis(s.redis_url, s.redis_timeout_s), s.redis_timeout_s
                )
                core = ZoneCore(
                    self.zone_id,
                    s,
                    drivers=DriverStore(pool, ping_pool=ping_pool),
                    deliveries=DeliveryStore(pool),
                    mirror=mirror,
                    zoning=Zoning(s.zone_resolution),
                )
                try:
                    await core.start()
                except BaseException:
                    await pool.close()
                    await ping_pool.close()
                    await mirror.client.aclose()
                    raise
                self._core = core
                self._active_at = time.time()
        return self._core

    @ray.method
    async def assign_many(self, reqs: Sequence[AssignRequest]) -> list[AssignResult]:
        return await (await self._ready()).assign_many(reqs)

    @ray.method
    async def apply_ping_batch(self, batch: PingBatch) -> list[PingVerdict]:
        """A flush of the ingress's queued fixes for this zone, in columns."""
        return await (await self._ready()).apply_pings(batch.pings())

    @ray.method
    async def refresh(self, driver_ids: Sequence[str]) -> None:
        await (await self._ready()).refresh(driver_ids)

    @ray.method
    async def advance_dispatch(self, seller_order_id: str) -> None:
        """An answer to one of this zone's offers came in: decide what comes next now."""
        await (await self._ready()).advance_dispatch(seller_order_id)

    @ray.method
    async def stats(self) -> ZoneStats:
        return (await self._ready()).stats()

    @ray.method
    async def sweep_now(self) -> None:
        """Run one sweep immediately (operators and tests; the loop runs on its own)."""
        await (await self._ready()).sweep_once()

    @ray.method
    async def where(self) -> ZonePlacement:
        """This incarnation's node, process and state; does not take the zone."""
        return self._placement()

    def _placement(self) -> ZonePlacement:
        core = self._core
        state: ZoneState = (
            "draining" if self._drained else "idle" if core is None else "active"
        )
        return ZonePlacement(
            self.zone_id,
            ray.get_runtime_context().get_node_id(),
            os.getpid(),
            state,
            core.epoch if core is not None else 0,
            len(core.shard) if core is not None else 0,
            self._started_at,
            self._active_at,
        )

    @ray.method
    async def warm(self) -> ZonePlacement:
        """Take the zone now (new epoch, shard and mirror rebuilt) rather than on the
        first request, so a handoff ends with the zone ready."""
        await self._ready()
        return self._placement()

    @ray.method
    async def drain(self) -> str:
        """Hand the zone over: finish the calls in flight, refuse new ones, close the
        connections. Returns the settings this zone was started with, for its successor."""
        async with self._starting:
            self._drained = True
        if self._core is not None:
            await self._core.drain()
        await self._close()
        return self._settings_json

    @ray.method
    async def shutdown(self) -> None:
        await self._close()

    async def _close(self) -> None:
        core, self._core = self._core, None
        if core is not None:
            await core.stop()
            await core.drivers.pool.close()
            if core.drivers.ping_pool is not core.drivers.pool:
                await core.drivers.ping_pool.close()
            await core.mirror.client.aclose()


class NodeClosedError(RuntimeError):
    """A zone actor started on a node closed to zones."""


# Typed, so callers' handles are `ActorProxy[ZoneActor]` and mypy checks every remote call.
ZoneActorRemote: ActorClass[ZoneActor] = ray.remote(ZoneActor)
