"""ZoneDirectory: the ingress's typed facade over zone actor handles, with bounded retries."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import ray
from ray.actor import ActorProxy
from ray.exceptions import RayActorError, RayTaskError

from dispatcher.actors.hosting import zone_placement, zone_target
from dispatcher.actors.options import zone_actor_name
from dispatcher.actors.zone import ZoneActor, ZoneActorRemote
from dispatcher.config import ResolvedSettings
from dispatcher.errors import DispatchError, StaleEpochError, ZoneUnavailableError
from dispatcher.messages import (
    AssignRequest,
    AssignResult,
    Ping,
    PingBatch,
    PingVerdict,
    ZoneStats,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A zone that died is restarted by Ray in about a second, and a zone moved by
# `dispatcher zones rebalance` is back in one or two: retry for about five seconds,
# after which the caller gets a retryable 503. The backoff stops growing at a quarter
# second: a zone that comes back is found within that, not up to a second later (a
# failed call to a dead or restarting zone costs one local round trip).
RETRY_DELAYS_S = (0.05, 0.1, 0.2, *(0.25,) * 19)
# A call that meets a zone in handoff (`dispatcher zones rebalance`) is retried for as long as
# the handoff runs, up to this long: about 1-2 s on an idle machine, ten times that on a
# starved one, and a clean handoff should not cost the caller an error either way.
HANDOFF_WAIT_S = 30.0

ACTOR_REDACTED = ("admin_token", "inbound_secret", "vendure_webhook_secret")


class ZoneDirectory:
    """Get-or-create zone actors by name and call them.

    Every method is safe to retry: assignment is keyed by sellerOrderId and pings are
    ordered by recordedAt, so a call that failed after succeeding does no harm.
    """

    def __init__(self, settings: ResolvedSettings) -> None:
        self.settings = settings
        # Actor arguments are stored by Ray's control store: send no secret a zone
        # does not use (it needs the DSNs, never the tokens or webhook keys).
        redacted = settings.model_copy(update=dict.fromkeys(ACTOR_REDACTED, "redacted"))
        self._settings_json = redacted.model_dump_json()
        self._handles: dict[str, ActorProxy[ZoneActor]] = {}
        # Calls retried after a zone died, moved or was fenced (tests, metrics).
        self.retries = 0
        self._creating: dict[str, asyncio.Task[ActorProxy[ZoneActor]]] = {}

    @property
    def zone_ids(self) -> list[str]:
        return sorted(self._handles)

    def _get_or_create(self, zone_id: str) -> ActorProxy[ZoneActor]:
        # Read at every creation (rare: the handle is cached until a call fails), so a
        # zone re-created while its node is drained neither lands there nor on any node
        # closed before, and one re-created during a handoff starts where it is handed to.
        options = zone_placement(
            zone_id,
            self.settings.ray_namespace,
            resource_units=self.settings.zone_resource_units,
        )
        return ZoneActorRemote.options(**options).remote(zone_id, self._settings_json)

    async def _handle(self, zone_id: str) -> ActorProxy[ZoneActor]:
        handle = self._handles.get(zone_id)
        if handle is not None:
            return handle
        # Creating or looking up a named actor is a blocking GCS round trip; concurrent
        # first requests for one zone share a single one instead of racing for the name.
        task = self._creating.get(zone_id)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(self._get_or_create, zone_id))
            self._creating[zone_id] = task
            task.add_done_callback(lambda _: self._creating.pop(zone_id, None))
        handle = await asyncio.shield(task)
        self._handles[zone_id] = handle
        return handle

    async def _call(
        self, zone_id: str, invoke: Callable[[ActorProxy[ZoneActor]], Awaitable[T]]
    ) -> T:
        last: BaseException | None = None
        delays = iter((0.0, *RETRY_DELAYS_S))
        started = time.monotonic()
        for attempt in itertools.count():
            delay = next(delays, None)
            if delay is None:
                # Out of retries, but a zone in handoff is on its way back: wait for the
                # handoff itself, however slow the machine.
                if not await self._in_handoff(zone_id, started):
                    break
                delay = RETRY_DELAYS_S[-1]
            if delay:
                await asyncio.sleep(delay)
            if attempt:
                self.retries += 1
            try:
                handle = await self._handle(zone_id)
                async with asyncio.timeout(self.settings.actor_call_timeout_s):
                    return await invoke(handle)
            except RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, DispatchError):
                    raise cause from None
                if not isinstance(cause, StaleEpochError):
                    raise
                last = cause
                self._handles.pop(zone_id, None)
            except (RayActorError, ValueError) as exc:
                # The actor died or is restarting (ValueError: a name not found yet).
                last = exc
                self._handles.pop(zone_id, None)
            except TimeoutError as exc:
                # A successor still starting queues calls; only a zone not in handoff is hung.
                if not await self._in_handoff(zone_id, started):
                    raise ZoneUnavailableError(
                        f"zone {zone_id} did not answer in time"
                    ) from exc
                last = exc
        log.warning("zone %s unavailable: %s", zone_id, last)
        raise ZoneUnavailableError(f"zone {zone_id} is restarting; retry shortly")

    async def _in_handoff(self, zone_id: str, since: float) -> bool:
        """Whether the zone is being handed over (its target is published until the
        handoff ends) and a call that began at `since` may still wait for it."""
        if time.monotonic() - since > HANDOFF_WAIT_S:
            return False
        return (
            await asyncio.to_thread(zone_target, self.settings.ray_namespace, zone_id)
            is not None
        )

    async def assign_many(
        self, zone_id: str, reqs: Sequence[AssignRequest]
    ) -> list[AssignResult]:
        return await self._call(zone_id, lambda h: h.assign_many.remote(list(reqs)))

    async def apply_pings(
        self, zone_id: str, pings: Sequence[Ping]
    ) -> list[PingVerdict]:
        batch = PingBatch.of(pings)
        return await self._call(zone_id, lambda h: h.apply_ping_batch.remote(batch))

    async def refresh(self, zone_id: str, driver_ids: Sequence[str]) -> None:
        await self._call(zone_id, lambda h: h.refresh.remote(list(driver_ids)))

    async def advance_dispatch(self, zone_id: str, seller_order_id: str) -> None:
        await self._call(zone_id, lambda h: h.advance_dispatch.remote(seller_order_id))

    async def stats(self, zone_id: str) -> ZoneStats:
        return await self._call(zone_id, lambda h: h.stats.remote())

    async def sweep_now(self, zone_id: str) -> None:
        await self._call(zone_id, lambda h: h.sweep_now.remote())

    async def shutdown_all(self, zone_ids: Sequence[str]) -> None:
        """Close every zone's connections; used when this process owns the Ray instance."""
        for zone_id in zone_ids:
            try:
                handle = await asyncio.to_thread(
                    ray.get_actor, zone_actor_name(zone_id), self.settings.ray_namespace
                )
                async with asyncio.timeout(5):
                    await handle.shutdown.remote()
            except Exception as exc:
                log.info("zone %s shutdown skipped: %s", zone_id, exc)
