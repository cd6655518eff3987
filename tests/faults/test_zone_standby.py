"""Standby zones on one node: a killed zone's standby takes it at once, and back again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import ray

from dispatcher.actors.hosting import live_slot
from dispatcher.actors.options import ZoneSlot, zone_actor_name
from dispatcher.config import ResolvedSettings
from dispatcher.messages import ZonePlacement
from dispatcher.zoning import Zoning
from tests.support import BERLIN, WAIT_CEILING_S, Api, offset
from tests.support.cluster import counter_total
from tests.support.faults import assert_booking_invariants, read_answer, wait_until

pytestmark = [pytest.mark.integration]

TTL_S = 600.0
DRIVERS = 12


def where(zone_id: str, slot: ZoneSlot, namespace: str) -> ZonePlacement | None:
    try:
        handle: Any = ray.get_actor(zone_actor_name(zone_id, slot), namespace)
        placement: ZonePlacement = ray.get(handle.where.remote(), timeout=10)
        return placement
    except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


async def in_state(
    zone_id: str, slot: ZoneSlot, namespace: str, state: str
) -> ZonePlacement:
    """Wait until the zone's `slot` incarnation is up and in `state`."""
    found: list[ZonePlacement] = []

    async def there() -> bool:
        placement = await asyncio.to_thread(where, zone_id, slot, namespace)
        if placement is not None and placement.state == state:
            found.append(placement)
            return True
        return False

    await wait_until(
        there, within_s=WAIT_CEILING_S, interval_s=0.1, what=f"{slot} {state}"
    )
    return found[-1]


async def book(
    api: Api, order_id: str, at: tuple[float, float], since: float
) -> tuple[str, float]:
    """Send one order until it gets its 200 (503s are retried); its driver and when."""
    while True:
        status, body, _ = await read_answer(await api.order(order_id, *at))
        if status == 200:
            answer = json.loads(body)
            assert answer["assigned"], answer
            return answer["driverId"], time.monotonic() - since
        assert status == 503, (status, body)
        assert time.monotonic() - since < WAIT_CEILING_S, f"{order_id} never booked"
        await asyncio.sleep(0.05)


async def epoch_of(pool: asyncpg.Pool, zone_id: str) -> int:
    epoch: int = await pool.fetchval(
        "SELECT epoch FROM zones WHERE zone_id = $1", zone_id
    )
    return epoch


async def test_a_killed_zone_is_taken_by_its_running_standby_and_taken_back_later(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    recovery: Callable[[str, float], None],
) -> None:
    namespace = f"standby-{uuid.uuid4().hex[:8]}"
    api: Api = await start_api(
        make_settings(heartbeat_ttl_s=TTL_S, zone_standby=True, ray_namespace=namespace)
    )
    zone = Zoning(api.settings.zone_resolution).zone_of(*BERLIN)
    spots = [offset(*BERLIN, 0.3 * (n % 4), 0.3 * (n // 4)) for n in range(DRIVERS)]
    await asyncio.gather(
        *(api.online_driver(*p, name=f"s{n}") for n, p in enumerate(spots))
    )
    booked: dict[str, str] = {}
    booked["S-0"], _ = await book(api, "S-0", BERLIN, time.monotonic())

    # The ingress's keeper starts the standby (one node: beside the live one).
    live_a = await in_state(zone, "a", namespace, "active")
    standby_b = await in_state(zone, "b", namespace, "idle")
    assert standby_b.pid != live_a.pid
    epoch_a = await epoch_of(pg_pool, zone)
    assert epoch_a == live_a.epoch

    # Slot a's process dies: the running standby takes the zone with a new epoch.
    killed_at, killed_unix = time.monotonic(), time.time()
    os.kill(live_a.pid, signal.SIGKILL)
    booked["S-1"], took_s = await book(api, "S-1", offset(*BERLIN, 0.1, 0.1), killed_at)
    recovery("standby: zone process killed -> order booked by the standby", took_s)
    assert await asyncio.to_thread(live_slot, namespace, zone) == "b"
    taken = await in_state(zone, "b", namespace, "active")
    assert taken.pid == standby_b.pid, "the standby's own process took the zone"
    recovery(
        "standby: zone process killed -> standby active", taken.active_at - killed_unix
    )
    assert taken.epoch == epoch_a + 1 == await epoch_of(pg_pool, zone)

    # The keeper starts slot a again, as the standby: it never takes the zone.
    restarted_a = await in_state(zone, "a", namespace, "idle")
    assert restarted_a.pid != live_a.pid
    booked["S-2"], _ = await book(
        api, "S-2", offset(*BERLIN, 0.2, 0.1), time.monotonic()
    )
    assert await epoch_of(pg_pool, zone) == taken.epoch, "the live one kept the zone"
    assert (await asyncio.to_thread(where, zone, "a", namespace)).state == "idle"  # type: ignore[union-attr]

    # And the other way: slot b dies, slot a's new process takes the zone back.
    killed_at = time.monotonic()
    os.kill(taken.pid, signal.SIGKILL)
    booked["S-3"], took_s = await book(api, "S-3", offset(*BERLIN, 0.3, 0.1), killed_at)
    recovery("standby: taken back by the new slot a", took_s)
    assert await asyncio.to_thread(live_slot, namespace, zone) == "a"
    back = await in_state(zone, "a", namespace, "active")
    assert back.pid == restarted_a.pid
    assert back.epoch == taken.epoch + 1 == await epoch_of(pg_pool, zone)

    # Each order booked once, to the driver it was answered with; no driver twice.
    rows = await pg_pool.fetch("SELECT seller_order_id, driver_id FROM deliveries")
    assert {r["seller_order_id"]: r["driver_id"] for r in rows} == booked
    assert len(set(booked.values())) == len(booked)
    await assert_booking_invariants(pg_pool)
    assert await counter_total([api], "dispatcher_zone_failovers_total") == 2
