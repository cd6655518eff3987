"""Driver event stream test clients: sockets that record every message and its arrival."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from tests.support import Driver


def events_path(driver_id: str, after: int | None = None) -> str:
    return f"/drivers/{driver_id}/events" + ("" if after is None else f"?after={after}")


@dataclass
class Watcher:
    """One driver's socket, read by its own task; `messages` keeps every JSON message."""

    driver_id: str
    ws: aiohttp.ClientWebSocketResponse
    messages: list[dict[str, Any]] = field(default_factory=list)
    # Seconds from the event's `at` (its row's write, just before the commit) to arrival.
    latencies: list[float] = field(default_factory=list)
    close_code: int | None = None
    task: asyncio.Task[None] | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> Watcher:
        self.task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                body = json.loads(msg.data)
                if "at" in body:
                    at = datetime.fromisoformat(body["at"])
                    self.latencies.append((datetime.now(UTC) - at).total_seconds())
                self.messages.append(body)
                self._arrived.set()
        self.close_code = self.ws.close_code
        self._arrived.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "seq" in m]

    @property
    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.events]

    @property
    def closed(self) -> bool:
        return self.task is not None and self.task.done()

    async def wait_for(
        self, predicate: Callable[[Watcher], bool], *, within_s: float = 15.0
    ) -> None:
        deadline = time.monotonic() + within_s
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"driver {self.driver_id}: condition not met in {within_s} s; "
                    f"got {self.messages[-5:]}, close {self.close_code}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.2))

    async def close(self) -> None:
        await self.ws.close()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task


async def watch(
    session: aiohttp.ClientSession,
    base_url: str,
    driver: Driver,
    *,
    after: int | None = None,
    headers: dict[str, str] | None = None,
) -> Watcher:
    """Open the driver's stream with its own token and start reading it."""
    ws = await session.ws_connect(
        base_url + events_path(driver.driver_id, after),
        headers=driver.auth if headers is None else headers,
        autoping=True,
    )
    return Watcher(driver.driver_id, ws).start()


async def wait_all(
    watchers: Sequence[Watcher],
    predicate: Callable[[Watcher], bool],
    *,
    within_s: float,
) -> None:
    await asyncio.gather(*(w.wait_for(predicate, within_s=within_s) for w in watchers))


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds (for printing)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def connector_session() -> aiohttp.ClientSession:
    """One session for many sockets: no connection limit, no compression offered."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


@dataclass
class Follower:
    """A driver app that stays connected: on any close it reconnects to the next replica
    with `after` = the last seq it processed, as a real client should."""

    session: aiohttp.ClientSession
    base_urls: Sequence[str]
    driver: Driver
    messages: list[dict[str, Any]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    connects: int = 0
    task: asyncio.Task[None] | None = None
    _stop: bool = False

    @property
    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages if "seq" in m]

    def start(self) -> Follower:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        turn = 0
        while not self._stop:
            url = self.base_urls[turn % len(self.base_urls)]
            after = self.seqs[-1] if self.seqs else 0
            try:
                ws = await self.session.ws_connect(
                    url + events_path(self.driver.driver_id, after),
                    headers=self.driver.auth,
                )
            except (aiohttp.ClientError, OSError):
                turn += 1
                await asyncio.sleep(0.1)
                continue
            self.connects += 1
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(msg.data))
            self.close_codes.append(ws.close_code)
            turn += 1

    async def stop(self) -> None:
        self._stop = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
