"""Bench statistics: percentiles, medians, ratios and the run record."""

from __future__ import annotations

import math

import pytest

from dispatcher.bench.stats import RunResult, latency_summary, median, percentile, ratio


def test_percentile_interpolates_linearly_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 99) == pytest.approx(3.97)


def test_percentile_ignores_input_order_and_handles_one_value() -> None:
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_median_skips_nan() -> None:
    assert median([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(median([math.nan]))


def test_ratio_needs_a_positive_reference() -> None:
    assert ratio(50.0, 100.0) == 0.5
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(math.nan, 1.0) is None


def test_latency_summary_in_milliseconds() -> None:
    p50, p99, worst = latency_summary([0.001] * 99 + [0.1])
    assert p50 == pytest.approx(1.0)
    assert worst == pytest.approx(100.0)
    assert 1.0 < p99 <= 100.0
    assert all(math.isnan(x) for x in latency_summary([]))


def test_run_result_round_trips_and_derives_throughput() -> None:
    result = RunResult(
        "wrk",
        ok=500,
        errors=2,
        duration_s=2.0,
        p50_ms=1.0,
        p99_ms=3.0,
        max_ms=9.0,
        status_counts={"204": 500},
    )
    again = RunResult.from_json({**result.to_json(), "unknown": 1})
    assert again == result
    assert again.throughput == 250.0
    assert RunResult("x", 1, 0, 0.0, 1, 1, 1).throughput == 0.0
