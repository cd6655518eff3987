"""The one backoff of the loops that wait out an outage (the outbox sender, LISTEN)."""

from __future__ import annotations

from typing import Final

BACKOFF_MIN_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0


class Backoff:
    """Delays between tries: doubling from `min_s`, never above `max_s`, and back to
    `min_s` after `reset()` (the thing worked: the next failure is a fresh outage)."""

    def __init__(
        self, min_s: float = BACKOFF_MIN_S, max_s: float = BACKOFF_MAX_S
    ) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self._next = min_s

    def next_delay(self) -> float:
        """The delay before the next try; the one after it doubles."""
        delay = min(self._next, self.max_s)
        self._next = min(self._next * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._next = self.min_s
