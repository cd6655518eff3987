"""A zone's offer timers: a wake-up that fails (PostgreSQL away) is tried again, not lost.

The zone core runs with a store that fails on demand; nothing else is touched, since a
dispatch whose offers are all still open only needs reading.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from dispatcher.actors import offerdesk
from dispatcher.actors.core import ZoneCore
from dispatcher.config import ResolvedSettings
from dispatcher.errors import StaleEpochError
from dispatcher.offers.policy import DispatchView, OfferView
from dispatcher.store.deliveries import DeliveryStore
from dispatcher.store.drivers import DriverStore
from dispatcher.store.geo import GeoMirror
from dispatcher.store.offers import Loaded, OfferStore
from dispatcher.zoning import Zoning

ORDER = "SO-timer"


class FlakyStore:
    """Answers `load` with one open offer far from expiry, after `failures` errors."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.loads = 0

    async def load(self, seller_order_id: str) -> Loaded:
        self.loads += 1
        if self.loads <= self.failures:
            raise self.error
        now = time.time()
        view = DispatchView(
            seller_order_id,
            "OFFERED",
            1,
            now + 600.0,
            (OfferView("ofr_1", "drv_1", "OPEN", now + 300.0, now + 302.0),),
        )
        return Loaded(view, cast(Any, {}), now)

    async def open_dispatches(self, zone_id: str) -> list[str]:
        return [ORDER]


def core_with(store: FlakyStore) -> ZoneCore:
    settings = ResolvedSettings.model_validate(
        {
            "database_url": "postgresql://unused/db",
            "redis_url": "redis://unused:6379/0",
            "vendure_webhook_url": "http://127.0.0.1:9/hooks",
            "vendure_webhook_secret": "whsec_" + "a" * 32,
            "inbound_secret": "whsec_" + "b" * 32,
            "admin_token": "adm_" + "c" * 24,
            "offer_mode": "cascade",
        }
    )
    return ZoneCore(
        "zone-x",
        settings,
        drivers=cast(DriverStore, None),
        deliveries=cast(DeliveryStore, None),
        mirror=cast(GeoMirror, None),
        zoning=Zoning(settings.zone_resolution),
        offers=cast(OfferStore, store),
    )


async def until(check: Any) -> None:
    # Bounded by the condition; the ceiling only keeps a broken build from hanging.
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


@pytest.fixture(autouse=True)
def quick_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offerdesk, "RETRY_AFTER_FAILURE_S", 0.01)


@pytest.mark.parametrize(
    "error",
    [OSError("connection refused"), TimeoutError("statement timeout")],
    ids=["postgres-down", "postgres-slow"],
)
async def test_a_timer_whose_wake_up_fails_is_tried_again_until_it_succeeds(
    error: Exception,
) -> None:
    store = FlakyStore(failures=3, error=error)
    core = core_with(store)
    assert core.desk is not None
    desk = core.desk
    # What the dispatch's timer does when it fires.
    core.desk._fire(ORDER)
    await until(lambda: store.loads == 4)
    # Read at last: timed again for the offer's expiry, and no more reads meanwhile.
    await until(lambda: desk.timers == 1)
    await asyncio.sleep(0.05)
    assert store.loads == 4
    core.desk.stop()


async def test_a_failed_wake_up_keeps_a_timer_for_its_dispatch() -> None:
    store = FlakyStore(failures=10**6, error=OSError("connection refused"))
    core = core_with(store)
    assert core.desk is not None
    core.desk._fire(ORDER)
    await until(lambda: store.loads >= 3)
    # Never lost: between tries the dispatch always has a timer or a running wake-up.
    assert core.desk.timers == 1 or core._wakeups
    core.desk.stop()
    await asyncio.gather(*core._wakeups, return_exceptions=True)


async def test_a_fenced_zone_stops_its_timers_instead_of_retrying() -> None:
    store = FlakyStore(failures=1, error=StaleEpochError("zone-x: epoch 1 superseded"))
    core = core_with(store)
    assert core.desk is not None
    core.desk._fire(ORDER)
    await until(lambda: core.fenced and not core._wakeups)
    await asyncio.sleep(0.05)
    # A newer incarnation owns the zone and its timers: this one reads nothing more.
    assert store.loads == 1 and core.desk.timers == 0


async def test_a_dispatch_that_cannot_be_resumed_at_start_is_tried_again() -> None:
    store = FlakyStore(failures=1, error=OSError("connection refused"))
    core = core_with(store)
    assert core.desk is not None
    desk = core.desk
    # The zone starts: its one open dispatch fails to load.
    assert await core.desk.rebuild("zone-x") == 1
    assert core.desk.timers == 1
    await until(lambda: store.loads == 2)
    await until(lambda: desk.timers == 1)
    core.desk.stop()
