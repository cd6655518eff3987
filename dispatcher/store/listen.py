"""Listener: one pooled connection LISTENing on PostgreSQL channels, re-established after losses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dispatcher.backoff import BACKOFF_MAX_S, Backoff

log = logging.getLogger(__name__)

# A silently dropped TCP connection never fires a close event: probe the idle link.
LISTEN_PROBE_S: Final = 30.0

OnNotify = Callable[[str], None]


class Listener:
    """Calls `channels[name](payload)` for each NOTIFY, for as long as it runs.

    Notifications sent while no connection listens are lost, so `on_listening` runs
    each time listening (re)starts: the owner catches up by other means there.
    `on_lost` runs as soon as the connection is lost or cannot be had: the moment a
    stopped or crashed PostgreSQL closes it, without waiting for a query to fail.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        channels: Mapping[str, OnNotify],
        *,
        pg_timeout_s: float,
        on_listening: Callable[[], None] = lambda: None,
        on_lost: Callable[[], None] = lambda: None,
        max_backoff_s: float = BACKOFF_MAX_S,
    ) -> None:
        self._pool = pool
        self._channels = dict(channels)
        self._pg_timeout_s = pg_timeout_s
        self._on_listening = on_listening
        self._on_lost = on_lost
        self._max_backoff_s = max_backoff_s

    def _callback(self, on_notify: OnNotify) -> Callable[[Any, int, str, object], None]:
        def callback(conn: Any, pid: int, channel: str, payload: object) -> None:
            on_notify(str(payload))

        return callback

    async def run_forever(self) -> None:
        # PostgreSQL outages: retry soon, then back off to a gentle rate while it stays down.
        backoff = Backoff(max_s=self._max_backoff_s)
        while True:
            started = time.monotonic()
            try:
                await self._listen_once()
            except Exception as exc:
                self._on_lost()
                log.warning(
                    "LISTEN %s lost (%s: %s)",
                    ", ".join(self._channels),
                    type(exc).__name__,
                    exc,
                )
            if time.monotonic() - started > LISTEN_PROBE_S:
                backoff.reset()  # it worked for a while: a fresh outage
            await asyncio.sleep(backoff.next_delay())

    async def _listen_once(self) -> None:
        """Hold one pooled connection LISTENing until it breaks."""
        callbacks = {name: self._callback(fn) for name, fn in self._channels.items()}
        async with self._pool.acquire(timeout=self._pg_timeout_s) as conn:
            lost = asyncio.Event()

            def on_lost(_: object) -> None:
                lost.set()
                self._on_lost()

            conn.add_termination_listener(on_lost)
            try:
                async with asyncio.timeout(self._pg_timeout_s):
                    for name, callback in callbacks.items():
                        await conn.add_listener(name, callback)
                self._on_listening()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(LISTEN_PROBE_S):
                            await lost.wait()
                    if not lost.is_set():
                        await conn.execute("SELECT 1", timeout=self._pg_timeout_s)
                raise ConnectionError("listen connection closed")
            finally:
                await self._unlisten(conn, on_lost, callbacks)

    async def _unlisten(
        self,
        conn: PoolConnectionProxy,
        on_lost: Callable[[object], None],
        callbacks: Mapping[str, Callable[[Any, int, str, object], None]],
    ) -> None:
        """Leave the connection fit for the pool, whatever state it is in."""
        try:
            conn.remove_termination_listener(on_lost)
            async with asyncio.timeout(self._pg_timeout_s):
                for name, callback in callbacks.items():
                    await conn.remove_listener(name, callback)
        except asyncpg.InterfaceError:
            # It broke, so the pool has already taken it back: nothing left to undo.
            return
        except Exception:
            # Unusable connection: drop it rather than return it to the pool.
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
