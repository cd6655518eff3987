"""Waiting for a condition in a test: bounded by the condition, with a generous ceiling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# How long a test waits for a condition before failing: a ceiling, not a budget. Waits
# end as soon as the condition holds; the ceiling only has to be far above what a
# machine three times slower with both cores busy needs (scripts/cpu_hog.sh).
WAIT_CEILING_S = 120.0


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    *,
    within_s: float = WAIT_CEILING_S,
    interval_s: float = 0.05,
    what: str = "condition",
) -> float:
    """Poll `predicate` until true; returns the seconds it took, fails past `within_s`."""
    started = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - started
        if time.monotonic() - started > within_s:
            raise AssertionError(f"{what} not reached within {within_s} s")
        await asyncio.sleep(interval_s)
