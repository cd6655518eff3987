"""ZoneActor: the Ray shell around ZoneCore; opens its own pool and Redis client."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import asyncpg
import ray
from ray.actor import ActorClass

from dispatcher.actors.core import ZoneCore
from dispatcher.actors.hosting import current_node, is_excluded, live_slot
from dispatcher.actors.options import ZoneSlot
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
from dispatcher.store.pg import close_pool, create_pool, ping_database
from dispatcher.zoning import Zoning

log = logging.getLogger(__name__)

# Assignment and upkeep run one at a time per zone: a small pool is enough.
ZONE_POOL_SIZE = 3
# Ping batches of a zone in flight at once: one per ingress replica (see PingBuffer),
# so a few replicas' flushes overlap their round trips.
PING_POOL_SIZE = 3


class ZoneActor:
    """One per zone, named `zone:<id>` (and, with standbys on, a second one in slot `b`,
    `zone-b:<id>`). State lives in PostgreSQL; the in-memory shard and the mirror are
    rebuilt from it whenever an incarnation takes the zone."""

    def __init__(self, zone_id: str, settings_json: str, slot: ZoneSlot = "a") -> None:
        self._started_at = time.time()
        self._active_at = 0.0
        logging.basicConfig(level=logging.INFO)
        self.zone_id = zone_id
        self.slot: ZoneSlot = slot
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
        self._stores: _Stores | None = None
        self._starting = asyncio.Lock()
        # Set by drain(): this incarnation handed the zone over and must never take it
        # back (a late call would otherwise start a core and bump the epoch again).
        self._drained = False

    async def _ready(self) -> ZoneCore:
        # Started lazily on the first call: Ray runs __init__ synchronously, and a
        # failed start (PostgreSQL down) is then retried by the next call.
        if self._core is not None and not self._core.fenced:
            return self._core
        async with self._starting:
            if self._drained:
                raise StaleEpochError(f"zone {self.zone_id} moved to a new incarnation")
            if self.settings.zone_standby:
                await self._standby_gate()
            if self._core is None:
                s = self.settings
                stores = self._stores or await _Stores.open(s)
                self._stores = stores
                core = ZoneCore(
                    self.zone_id,
                    s,
                    drivers=DriverStore(stores.pool, ping_pool=stores.ping_pool),
                    deliveries=DeliveryStore(stores.pool),
                    mirror=stores.mirror,
                    zoning=Zoning(s.zone_resolution),
                )
                try:
                    await core.start()
                except BaseException:
                    self._stores = None
                    await stores.close()
                    raise
                self._core = core
                self._active_at = time.time()
        return self._core

    async def _standby_gate(self) -> None:
        """With standbys: take the zone only while Ray's KV names this slot, so a call
        that reaches the standby (a stale handle) never takes the zone from the live
        one. An incarnation fenced by its standby's takeover goes back to waiting, ready
        to take the zone again when the KV names it."""
        if self._core is not None and self._core.fenced:
            await self._retire_core()
        namespace = self.settings.ray_namespace
        if live_slot(namespace, self.zone_id) != self.slot:
            raise StaleEpochError(
                f"zone {self.zone_id}: slot {self.slot} is the standby"
            )
        node_id = current_node()
        if self._core is None and is_excluded(namespace, node_id):
            # Placed before its node closed: the ingress gives the zone back to the
            # other slot, and a keeper moves this standby off the node.
            raise NodeClosedError(f"zone {self.zone_id}: node {node_id} is closed")

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
            "draining"
            if self._drained
            else "idle"
            if core is None
            else "fenced"
            if core.fenced
            else "active"
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
            self.slot,
        )

    @ray.method
    async def warm(self) -> ZonePlacement:
        """Take the zone now (new epoch, shard and mirror rebuilt) rather than on the
        first request, so a handoff ends with the zone ready."""
        await self._ready()
        return self._placement()

    @ray.method
    async def prepare(self) -> ZonePlacement:
        """Standbys: open and exercise the connections a takeover uses, without
        taking the zone (ingress keepers ask this of each standby at every pass)."""
        async with self._starting:
            if self._core is None and not self._drained:
                if self._stores is None:
                    self._stores = await _Stores.open(self.settings)
                    # Once: the reads of a takeover (at every pass they would cost a
                    # zone's worth of rows per standby every few seconds).
                    await self._stores.rehearse(self.zone_id)
                await self._stores.keep_alive()
        return self._placement()

    @ray.method
    async def created_with(self) -> str:
        """The settings this zone was started with (a successor starts with the same)."""
        return self._settings_json

    @ray.method
    async def stand_by(self) -> ZonePlacement:
        """Standbys: an incarnation fenced by its standby's takeover stops acting for
        the zone and waits to be named again (ingress keepers ask it)."""
        async with self._starting:
            if self._core is not None and self._core.fenced:
                await self._retire_core()
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

    async def _retire_core(self) -> None:
        """Stop acting for the zone; the connections stay open for a later takeover."""
        core, self._core = self._core, None
        if core is not None:
            await core.stop()

    async def _close(self) -> None:
        await self._retire_core()
        stores, self._stores = self._stores, None
        if stores is not None:
            await stores.close()


@dataclass(frozen=True, slots=True)
class _Stores:
    """A zone incarnation's connections: opened when it takes the zone, or ahead of
    that by a standby (`prepare`), so a takeover does not wait for them."""

    pool: asyncpg.Pool
    ping_pool: asyncpg.Pool
    mirror: GeoMirror

    @classmethod
    async def open(cls, s: ResolvedSettings) -> _Stores:
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
        if isinstance(pool, BaseException) or isinstance(ping_pool, BaseException):
            for opened in pools:
                if not isinstance(opened, BaseException):
                    await close_pool(opened)
            raise (
                pool
                if isinstance(pool, BaseException)
                else cast(BaseException, ping_pool)
            )
        mirror = GeoMirror(
            connect_redis(s.redis_url, s.redis_timeout_s), s.redis_timeout_s
        )
        return cls(pool, ping_pool, mirror)

    async def rehearse(self, zone_id: str) -> None:
        """Read what a takeover reads (nothing is written), so that its code paths and
        queries have run once in this process."""
        await DriverStore(self.pool, ping_pool=self.ping_pool).zone_entries(zone_id)
        await self.mirror.is_built(zone_id)

    async def keep_alive(self) -> None:
        """One round trip on each connection: idle ones are closed after a while."""
        await ping_database(self.pool)
        await ping_database(self.ping_pool)
        await self.mirror.client.ping()

    async def close(self) -> None:
        await close_pool(self.pool)
        await close_pool(self.ping_pool)
        await self.mirror.aclose()


class NodeClosedError(RuntimeError):
    """A zone actor started on a node closed to zones."""


# Typed, so callers' handles are `ActorProxy[ZoneActor]` and mypy checks every remote call.
ZoneActorRemote: ActorClass[ZoneActor] = ray.remote(ZoneActor)
