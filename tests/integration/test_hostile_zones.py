"""DISPATCHER_MAX_ZONES under concurrency: a burst of pings into new zones, through two
ingress replicas at once, opens no more zones (and starts no more actors) than allowed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import ray

from dispatcher.config import ResolvedSettings
from tests.support import Api, problem

pytestmark = pytest.mark.integration

MAX_ZONES = 3
BURST = 20
WRITE_CEILING_S = 60.0


def zone_actors() -> set[str]:
    return {
        e["name"]
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["name"].startswith("zone:")
    }


async def test_a_burst_into_new_zones_from_two_replicas_respects_the_limit(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> None:
    settings = make_settings(max_zones=MAX_ZONES)
    first: Api = await start_api(settings)
    second: Api = await start_api(settings)
    drivers = [await first.create_driver(f"z{n}") for n in range(BURST)]
    # Points ~55 km apart: each in a zone of its own.
    points = [(40.0 + 0.5 * n, 10.0) for n in range(BURST)]
    replicas = [first, second]

    async def ping(n: int) -> Any:
        api = replicas[n % 2]
        lat, lon = points[n]
        return await api.client.patch(
            f"/drivers/{drivers[n].driver_id}/location",
            json={"lat": lat, "lon": lon},
            headers=drivers[n].auth,
        )

    answers = await asyncio.gather(*(ping(n) for n in range(BURST)))
    for api in replicas:
        await api.settle()
    statuses = sorted(a.status for a in answers)
    assert statuses.count(204) == MAX_ZONES, statuses
    for answer in answers:
        if answer.status != 204:
            body = await problem(answer, 422)
            assert "outside the service area" in body["detail"]
    assert await pg_pool.fetchval("SELECT count(*) FROM zones") == MAX_ZONES
    # The accepted fixes are written once their zones' actors are up; on a loaded
    # machine that can outlast a flush (the fixes are kept and retried).
    located_sql = "SELECT count(*) FROM drivers WHERE zone_id IS NOT NULL"
    deadline = time.monotonic() + WRITE_CEILING_S
    while time.monotonic() < deadline:
        if await pg_pool.fetchval(located_sql) >= MAX_ZONES:
            break
        await asyncio.sleep(0.2)
    assert await pg_pool.fetchval(located_sql) == MAX_ZONES
    actors = await asyncio.to_thread(zone_actors)
    assert len(actors) <= MAX_ZONES, sorted(actors)
