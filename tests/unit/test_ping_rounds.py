"""Pure helpers of ZoneCore: ping rounds (oldest fix first) and widening search steps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dispatcher.actors.core import _rounds
from dispatcher.actors.messages import Ping

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def fix(driver: str, seconds: int) -> Ping:
    return Ping(
        driver_id=driver, lat=1.0, lon=2.0, recorded_at=T0 + timedelta(seconds=seconds)
    )


def test_one_fix_per_driver_is_one_round() -> None:
    assert _rounds([fix("a", 1), fix("b", 2), fix("c", 0)]) == [[2, 0, 1]]


def test_a_drivers_fixes_go_oldest_first_one_per_round() -> None:
    pings = [fix("a", 30), fix("b", 5), fix("a", 10), fix("a", 20)]
    rounds = _rounds(pings)
    assert rounds == [[1, 2], [3], [0]]
    for round_ in rounds:
        drivers = [pings[i].driver_id for i in round_]
        assert len(drivers) == len(set(drivers))


def test_empty_batch_has_no_round() -> None:
    assert _rounds([]) == []


def test_search_steps_widen_up_to_the_radius() -> None:
    from dispatcher.actors.core import search_steps

    assert search_steps(5.0) == [0.1, 0.25, 0.5, 1.0, 2.0, 5.0]
    assert search_steps(1.5) == [0.1, 0.25, 0.5, 1.0, 1.5]
    assert search_steps(0.3) == [0.1, 0.25, 0.3]
    assert search_steps(0.05) == [0.05]
