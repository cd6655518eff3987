"""PingBatcher: coalesces concurrent pings per zone into one actor call every few ms."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from dispatcher.actors.messages import Ping, PingVerdict

log = logging.getLogger(__name__)

Flush = Callable[[str, Sequence[Ping]], Awaitable[list[PingVerdict]]]


# Batches of one zone in flight at once: enough to overlap the Ray and PostgreSQL round
# trips, no more than the zone actor's ping connections (actors/zone.py PING_POOL_SIZE).
MAX_IN_FLIGHT = 3


class _ZoneQueue:
    def __init__(self) -> None:
        self.items: list[tuple[Ping, asyncio.Future[PingVerdict]]] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.in_flight: set[asyncio.Task[None]] = set()


class PingBatcher:
    """One flusher per zone with at most `max_in_flight` calls in flight.

    A ping's future resolves only after its batch is committed to PostgreSQL, so a 204
    means "persisted"; a failed batch fails each of its pings with the same error.
    """

    def __init__(
        self, flush: Flush, *, interval_s: float, max_batch: int, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self._flush = flush
        self._max_in_flight = max_in_flight
        self._interval_s = interval_s
        self._max_batch = max_batch
        self._zones: dict[str, _ZoneQueue] = {}
        self._closed = False

    async def submit(self, zone_id: str, ping: Ping) -> PingVerdict:
        return (await self.submit_many(zone_id, [ping]))[0]

    async def submit_many(self, zone_id: str, pings: Sequence[Ping]) -> list[PingVerdict]:
        if self._closed:
            raise RuntimeError("ping batcher closed")
        queue = self._zones.get(zone_id)
        if queue is None:
            queue = self._zones[zone_id] = _ZoneQueue()
            queue.task = asyncio.create_task(self._run(zone_id, queue), name=f"pings:{zone_id}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in pings]
        queue.items.extend(zip(pings, futures, strict=True))
        queue.wakeup.set()
        return list(await asyncio.gather(*futures))

    async def _run(self, zone_id: str, queue: _ZoneQueue) -> None:
        while True:
            await queue.wakeup.wait()
            queue.wakeup.clear()
            # Batches form by themselves while a call is in flight; an extra wait only
            # helps when calls are cheap and arrivals sparse (interval 0 by default).
            if self._interval_s > 0:
                await asyncio.sleep(self._interval_s)
            while queue.items:
                if len(queue.in_flight) >= self._max_in_flight:
                    # Pings arriving meanwhile join the next, larger batch.
                    await asyncio.wait(queue.in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch, queue.items = queue.items[: self._max_batch], queue.items[self._max_batch :]
                task = asyncio.create_task(self._send(zone_id, batch))
                queue.in_flight.add(task)
                task.add_done_callback(queue.in_flight.discard)

    async def _send(self, zone_id: str, batch: list[tuple[Ping, asyncio.Future[PingVerdict]]]) -> None:
        try:
            verdicts = await self._flush(zone_id, [p for p, _ in batch])
        except (Exception, asyncio.CancelledError) as exc:
            failure = exc if isinstance(exc, Exception) else RuntimeError("shutting down")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, fut), verdict in zip(batch, verdicts, strict=True):
            if not fut.done():
                fut.set_result(verdict)

    async def close(self) -> None:
        self._closed = True
        for queue in self._zones.values():
            for task in [queue.task, *queue.in_flight]:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            for _, fut in queue.items:
                if not fut.done():
                    fut.set_exception(RuntimeError("shutting down"))
