"""Live offer modes: each simulated driver listens on its event stream and answers offers.

A driver's phone holds `GET /drivers/{id}/events` open (docs/EVENTS.md). On `offer.created`
the driver decides with the offer handler (acceptance falling with pickup distance, a
response time, some drivers who never answer), waits its response time on the simulated
clock, then calls `accept` or `decline`. What an accept books is the runner's to deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp

from dispatcher.simulate.driver import DriverAgent, OfferHandler

# A dropped stream is opened again after this long (wall seconds), from the last seq seen.
RECONNECT_S = 1.0


class Account(Protocol):
    agent: DriverAgent
    service_id: str

    @property
    def auth(self) -> dict[str, str]: ...


# (account, offer data, accepted?) -> called once the service answered the driver's tap.
Answered = Callable[[Any, dict[str, Any], bool], Awaitable[None]]


class OfferPlayer:
    """The event streams of a fleet and the answers its drivers give."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        handler: OfferHandler,
        seed: int,
        *,
        sleep_until: Callable[[float], Awaitable[None]],
        now: Callable[[], float],
        answer: Answered,
        offered: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.session = session
        self.handler = handler
        self.seed = seed
        self.sleep_until = sleep_until
        self.now = now
        self.answer = answer
        self.offered = offered
        self.tasks: set[asyncio.Task[None]] = set()
        self.received: dict[str, int] = {}
        self.unanswered = 0
        self.stream_errors = 0
        self._stopped = False

    def listen(self, account: Account) -> None:
        self._spawn(self._listen(account))

    async def stop(self) -> None:
        self._stopped = True
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _listen(self, account: Account) -> None:
        # after=0: every event of this (new) driver, even one written before the socket opened.
        after = 0
        while not self._stopped:
            try:
                async with self.session.ws_connect(
                    f"/drivers/{account.service_id}/events",
                    params={"after": str(after)},
                    headers=account.auth,
                ) as ws:
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        event = json.loads(msg.data)
                        if "seq" in event:
                            after = int(event["seq"])
                        self._on_event(account, event)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                self.stream_errors += 1
            if not self._stopped:
                await asyncio.sleep(RECONNECT_S)

    def _on_event(self, account: Account, event: dict[str, Any]) -> None:
        kind = str(event.get("type"))
        self.received[kind] = self.received.get(kind, 0) + 1
        if kind == "offer.created":
            if self.offered is not None:
                self.offered(event["data"])
            self._spawn(self._consider(account, event["data"], int(event["seq"])))

    async def _consider(
        self, account: Account, offer: dict[str, Any], seq: int
    ) -> None:
        rng = random.Random(f"answers:{self.seed}:{account.agent.driver_id}:{seq}")
        said = self.handler.answer(account.agent, float(offer["distanceKm"]), rng)
        if said.accept is None:
            self.unanswered += 1
            return
        await self.sleep_until(self.now() + said.after_s)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await self.answer(account, offer, said.accept)
