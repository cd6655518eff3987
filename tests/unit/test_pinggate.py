"""PingGate: verdicts before the write, from a cache that PostgreSQL's verdicts correct."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from dispatcher.actors.messages import Ping, PingVerdict
from dispatcher.actors.pinggate import LastFix, PingGate, judge_fix

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
BERLIN = (52.52, 13.405)


def fix(driver: str, north_km: float, at: datetime) -> Ping:
    return Ping(driver, BERLIN[0] + north_km / 111.195, BERLIN[1], at)


class Store:
    """PostgreSQL's answer to the gate's reads, and how often it was asked."""

    def __init__(self, rows: dict[str, LastFix]) -> None:
        self.rows = rows
        self.reads: list[list[str]] = []

    async def __call__(self, driver_ids: Sequence[str]) -> dict[str, LastFix]:
        self.reads.append(list(driver_ids))
        return {d: self.rows[d] for d in driver_ids if d in self.rows}


def test_judge_fix_is_the_ping_statement_rule() -> None:
    last = LastFix(True, *BERLIN, T0)
    assert judge_fix(None, fix("d", 0, T0), 250) is PingVerdict.UNKNOWN_DRIVER
    assert (
        judge_fix(LastFix(False, None, None, None), fix("d", 0, T0), 250)
        is PingVerdict.INACTIVE
    )
    assert judge_fix(last, fix("d", 0.05, T0), 250) is PingVerdict.STALE
    assert (
        judge_fix(last, fix("d", 0.15, T0 + timedelta(seconds=1)), 250)
        is PingVerdict.ACCEPTED
    )  # jitter
    assert (
        judge_fix(last, fix("d", 1.0, T0 + timedelta(seconds=5)), 250)
        is PingVerdict.TOO_FAST
    )
    assert (
        judge_fix(last, fix("d", 0.3, T0 + timedelta(seconds=5)), 250)
        is PingVerdict.ACCEPTED
    )


async def test_a_burst_is_judged_fix_after_fix_with_one_read() -> None:
    store = Store({"d": LastFix(True, *BERLIN, T0)})
    gate = PingGate(store, max_speed_kmh=250)
    burst = [
        fix("d", 0.3, T0 + timedelta(seconds=5)),  # accepted: 216 km/h
        fix("d", 0.0, T0 + timedelta(seconds=3)),  # older than the one just accepted
        fix("d", 5.0, T0 + timedelta(seconds=6)),  # 4.7 km in 1 s
        fix("x", 0.0, T0),  # nobody
    ]
    assert await gate.judge(burst) == [
        PingVerdict.ACCEPTED,
        PingVerdict.STALE,
        PingVerdict.TOO_FAST,
        PingVerdict.UNKNOWN_DRIVER,
    ]
    assert store.reads == [["d", "x"]]
    assert await gate.judge([fix("d", 0.4, T0 + timedelta(seconds=7))]) == [
        PingVerdict.ACCEPTED
    ]
    assert store.reads == [["d", "x"]]  # cached
    await gate.judge([fix("x", 0.0, T0)])
    assert store.reads[-1] == [
        "x"
    ]  # unknown drivers are asked again: one may be created


async def test_postgres_verdicts_correct_the_cache() -> None:
    store = Store({"d": LastFix(True, *BERLIN, T0), "e": LastFix(True, *BERLIN, T0)})
    gate = PingGate(store, max_speed_kmh=250)
    first = [
        fix("d", 0.1, T0 + timedelta(seconds=1)),
        fix("e", 0.1, T0 + timedelta(seconds=1)),
    ]
    assert await gate.judge(first) == [PingVerdict.ACCEPTED] * 2
    # Deactivated through another replica; another replica wrote a newer fix of e.
    gate.applied(first, [PingVerdict.INACTIVE, PingVerdict.STALE])
    store.rows["e"] = LastFix(
        True, BERLIN[0] + 0.01, BERLIN[1], T0 + timedelta(seconds=30)
    )
    later = [
        fix("d", 0.2, T0 + timedelta(seconds=2)),
        fix("e", 0.2, T0 + timedelta(seconds=2)),
    ]
    assert await gate.judge(later) == [PingVerdict.INACTIVE, PingVerdict.STALE]
    assert store.reads[-1] == ["e"]


async def test_entries_expire_and_forget_rereads() -> None:
    now = [0.0]
    store = Store({"d": LastFix(True, *BERLIN, T0)})
    gate = PingGate(store, max_speed_kmh=250, ttl_s=10, clock=lambda: now[0])
    await gate.judge([fix("d", 0.0, T0 + timedelta(seconds=1))])
    now[0] = 5.0
    await gate.judge([fix("d", 0.0, T0 + timedelta(seconds=2))])
    assert len(store.reads) == 1
    now[0] = 20.0
    await gate.judge([fix("d", 0.0, T0 + timedelta(seconds=3))])
    assert len(store.reads) == 2
    store.rows["d"] = LastFix(False, *BERLIN, T0)
    gate.forget("d")
    assert await gate.judge([fix("d", 0.0, T0 + timedelta(seconds=4))]) == [
        PingVerdict.INACTIVE
    ]
