"""OrderBatcher: the orders waiting for one zone go in one actor call, one call in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from dispatcher.actors.messages import AssignRequest, AssignResult

AssignMany = Callable[[str, Sequence[AssignRequest]], Awaitable[list[AssignResult]]]


@dataclass(slots=True)
class _Zone:
    waiting: list[tuple[AssignRequest, asyncio.Future[AssignResult]]] = field(
        default_factory=list
    )
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class OrderBatcher:
    """Orders for one zone that arrive while its call is in flight form the next call.

    A lone order is sent at once (no wait is added); under load, one Ray call (about
    2 ms of CPU here, LESSONS.md) carries every order that queued meanwhile. The zone
    books them one after the other, as before. A failed call fails each of its orders
    with the same error; retrying any of them is safe (idempotent by sellerOrderId).
    """

    def __init__(self, assign_many: AssignMany, *, max_batch: int) -> None:
        self._assign_many = assign_many
        self._max_batch = max_batch
        self._zones: dict[str, _Zone] = {}
        self._closed = False

    async def assign(self, zone_id: str, req: AssignRequest) -> AssignResult:
        if self._closed:
            raise RuntimeError("order batcher closed")
        zone = self._zones.get(zone_id)
        if zone is None:
            zone = self._zones[zone_id] = _Zone()
            zone.task = asyncio.create_task(
                self._run(zone_id, zone), name=f"orders:{zone_id}"
            )
        future: asyncio.Future[AssignResult] = (
            asyncio.get_running_loop().create_future()
        )
        zone.waiting.append((req, future))
        zone.wakeup.set()
        return await future

    async def _run(self, zone_id: str, zone: _Zone) -> None:
        while True:
            await zone.wakeup.wait()
            zone.wakeup.clear()
            while zone.waiting:
                batch, zone.waiting = (
                    zone.waiting[: self._max_batch],
                    zone.waiting[self._max_batch :],
                )
                await self._send(zone_id, batch)

    async def _send(
        self,
        zone_id: str,
        batch: list[tuple[AssignRequest, asyncio.Future[AssignResult]]],
    ) -> None:
        # Orders whose client gave up are not booked.
        batch = [(req, fut) for req, fut in batch if not fut.done()]
        if not batch:
            return
        try:
            results = await self._assign_many(zone_id, [req for req, _ in batch])
        except (Exception, asyncio.CancelledError) as exc:
            failure = (
                exc if isinstance(exc, Exception) else RuntimeError("shutting down")
            )
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def close(self) -> None:
        self._closed = True
        for zone in self._zones.values():
            if zone.task is not None:
                zone.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await zone.task
            for _, fut in zone.waiting:
                if not fut.done():
                    fut.set_exception(RuntimeError("shutting down"))
