"""PingBuffer: write-behind of acknowledged pings, one actor call per zone per flush."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from dispatcher.actors.messages import Ping, PingVerdict
from dispatcher.errors import DispatchError

log = logging.getLogger(__name__)

Flush = Callable[[str, Sequence[Ping]], Awaitable[list[PingVerdict]]]
# Told what the zone actor (PostgreSQL) decided for each fix of a batch.
OnApplied = Callable[[Sequence[Ping], Sequence[PingVerdict]], None]

# After a failed flush the zone's fixes are kept and the call retried after these
# delays (the last one repeats): a zone restarting or PostgreSQL coming back.
RETRY_DELAYS_S = (0.1, 0.25, 0.5, 1.0, 2.0)


@dataclass(slots=True)
class _Zone:
    # driver id -> newest fix not yet sent: a driver's older fix in the same flush
    # window would be superseded in PostgreSQL anyway.
    pending: dict[str, Ping] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    urgent: bool = False
    task: asyncio.Task[None] | None = None
    # Offers counted when queued and when their flush attempt ended; `settle` waits
    # for the second to catch up with the first.
    offered: int = 0
    attempted: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    failure: DispatchError | None = None
    failures_in_row: int = 0


class PingBuffer:
    """Per-zone write-behind: `offer` queues a fix and returns at once.

    Each zone's flusher sends the queued fixes (the newest per driver) in one
    `apply_ping_batch` call at most every `interval_s`, one call in flight per zone, in
    chunks of `max_batch`. A failed call keeps its fixes and is retried with backoff
    while the zone reports `failure` (the ingress then answers 503 instead of
    acknowledging fixes it cannot store); fixes older than `max_age_s` are dropped
    rather than retried, since they can no longer make a driver dispatchable.

    `settle()` flushes at once and returns when everything offered before it was
    attempted: the ingress's reads and orders see the fixes it acknowledged.
    """

    def __init__(
        self,
        flush: Flush,
        *,
        interval_s: float,
        max_batch: int,
        max_age_s: float,
        on_applied: OnApplied | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._flush = flush
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._max_age_s = max_age_s
        self._on_applied = on_applied
        self._clock = clock
        self._zones: dict[str, _Zone] = {}
        self._closed = False
        # Fixes given up on (too old to retry, or refused by a bug): a metric.
        self.dropped = 0

    # ---- the ingress side -------------------------------------------------------------

    def failure(self, zone_id: str) -> DispatchError | None:
        """Why the zone's last flush failed, until one succeeds again."""
        zone = self._zones.get(zone_id)
        return None if zone is None else zone.failure

    def offer(self, zone_id: str, ping: Ping) -> None:
        if self._closed:
            raise RuntimeError("ping buffer closed")
        zone = self._zones.get(zone_id)
        if zone is None:
            zone = self._zones[zone_id] = _Zone()
            zone.task = asyncio.create_task(
                self._run(zone_id, zone), name=f"pings:{zone_id}"
            )
        queued = zone.pending.get(ping.driver_id)
        if queued is None or queued.recorded_at < ping.recorded_at:
            zone.pending[ping.driver_id] = ping
        zone.offered += 1
        zone.wakeup.set()

    @property
    def queued(self) -> int:
        return sum(len(z.pending) for z in self._zones.values())

    async def settle(self, zone_ids: Iterable[str] | None = None) -> None:
        """Flush now; return once every fix offered so far was attempted."""
        zones = (
            self._zones
            if zone_ids is None
            else {z: self._zones[z] for z in zone_ids if z in self._zones}
        )
        waits = []
        for zone in zones.values():
            if zone.attempted < zone.offered:
                zone.urgent = True
                zone.wakeup.set()
                waits.append(self._attempted(zone, zone.offered))
        if waits:
            await asyncio.gather(*waits)

    @staticmethod
    async def _attempted(zone: _Zone, target: int) -> None:
        while zone.attempted < target:
            zone.changed.clear()
            await zone.changed.wait()

    # ---- the flusher ------------------------------------------------------------------

    async def _run(self, zone_id: str, zone: _Zone) -> None:
        while True:
            await zone.wakeup.wait()
            zone.wakeup.clear()
            if self._interval_s > 0 and not zone.urgent:
                # Let the window fill; `settle` cuts it short.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval_s):
                        while not zone.urgent:
                            await zone.wakeup.wait()
                            zone.wakeup.clear()
            zone.urgent = False
            while zone.pending:
                batch, upto = list(zone.pending.values()), zone.offered
                zone.pending = {}
                ok = await self._send(zone_id, zone, batch)
                zone.attempted = max(zone.attempted, upto)
                zone.changed.set()
                if not ok:
                    delay = RETRY_DELAYS_S[
                        min(zone.failures_in_row, len(RETRY_DELAYS_S)) - 1
                    ]
                    await asyncio.sleep(delay)

    async def _send(self, zone_id: str, zone: _Zone, batch: list[Ping]) -> bool:
        for start in range(0, len(batch), self._max_batch):
            chunk = batch[start : start + self._max_batch]
            try:
                verdicts = await self._flush(zone_id, chunk)
            except DispatchError as exc:
                zone.failure = exc
                zone.failures_in_row += 1
                self._keep_for_retry(zone_id, zone, batch[start:], exc)
                return False
            except Exception:
                # Not an outage but a defect: retrying would fail the same way.
                log.exception("zone %s: %d fixes dropped", zone_id, len(batch) - start)
                self.dropped += len(batch) - start
                return True
            zone.failure = None
            zone.failures_in_row = 0
            if self._on_applied is not None:
                try:
                    self._on_applied(chunk, verdicts)
                except Exception:
                    # The fixes are written; only the bookkeeping failed. The flusher
                    # must live on, or the zone's queue would never be written again.
                    log.exception(
                        "zone %s: handling the verdicts of a flush failed", zone_id
                    )
        return True

    def _keep_for_retry(
        self, zone_id: str, zone: _Zone, unsent: list[Ping], exc: DispatchError
    ) -> None:
        oldest = self._clock() - self._max_age_s
        kept = 0
        for ping in unsent:
            if ping.recorded_at.timestamp() < oldest:
                self.dropped += 1
                continue
            newer = zone.pending.get(ping.driver_id)
            if newer is None or newer.recorded_at < ping.recorded_at:
                zone.pending[ping.driver_id] = ping
            kept += 1
        log.warning(
            "zone %s: flush failed (%s); %d fixes kept for a retry", zone_id, exc, kept
        )

    async def close(self, *, drain_s: float = 2.0) -> None:
        """Flush what is queued (bounded by `drain_s`), then stop the flushers."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_s):
                await self.settle()
        for zone in self._zones.values():
            if zone.task is not None:
                zone.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await zone.task
            self.dropped += len(zone.pending)
            zone.pending = {}
