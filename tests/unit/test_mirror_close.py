"""Closing the mirror's Redis client never fails the caller (a zone handing over)."""

from __future__ import annotations

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.store.geo import GeoMirror


class SlowToClose:
    """redis-py past its connect timeout while closing, as in a CPU-starved zone process."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        RedisTimeoutError("Timed out closing connection after 0.5"),
        TimeoutError(),
        ConnectionResetError(),
    ],
)
async def test_a_slow_or_broken_close_is_logged_not_raised(error: Exception) -> None:
    client = SlowToClose(error)
    await GeoMirror(client, 0.5).aclose()  # type: ignore[arg-type]
    assert client.closed


async def test_a_bug_while_closing_still_raises() -> None:
    client = SlowToClose(RuntimeError("not a socket problem"))
    with pytest.raises(RuntimeError):
        await GeoMirror(client, 0.5).aclose()  # type: ignore[arg-type]
