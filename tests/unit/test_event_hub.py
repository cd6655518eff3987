"""EventHub without a database: who wins when two sockets of one driver open at once."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiohttp import web
from prometheus_client import CollectorRegistry

from dispatcher.api.event_hub import CLOSE_REPLACED, EventHub
from dispatcher.api.stream_metrics import StreamMetrics
from dispatcher.store.driver_events import DriverEventStore, LogPosition


class FakeSocket:
    def __init__(self) -> None:
        self.closed_with: int | None = None
        self.sent: list[str] = []

    async def close(self, *, code: int, message: bytes, drain: bool) -> bool:
        self.closed_with = code
        return True

    async def send_str(self, data: str) -> None:
        self.sent.append(data)


class FakeStore:
    """Hands out generations when told to, so a test decides the interleaving."""

    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[int]] = {}

    async def claim_socket(self, driver_id: str) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pending[len(self.pending)] = future
        return await future

    async def after(self, cursors: Any) -> list[Any]:
        return []


def make_hub() -> tuple[EventHub, FakeStore]:
    store = FakeStore()
    hub = EventHub(
        cast(DriverEventStore, store),
        StreamMetrics(CollectorRegistry()),
        catch_up_interval_s=60,
        retention_s=3600,
        prune_interval_s=3600,
    )
    return hub, store


async def test_a_later_registration_of_an_older_generation_loses() -> None:
    hub, store = make_hub()
    a, b = FakeSocket(), FakeSocket()
    position = LogPosition(0, None)
    opening_a = asyncio.create_task(
        hub.open("drv_1", cast(web.WebSocketResponse, a), None, position)
    )
    opening_b = asyncio.create_task(
        hub.open("drv_1", cast(web.WebSocketResponse, b), None, position)
    )
    await asyncio.sleep(0)
    # B gets the newer generation and registers first; A (older) registers after it.
    store.pending[1].set_result(6)
    sub_b = await opening_b
    store.pending[0].set_result(5)
    sub_a = await opening_a
    await asyncio.sleep(0.01)
    assert hub.sockets["drv_1"] is sub_b and sub_a.closing
    assert a.closed_with == CLOSE_REPLACED and b.closed_with is None
    hub.release(sub_b)


async def test_a_wake_up_from_another_replica_beats_the_registration() -> None:
    hub, store = make_hub()
    mine = FakeSocket()
    opening = asyncio.create_task(
        hub.open("drv_1", cast(web.WebSocketResponse, mine), None, LogPosition(0, None))
    )
    await asyncio.sleep(0)
    hub.on_socket(
        "drv_1 9"
    )  # another replica's newer socket, heard before ours registered
    store.pending[0].set_result(8)
    sub = await opening
    await asyncio.sleep(0.01)
    assert (
        "drv_1" not in hub.sockets
        and sub.closing
        and mine.closed_with == CLOSE_REPLACED
    )


async def test_a_newer_socket_elsewhere_closes_ours() -> None:
    hub, store = make_hub()
    mine = FakeSocket()
    opening = asyncio.create_task(
        hub.open("drv_1", cast(web.WebSocketResponse, mine), None, LogPosition(0, None))
    )
    await asyncio.sleep(0)
    store.pending[0].set_result(3)
    sub = await opening
    hub.on_socket("drv_1 3")  # our own wake-up: nothing happens
    assert hub.sockets["drv_1"] is sub
    hub.on_socket("drv_1 4")
    await asyncio.sleep(0.01)
    assert "drv_1" not in hub.sockets and mine.closed_with == CLOSE_REPLACED
