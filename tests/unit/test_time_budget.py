"""The test run's order and time budget (tests/support/time_budget.py)."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest

from tests.support import time_budget
from tests.support.time_budget import DEADLINE_ENV, LONG_MARKERS, run_order

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class Item:
    def __init__(self, *markers: str) -> None:
        self.markers = markers

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.markers else None


def test_the_long_markers_are_the_ones_the_quick_suite_deselects() -> None:
    addopts = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"][
        "addopts"
    ]
    expression = " and ".join(f"not {m}" for m in LONG_MARKERS)
    assert f"-m '{expression}'" in addopts


def test_quick_tests_run_first_and_the_bench_last() -> None:
    items = [
        Item("bench", "integration"),
        Item("slow"),
        Item("integration"),
        Item("browser"),
        Item(),
    ]
    ordered = sorted(items, key=run_order)
    assert [i.markers for i in ordered] == [
        ("integration",),
        (),
        ("slow",),
        ("browser",),
        ("bench", "integration"),
    ]


def test_long_tests_are_skipped_once_the_budget_is_spent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() - 1))
    time_budget.pytest_runtest_setup(Item("integration"))  # quick: runs
    with pytest.raises(pytest.skip.Exception, match="time budget"):
        time_budget.pytest_runtest_setup(Item("cluster"))


def test_long_tests_run_before_the_deadline_or_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 600))
    time_budget.pytest_runtest_setup(Item("cluster"))
    monkeypatch.delenv(DEADLINE_ENV)
    time_budget.pytest_runtest_setup(Item("cluster"))
