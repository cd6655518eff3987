"""The one backoff of the outage loops: doubling, capped, reset by a success."""

from __future__ import annotations

from dispatcher.backoff import Backoff


def test_doubles_up_to_the_cap_then_resets() -> None:
    backoff = Backoff(min_s=0.5, max_s=3.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_a_cap_below_the_minimum_wins() -> None:
    backoff = Backoff(min_s=0.5, max_s=0.1)
    assert [backoff.next_delay() for _ in range(2)] == [0.1, 0.1]
