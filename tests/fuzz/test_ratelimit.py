"""The per-driver token bucket: never more than burst + rate x time, memory bounded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dispatcher.api.ratelimit import TokenBuckets, retry_after_s

PROPERTY = settings(max_examples=200, derandomize=True, database=None, deadline=None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


events = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.floats(min_value=0.0, max_value=3.0)),
    min_size=1,
    max_size=120,
)


@PROPERTY
@given(
    rate=st.floats(min_value=0.1, max_value=50.0),
    burst=st.integers(min_value=1, max_value=30),
    steps=events,
    max_buckets=st.integers(min_value=8, max_value=20),
)
def test_grants_in_any_window_stay_within_burst_plus_rate(
    rate: float, burst: int, steps: list[tuple[str, float]], max_buckets: int
) -> None:
    clock = Clock()
    buckets = TokenBuckets(rate, burst, max_buckets=max_buckets, clock=clock)
    granted: dict[str, list[float]] = {}
    for key, dt in steps:
        clock.now += dt
        wait = buckets.take(key)
        assert wait >= 0.0
        if wait == 0.0:
            granted.setdefault(key, []).append(clock.now)
        else:
            assert wait <= 1.0 / rate + 1e-9
        assert len(buckets) <= max_buckets
    for times in granted.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= burst + rate * (times[j] - start) + 1e-6


@PROPERTY
@given(
    rate=st.floats(min_value=0.1, max_value=50.0),
    burst=st.integers(min_value=1, max_value=30),
)
def test_a_refused_take_succeeds_once_its_wait_is_over(rate: float, burst: int) -> None:
    clock = Clock()
    buckets = TokenBuckets(rate, burst, clock=clock)
    for _ in range(burst):
        assert buckets.take("d") == 0.0
    wait = buckets.take("d")
    assert wait > 0.0
    assert retry_after_s(wait) >= wait and retry_after_s(wait) >= 1
    clock.now += wait + 1e-9
    assert buckets.take("d") == 0.0


def test_idle_buckets_are_dropped_and_the_cap_holds() -> None:
    clock = Clock()
    buckets = TokenBuckets(10.0, 20, max_buckets=100, clock=clock)
    for n in range(1000):
        buckets.take(f"drv_{n}")
    assert len(buckets) == 100  # the cap: least recently used first
    clock.now += 2.0  # burst / rate: every bucket is full again, as good as absent
    buckets.take("drv_new")
    assert len(buckets) == 1


def test_an_evicted_bucket_comes_back_full_and_a_full_one_is_never_lost_early() -> None:
    clock = Clock()
    buckets = TokenBuckets(1.0, 2, max_buckets=10, clock=clock)
    assert buckets.take("a") == 0.0 and buckets.take("a") == 0.0
    assert buckets.take("a") > 0.0
    clock.now += 1.0  # a is not full yet (1 of 2): kept, so its debt is remembered
    buckets.take("b")
    assert len(buckets) == 2
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0.0


def test_long_keys_share_nothing_and_stay_small() -> None:
    clock = Clock()
    buckets = TokenBuckets(1.0, 1, clock=clock)
    long_a, long_b = "a" * 10_000, "a" * 9_999 + "b"
    assert buckets.take(long_a) == 0.0
    assert buckets.take(long_a) > 0.0
    assert buckets.take(long_b) == 0.0
    assert len(buckets) == 2
    assert all(len(key) <= 64 for key in buckets._buckets)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 20), (10.0, 0), (0.0, 0)])
def test_zero_turns_it_off(rate: float, burst: int) -> None:
    buckets = TokenBuckets(rate, burst)
    assert not buckets.enabled
    assert all(buckets.take("d") == 0.0 for _ in range(1000))
    assert len(buckets) == 0


@pytest.mark.parametrize(
    ("rate", "burst", "cap"),
    [
        (-1.0, 1, 10),
        (float("nan"), 1, 10),
        (float("inf"), 1, 10),
        (1.0, -1, 10),
        (1.0, 1, 0),
    ],
)
def test_nonsense_settings_are_refused(rate: float, burst: int, cap: int) -> None:
    with pytest.raises(ValueError):
        TokenBuckets(rate, burst, max_buckets=cap)
