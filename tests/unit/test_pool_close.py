"""Closing a PostgreSQL pool never fails the caller (a zone handing over) on a slow close."""

from __future__ import annotations

import asyncpg
import pytest

from dispatcher.store.pg import close_pool


class SlowToClose:
    """asyncpg past its command timeout while closing, as in a CPU-starved zone process
    (asyncpg terminates the pool's connections, then raises)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        raise self.error


@pytest.mark.parametrize(
    "error",
    [TimeoutError(), ConnectionResetError(), asyncpg.InterfaceError("closed")],
)
async def test_a_slow_or_broken_close_is_logged_not_raised(error: Exception) -> None:
    pool = SlowToClose(error)
    await close_pool(pool)  # type: ignore[arg-type]
    assert pool.closed


async def test_a_bug_while_closing_still_raises() -> None:
    pool = SlowToClose(RuntimeError("not a connection problem"))
    with pytest.raises(RuntimeError):
        await close_pool(pool)  # type: ignore[arg-type]
