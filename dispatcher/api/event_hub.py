"""EventHub: this replica's driver sockets, fed from the driver event log in seq order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import WSCloseCode, web

from dispatcher.api.stream_metrics import StreamMetrics
from dispatcher.store.driver_events import (
    EVENTS_CHANNEL,
    SOCKETS_CHANNEL,
    DriverEvent,
    DriverEventStore,
    LogPosition,
)

log = logging.getLogger(__name__)

# A socket holds at most this many messages not yet written; one that falls this far
# behind because its client does not read is closed with 1013 and resumes with `after`.
QUEUE_MAX: Final = 64
# Close codes of the stream (1000-range ones are RFC 6455's).
CLOSE_REPLACED: Final = 4001
CLOSE_TRY_AGAIN: Final = int(WSCloseCode.TRY_AGAIN_LATER)  # 1013
CLOSE_GOING_AWAY: Final = int(WSCloseCode.GOING_AWAY)  # 1001
# Writing the close frame to a client that does not read can block: give up on the
# handshake after this and let the transport go.
CLOSE_TIMEOUT_S: Final = 2.0
# After a failed read (PostgreSQL away), wait before trying again; the catch-up
# covers everything in between.
READ_RETRY_S: Final = 0.5
RESYNC: Final = '{"type":"resync"}'
# Bound on the remembered generations (~100 bytes each).
GENERATIONS_MAX: Final = 100_000


@dataclass(eq=False)
class Subscriber:
    """One open socket: its place in the driver's log and its own writer.

    `cursor` is the last seq queued (or sent); only the hub's one reader task moves it,
    so each event is queued once, in order. `known` is the highest seq known to exist.
    """

    driver_id: str
    generation: int
    ws: web.WebSocketResponse
    cursor: int
    # Events after this seq were committed while the socket was open: they are "live"
    # and their commit-to-send latency is measured.
    live_after: int
    known: int = 0
    queue: deque[tuple[str, datetime | None]] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # True only while the writer waits for the transport to drain: a client not reading.
    in_send: bool = False
    closing: bool = False
    writer: asyncio.Task[None] | None = None

    @property
    def room(self) -> int:
        return QUEUE_MAX - len(self.queue)


class EventHub:
    """Holds this replica's sockets (one per driver) and pushes their events.

    Wake-ups (NOTIFY `driverId seq`, delivered at commit) mark sockets dirty; one
    reader task reads, for all dirty sockets at once, the rows after each cursor and
    queues them; each socket's own writer task sends them. The fan-out never awaits
    a socket, so a slow client delays nobody else. A periodic catch-up compares the
    cursors with the log's heads and covers lost wake-ups.
    """

    def __init__(
        self,
        store: DriverEventStore,
        metrics: StreamMetrics,
        *,
        catch_up_interval_s: float,
        retention_s: float,
        prune_interval_s: float,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.catch_up_interval_s = catch_up_interval_s
        self.retention_s = retention_s
        self.prune_interval_s = prune_interval_s
        self.sockets: dict[str, Subscriber] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[None]] = set()
        # Newest socket generation seen per driver (wake-ups may beat a registration).
        self._generations: dict[str, int] = {}
        metrics.connected.set_function(lambda: len(self.sockets))

    @property
    def channels(self) -> dict[str, Callable[[str], None]]:
        """The NOTIFY channels this hub needs on the replica's listener."""
        return {EVENTS_CHANNEL: self.on_event, SOCKETS_CHANNEL: self.on_socket}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="driver-events-read"),
            asyncio.create_task(self._catch_up_loop(), name="driver-events-catch-up"),
            asyncio.create_task(self._prune_loop(), name="driver-events-prune"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.close_all(CLOSE_GOING_AWAY, "server shutting down")

    async def close_all(self, code: int, reason: str) -> None:
        """Close every socket (shutdown: 1001); clients reconnect to another replica."""
        for sub in list(self.sockets.values()):
            self.close(sub, code, reason)
        if self._closers:
            await asyncio.gather(*list(self._closers), return_exceptions=True)

    # ---- sockets ----------------------------------------------------------------------

    async def open(
        self,
        driver_id: str,
        ws: web.WebSocketResponse,
        after: int | None,
        position: LogPosition,
    ) -> Subscriber:
        """Register a socket; it first gets the events after `after` (or resync).

        `position` was read before the client saw the upgrade: without `after`, the
        stream starts there, so no event committed after the handshake is missed.
        """
        generation = await self.store.claim_socket(driver_id)
        start = position.start_after(after)
        cursor = position.head if start is None else start
        sub = Subscriber(
            driver_id,
            generation,
            ws,
            cursor,
            live_after=position.head,
            known=position.head,
        )
        if start is None:
            sub.queue.append((RESYNC, None))
        else:
            self.metrics.replay.observe(position.head - start)
        older = self.sockets.get(driver_id)
        newest = max(
            self._generations.get(driver_id, 0),
            0 if older is None else older.generation,
        )
        if newest > generation:
            # A newer socket opened while this one took its generation (here, or on
            # another replica whose wake-up came first): this one is the older.
            self.close(sub, CLOSE_REPLACED, "a newer socket opened for this driver")
            return sub
        self._note_generation(driver_id, generation)
        if older is not None:
            self.close(older, CLOSE_REPLACED, "a newer socket opened for this driver")
        self.sockets[driver_id] = sub
        sub.writer = asyncio.create_task(
            self._write(sub), name=f"driver-events-write:{driver_id}"
        )
        self.mark(sub)
        return sub

    def release(self, sub: Subscriber) -> None:
        """Forget a socket whose handler ended (closed by either side)."""
        if self.sockets.get(sub.driver_id) is sub:
            del self.sockets[sub.driver_id]
        sub.closing = True
        if sub.writer is not None:
            sub.writer.cancel()

    def close(self, sub: Subscriber, code: int, reason: str) -> None:
        """Close a socket from outside its handler; never waits for the client."""
        if sub.closing:
            return
        self.metrics.count_close(code)
        self.release(sub)
        task = asyncio.create_task(
            self._close(sub, code, reason), name=f"driver-events-close:{sub.driver_id}"
        )
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _close(self, sub: Subscriber, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await sub.ws.close(code=code, message=reason.encode(), drain=False)

    # ---- wake-ups ---------------------------------------------------------------------

    def on_event(self, payload: str) -> None:
        """NOTIFY: `driverId seq` committed."""
        driver_id, _, seq = payload.partition(" ")
        sub = self.sockets.get(driver_id)
        if sub is None or not seq.isdigit():
            return
        sub.known = max(sub.known, int(seq))
        if sub.known > sub.cursor:
            self.mark(sub)

    def on_socket(self, payload: str) -> None:
        """NOTIFY: a socket for `driverId` opened with `generation`, here or elsewhere."""
        driver_id, _, text = payload.partition(" ")
        if not text.isdigit():
            return
        generation = int(text)
        self._note_generation(driver_id, generation)
        sub = self.sockets.get(driver_id)
        if sub is not None and sub.generation < generation:
            self.close(sub, CLOSE_REPLACED, "a newer socket opened for this driver")

    def _note_generation(self, driver_id: str, generation: int) -> None:
        if len(self._generations) >= GENERATIONS_MAX:
            # Only a socket opening in the same moment as another needs the entry.
            self._generations.clear()
        self._generations[driver_id] = max(
            generation, self._generations.get(driver_id, 0)
        )

    def wake_all(self) -> None:
        """Listening (re)started: wake-ups may have been missed; read for everyone."""
        for sub in self.sockets.values():
            self.mark(sub)

    def mark(self, sub: Subscriber) -> None:
        self._dirty.add(sub.driver_id)
        self._wake.set()

    # ---- the reader -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            dirty, self._dirty = self._dirty, set()
            subs = [
                s
                for d in dirty
                if (s := self.sockets.get(d)) is not None and not s.closing
            ]
            try:
                await self._read(subs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "reading driver events failed (%s: %s); retrying",
                    type(exc).__name__,
                    exc,
                )
                for sub in subs:
                    self.mark(sub)
                await asyncio.sleep(READ_RETRY_S)

    async def _read(self, subs: Iterable[Subscriber]) -> None:
        wanted: list[Subscriber] = []
        for sub in subs:
            if sub.room > 0:
                wanted.append(sub)
            elif sub.in_send and sub.known > sub.cursor:
                # A full queue behind a write that cannot drain: the client is not reading.
                self.close(sub, CLOSE_TRY_AGAIN, "too far behind; reconnect with after")
            # Else its writer is busy but moving: it marks the socket again when drained.
        if not wanted:
            return
        # Cursors and rooms are taken now; a wake-up during the read marks the socket again.
        events = await self.store.after(
            [(s.driver_id, s.cursor, s.room) for s in wanted]
        )
        for event in events:
            self._queue(event)

    def _queue(self, event: DriverEvent) -> None:
        sub = self.sockets.get(event.driver_id)
        # The socket may have been replaced or closed while the read ran; and only the
        # next seq goes in, so nothing is queued twice or out of order.
        if sub is None or sub.closing or event.seq != sub.cursor + 1:
            return
        sub.cursor = event.seq
        sub.known = max(sub.known, event.seq)
        sub.queue.append(
            (event.message(), event.at if event.seq > sub.live_after else None)
        )
        sub.ready.set()

    # ---- one writer per socket -----------------------------------------------------------

    async def _write(self, sub: Subscriber) -> None:
        try:
            while not sub.closing:
                if not sub.queue:
                    if sub.known > sub.cursor:
                        self.mark(sub)  # the queue was full when more events came
                    sub.ready.clear()
                    await sub.ready.wait()
                    continue
                message, at = sub.queue.popleft()
                sub.in_send = True
                await sub.ws.send_str(message)
                sub.in_send = False
                if at is not None:
                    self.metrics.push_latency.observe(
                        (datetime.now(UTC) - at).total_seconds()
                    )
        except (ConnectionError, RuntimeError) as exc:
            # The transport went away; the handler sees the close and releases it.
            log.debug("driver %s socket write failed: %s", sub.driver_id, exc)

    # ---- periodic work ----------------------------------------------------------------

    async def _catch_up_loop(self) -> None:
        while True:
            await asyncio.sleep(self.catch_up_interval_s)
            try:
                await self.catch_up()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "driver event catch-up failed (%s: %s)", type(exc).__name__, exc
                )

    async def catch_up(self) -> None:
        """One query for every socket here: mark those whose cursor is behind the log."""
        if not self.sockets:
            return
        heads = await self.store.heads(list(self.sockets))
        for driver_id, head in heads.items():
            sub = self.sockets.get(driver_id)
            if sub is not None and head > sub.cursor:
                sub.known = max(sub.known, head)
                self.mark(sub)

    async def _prune_loop(self) -> None:
        while True:
            try:
                started = time.monotonic()
                deleted = await self.store.prune(self.retention_s)
                if deleted:
                    log.info(
                        "pruned %d driver events in %.3f s",
                        deleted,
                        time.monotonic() - started,
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "driver event pruning failed (%s: %s)", type(exc).__name__, exc
                )
            await asyncio.sleep(self.prune_interval_s)


def describe(hub: EventHub) -> dict[str, Any]:
    """A snapshot for tests and debugging: per driver, cursor and queued messages."""
    return {
        d: {"cursor": s.cursor, "queued": len(s.queue), "inSend": s.in_send}
        for d, s in hub.sockets.items()
    }
