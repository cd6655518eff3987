"""The quick suite first, and the long tests only while a time budget lasts.

CI must end within 30 minutes, on a box whose speed varies by a third from day to day.
The quick suite (the README's `pytest`) always runs, first. The tests it deselects (the
markers below) run after it, the bench smoke runs last; when `DISPATCHER_TESTS_START_BEFORE`
(Unix seconds) is set, none of them starts after that moment: each is skipped with the
reason, so the summary lists what a slow day left out. A test that fails still fails the run.
"""

from __future__ import annotations

import os
import time
from typing import Protocol

import pytest

# The markers `addopts` in pyproject.toml deselects: the quick suite is every test
# without one of them (tests/unit/test_time_budget.py holds the two lists together).
LONG_MARKERS = ("slow", "cluster", "bench", "browser")
DEADLINE_ENV = "DISPATCHER_TESTS_START_BEFORE"


class Marked(Protocol):
    """What of a test item the budget reads (a `pytest.Item` is one)."""

    def get_closest_marker(self, name: str) -> object | None: ...


def is_long(item: Marked) -> bool:
    return any(item.get_closest_marker(name) for name in LONG_MARKERS)


def run_order(item: Marked) -> int:
    """Quick tests, then the long ones, then the bench's (the least to lose on a slow day)."""
    if not is_long(item):
        return 0
    return 2 if item.get_closest_marker("bench") else 1


def deadline() -> float | None:
    raw = os.environ.get(DEADLINE_ENV)
    return float(raw) if raw else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=run_order)  # stable: file order within each group


def pytest_runtest_setup(item: Marked) -> None:
    start_before = deadline()
    if start_before is not None and is_long(item) and time.time() > start_before:
        spent = time.strftime("%H:%M:%S", time.gmtime(start_before))
        pytest.skip(
            f"time budget: long tests start only before {spent} UTC ({DEADLINE_ENV})"
        )
