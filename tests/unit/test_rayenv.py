"""apply_ray_env(): what `dispatcher serve` sets before it starts or joins Ray."""

from __future__ import annotations

import os

import pytest

from dispatcher.rayenv import RAY_ENV, ZONE_WORKER_NICENESS, apply_ray_env


def test_sets_zone_niceness_and_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RAY_ENV:
        monkeypatch.delenv(name, raising=False)
    apply_ray_env()
    # Ray's own spelling of its settings, so a typo in RAY_ENV fails here.
    assert {name: os.environ[name] for name in RAY_ENV} == {
        "RAY_worker_niceness": "0",
        "RAY_timeout_ms_task_wait_for_death_info": "0",
    }


def test_an_operators_value_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    name, _ = ZONE_WORKER_NICENESS
    monkeypatch.setenv(name, "5")
    apply_ray_env()
    assert os.environ[name] == "5"
