"""The one test webhook receiver: a real HTTP endpoint that verifies every request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook

from tests.support.waits import WAIT_CEILING_S

HOOK_PATH = "/hooks"
# An answer: a status, or a status with headers (Retry-After, Location).
Step = int | tuple[int, dict[str, str]]


@dataclass(frozen=True)
class Attempt:
    """One verified request: what came and what we answered (0 = held, never answered)."""

    webhook_id: str
    at: float
    status: int
    raw: bytes
    path: str = HOOK_PATH
    content_type: str = ""

    @cached_property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class WebhookReceiver:
    """A real webhook endpoint; every request is verified with the reference
    `standardwebhooks` library and every verified one is logged in `attempts`.

    What it answers: the statuses in `script` in turn, then `answer`. `hold()` makes
    requests hang until `release()`, as a stuck endpoint would; `delay_s` is think time
    per request. With a fixed `port` it can stop and start again on the same URL. Any
    path is served (a redirect target is logged with its path); `url` is the hook path.
    """

    secret: str
    port: int = 0
    script: list[Step] = field(default_factory=list)
    answer: Step = 204
    delay_s: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    rejected: int = 0
    holding: bool = False
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{HOOK_PATH}"

    @property
    def up(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def hold(self) -> None:
        self._release.clear()
        self.holding = True

    def release(self) -> None:
        self.holding = False
        self._release.set()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            Webhook(self.secret).verify(raw, dict(request.headers))
        except Exception:
            self.rejected += 1
            return web.Response(status=400)
        seen = Attempt(
            webhook_id=request.headers["webhook-id"],
            at=time.monotonic(),
            status=0,
            raw=raw,
            path=request.path,
            content_type=request.headers.get("content-type", ""),
        )
        if self.holding:
            self.attempts.append(seen)
            self._arrived.set()
            await self._release.wait()
            return web.Response(status=503)
        step = self.script.pop(0) if self.script else self.answer
        status, headers = step if isinstance(step, tuple) else (step, {})
        self.attempts.append(replace(seen, status=status))
        self._arrived.set()
        await asyncio.sleep(self.delay_s)
        return web.Response(status=status, headers=headers)

    # -- what arrived --------------------------------------------------------------------

    @property
    def received(self) -> list[Attempt]:
        """Every attempt we answered 2xx, in order (retries of one id included)."""
        return [a for a in self.attempts if a.ok]

    def hook_attempts(self) -> list[Attempt]:
        """Every attempt at the hook path (not at a redirect target)."""
        return [a for a in self.attempts if a.path == HOOK_PATH]

    def of_type(self, event_type: str) -> list[Attempt]:
        return [a for a in self.received if a.body["type"] == event_type]

    def for_order(self, seller_order_id: str) -> list[Attempt]:
        return [
            a
            for a in self.received
            if a.body["data"]["sellerOrderId"] == seller_order_id
        ]

    def delivered(self) -> Counter[str]:
        """webhook-id -> number of 2xx answers we gave it."""
        return Counter(a.webhook_id for a in self.received)

    def attempted_ids(self) -> set[str]:
        return {a.webhook_id for a in self.attempts}

    def times_of(self, webhook_id: str) -> list[Attempt]:
        return [a for a in self.attempts if a.webhook_id == webhook_id]

    def bodies(self) -> dict[str, dict[str, Any]]:
        """webhook-id -> parsed body of its delivered attempt."""
        return {a.webhook_id: a.body for a in self.received}

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = WAIT_CEILING_S,  # noqa: ASYNC109 - a deadline, not a cancellation scope
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"webhooks not received in {timeout}s: {len(self.received)} so far"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.2))
