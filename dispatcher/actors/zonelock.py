"""ZoneLock: pings share a zone; assignment, refresh and mirror rebuilds take it alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ZoneLock:
    """A shared/exclusive asyncio lock with writer preference.

    Ping batches are safe to run side by side (PostgreSQL row locks and recordedAt
    order fixes; the mirror script orders Redis writes), so they share the lock.
    Assignment must be serialized per zone, and a rebuild must not interleave with
    writes it did not read, so those hold it exclusively. A waiting exclusive holder
    blocks new shared ones, so a steady stream of pings cannot starve assignment.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @property
    def shared_holders(self) -> int:
        return self._shared

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(
                lambda: not self._exclusive and self._exclusive_waiting == 0
            )
            self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._exclusive_waiting += 1
            try:
                await self._cond.wait_for(
                    lambda: not self._exclusive and self._shared == 0
                )
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._cond:
                self._exclusive = False
                self._cond.notify_all()
