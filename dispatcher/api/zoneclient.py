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

from dispatcher.actors.hosting import (
    live_slot,
    set_live_slot,
    zone_placement,
    zone_target,
)
from dispatcher.actors.options import ZoneSlot, other_slot, zone_actor_name
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
# A zone process that has not answered yet (just created, or restarted by Ray) holds the
# calls sent to it until its constructor ends: about a second on an idle machine, more
# than the call timeout on one starved of CPU. A call that times out on a handle that never
# answered is retried for up to this long from its start, as for a handoff; only a zone
# that answered before and stops answering is hung at once.
STARTING_WAIT_S = HANDOFF_WAIT_S

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
        # Which slot each cached handle is (always `a` without standbys).
        self._slots: dict[str, ZoneSlot] = {}
        # Calls retried after a zone died, moved or was fenced (tests, metrics).
        self.retries = 0
        # Zones this ingress handed to their standby after the live incarnation died.
        self.failovers = 0
        self._creating: dict[
            str, asyncio.Task[tuple[ActorProxy[ZoneActor], ZoneSlot]]
        ] = {}
        self._failing_over: dict[str, asyncio.Task[bool]] = {}
        # The handle of each zone that has answered this ingress at least once.
        self._answered: dict[str, ActorProxy[ZoneActor]] = {}

    @property
    def settings_json(self) -> str:
        """What a zone actor is created with (secrets it does not use redacted)."""
        return self._settings_json

    @property
    def zone_ids(self) -> list[str]:
        return sorted(self._handles)

    def _get_or_create(self, zone_id: str) -> tuple[ActorProxy[ZoneActor], ZoneSlot]:
        namespace = self.settings.ray_namespace
        if self.settings.zone_standby and live_slot(namespace, zone_id) == "b":
            # The standby took the zone; slot `a` is the standby now (the keepers start it).
            try:
                return ray.get_actor(zone_actor_name(zone_id, "b"), namespace), "b"
            except ValueError:
                # Gone for good (killed by an operator): slot `a` takes the zone again.
                set_live_slot(namespace, zone_id, "a")
        # Read at every creation (rare: the handle is cached until a call fails), so a
        # zone re-created while its node is drained neither lands there nor on any node
        # closed before, and one re-created during a handoff starts where it is handed to.
        options = zone_placement(
            zone_id,
            namespace,
            resource_units=self.settings.zone_resource_units,
            standby=self.settings.zone_standby,
        )
        handle = ZoneActorRemote.options(**options).remote(zone_id, self._settings_json)
        return handle, "a"

    async def _handle(self, zone_id: str) -> tuple[ActorProxy[ZoneActor], ZoneSlot]:
        """The zone's live actor as this ingress knows it, and its slot."""
        cached = self._handles.get(zone_id)
        if cached is not None:
            return cached, self._slots.get(zone_id, "a")
        # Creating or looking up a named actor is a blocking GCS round trip; concurrent
        # first requests for one zone share a single one instead of racing for the name.
        task = self._creating.get(zone_id)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(self._get_or_create, zone_id))
            self._creating[zone_id] = task
            task.add_done_callback(lambda _: self._creating.pop(zone_id, None))
        handle, slot = await asyncio.shield(task)
        self._handles[zone_id] = handle
        self._slots[zone_id] = slot
        return handle, slot

    def _forget(self, zone_id: str, handle: ActorProxy[ZoneActor] | None) -> None:
        """Drop the cached handle if it is still `handle`: a call that began before a
        takeover must not discard the standby's handle when it fails late."""
        if handle is not None and self._handles.get(zone_id) is handle:
            del self._handles[zone_id]
            self._slots.pop(zone_id, None)

    async def _fail_over(self, zone_id: str, dead: ZoneSlot, since: float) -> bool:
        """The incarnation in slot `dead` died: hand the zone to its standby, which is
        already running and takes it with a new epoch (about the time to rebuild the
        shard), instead of waiting for Ray to start a new process. False if there is
        no standby to take it (then the call waits for Ray's restart, as without).
        The calls that met the death together share one takeover."""
        if not self.settings.zone_standby:
            return False
        task = self._failing_over.get(zone_id)
        if task is None:
            task = asyncio.create_task(self._take_over(zone_id, dead, since))
            self._failing_over[zone_id] = task
            task.add_done_callback(lambda _: self._failing_over.pop(zone_id, None))
        return await asyncio.shield(task)

    async def _take_over(self, zone_id: str, dead: ZoneSlot, since: float) -> bool:
        if await self._in_handoff(zone_id, since):
            # A handoff moves the zone on purpose; its successor is on its way.
            return False
        namespace, standby = self.settings.ray_namespace, other_slot(dead)
        try:
            handle: ActorProxy[ZoneActor] = await asyncio.to_thread(
                ray.get_actor, zone_actor_name(zone_id, standby), namespace
            )
        except ValueError:
            return False
        # Unless another replica already did: only the slot the KV names may take it.
        live = await asyncio.to_thread(live_slot, namespace, zone_id)
        if live == dead:
            await asyncio.to_thread(set_live_slot, namespace, zone_id, standby)
        try:
            async with asyncio.timeout(self.settings.actor_call_timeout_s):
                await handle.warm.remote()
        except (RayActorError, RayTaskError, TimeoutError) as exc:
            # The standby is down too, restarting, or on a closed node: the zone goes
            # back to the slot Ray restarts.
            log.warning(
                "zone %s: standby %s could not take over: %s", zone_id, standby, exc
            )
            if await asyncio.to_thread(live_slot, namespace, zone_id) == standby:
                await asyncio.to_thread(set_live_slot, namespace, zone_id, dead)
            return False
        log.warning(
            "zone %s: slot %s died, standby %s took over", zone_id, dead, standby
        )
        self.failovers += 1
        self._handles[zone_id] = handle
        self._slots[zone_id] = standby
        return True

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
            handle: ActorProxy[ZoneActor] | None = None
            slot: ZoneSlot = "a"
            try:
                handle, slot = await self._handle(zone_id)
                async with asyncio.timeout(self.settings.actor_call_timeout_s):
                    result = await invoke(handle)
                self._answered[zone_id] = handle
                return result
            except RayTaskError as exc:
                last = _stale_epoch_or_raise(exc)
                self._forget(zone_id, handle)
            except RayActorError as exc:
                # The actor died or is restarting: its standby, if any, takes the zone
                # (the slot is the one this call used, whatever is cached by now).
                last = exc
                self._forget(zone_id, handle)
                await self._fail_over(zone_id, slot, started)
            except ValueError as exc:
                # A name not found yet (the actor is being created).
                last = exc
                self._forget(zone_id, handle)
            except TimeoutError as exc:
                # A successor or a new process still starting queues calls; only a zone
                # that is neither is hung.
                if not self._starting(
                    zone_id, handle, started
                ) and not await self._in_handoff(zone_id, started):
                    raise ZoneUnavailableError(
                        f"zone {zone_id} did not answer in time"
                    ) from exc
                last = exc
        log.warning("zone %s unavailable: %s", zone_id, last)
        raise ZoneUnavailableError(f"zone {zone_id} is restarting; retry shortly")

    def _starting(
        self, zone_id: str, handle: ActorProxy[ZoneActor] | None, since: float
    ) -> bool:
        """Whether `handle` has never answered, so that its process may still be
        starting, and a call that began at `since` may still wait for it."""
        return (
            handle is not None
            and self._answered.get(zone_id) is not handle
            and time.monotonic() - since <= STARTING_WAIT_S
        )

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
        slots: tuple[ZoneSlot, ...] = (
            ("a", "b") if self.settings.zone_standby else ("a",)
        )
        for zone_id in zone_ids:
            for slot in slots:
                try:
                    handle = await asyncio.to_thread(
                        ray.get_actor,
                        zone_actor_name(zone_id, slot),
                        self.settings.ray_namespace,
                    )
                    async with asyncio.timeout(5):
                        await handle.shutdown.remote()
                except Exception as exc:
                    log.info("zone %s/%s shutdown skipped: %s", zone_id, slot, exc)


def _stale_epoch_or_raise(exc: RayTaskError) -> StaleEpochError:
    """A call that met a fenced or standing-by incarnation is retried on the live one;
    the zone's own refusals (DispatchError) reach the caller as they are."""
    cause = exc.cause
    if isinstance(cause, DispatchError):
        raise cause from None
    if not isinstance(cause, StaleEpochError):
        raise exc
    return cause
