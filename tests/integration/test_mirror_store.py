"""The mirror against a real Redis: the one-round-trip widening lookup, chunked rebuilds."""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from dispatcher.actors.core import CANDIDATES, nearest_widening
from dispatcher.geo import haversine_km
from dispatcher.rules import search_steps
from dispatcher.store import keys
from dispatcher.store.drivers import MirrorEntry
from dispatcher.store.geo import (
    UPSERT_CHUNK,
    GeoMirror,
    MirrorUnavailableError,
    connect_redis,
)
from dispatcher.zoning import Zoning
from tests.support import BERLIN, as_text, geo_members, offset

pytestmark = pytest.mark.integration

ZONING = Zoning(5)


@pytest.fixture
async def mirror(redis_url: str, redis_client: Redis) -> AsyncIterator[GeoMirror]:
    mirror = GeoMirror(connect_redis(redis_url, 2.0), 2.0)
    yield mirror
    await mirror.client.aclose()


async def place(redis: Redis, drivers: dict[str, tuple[float, float]]) -> None:
    for driver_id, (lat, lon) in drivers.items():
        await redis.geoadd(
            keys.zone_geo(ZONING.zone_of(lat, lon)), (lon, lat, driver_id)
        )


async def test_a_dense_centre_answers_from_the_smallest_circle_nearest_first(
    mirror: GeoMirror, redis_client: Redis
) -> None:
    # 30 drivers within 80 m of the pickup, 30 more a kilometre out.
    near = {f"near{i}": offset(*BERLIN, 0.002 * i + 0.001, 0.0) for i in range(30)}
    far = {f"far{i}": offset(*BERLIN, 1.0 + 0.01 * i, 0.0) for i in range(30)}
    await place(redis_client, {**near, **far})
    found = await nearest_widening(mirror, ZONING, *BERLIN, 5.0)
    assert found == [f"near{i}" for i in range(CANDIDATES)]


async def test_sparse_drivers_are_found_by_widening_across_zones(
    mirror: GeoMirror, redis_client: Redis
) -> None:
    # Nobody within 2 km; three drivers 3-4.5 km away in different directions (and zones).
    drivers = {
        "east": offset(*BERLIN, 0.0, 4.5),
        "north": offset(*BERLIN, 3.0, 0.0),
        "south": offset(*BERLIN, -4.0, 0.0),
    }
    await place(redis_client, drivers)
    assert len({ZONING.zone_of(*p) for p in drivers.values()}) >= 2
    assert await nearest_widening(mirror, ZONING, *BERLIN, 5.0) == [
        "north",
        "south",
        "east",
    ]
    assert await nearest_widening(mirror, ZONING, *BERLIN, 2.5) == []


async def test_a_zone_not_rebuilt_makes_the_lookup_unavailable(
    mirror: GeoMirror, redis_client: Redis
) -> None:
    zone = ZONING.zone_of(*BERLIN)
    with pytest.raises(MirrorUnavailableError):
        await nearest_widening(mirror, ZONING, *BERLIN, 5.0, must_be_built=[zone])
    await redis_client.set(keys.zone_built(zone), 1)
    assert (
        await nearest_widening(mirror, ZONING, *BERLIN, 5.0, must_be_built=[zone]) == []
    )


async def test_the_script_is_loaded_again_after_redis_forgot_it(
    mirror: GeoMirror, redis_client: Redis
) -> None:
    await place(redis_client, {"d1": offset(*BERLIN, 0.3, 0.0)})
    assert await nearest_widening(mirror, ZONING, *BERLIN, 5.0) == ["d1"]
    await redis_client.script_flush()
    assert await nearest_widening(mirror, ZONING, *BERLIN, 5.0) == ["d1"]


async def test_the_first_answer_is_always_the_true_nearest(
    mirror: GeoMirror, redis_client: Redis
) -> None:
    rng = random.Random(11)
    drivers = {
        f"d{i}": offset(
            *BERLIN,
            rng.gauss(0, 1.5 if i % 2 else 6.0),
            rng.gauss(0, 1.5 if i % 2 else 6.0),
        )
        for i in range(400)
    }
    await place(redis_client, drivers)
    assert search_steps(5.0)[0] < 0.5
    for _ in range(150):
        pickup = offset(*BERLIN, rng.uniform(-8, 8), rng.uniform(-8, 8))
        found = await nearest_widening(mirror, ZONING, *pickup, 5.0)
        within = sorted(
            (haversine_km(*pickup, *p), d)
            for d, p in drivers.items()
            if haversine_km(*pickup, *p) <= 5.0
        )
        if not within:
            assert found == []
            continue
        assert found, pickup
        # GEO positions are quantised (< 1 m): the first found is within a metre of the true nearest.
        assert haversine_km(*pickup, *drivers[found[0]]) <= within[0][0] + 0.001
        distances = [haversine_km(*pickup, *drivers[d]) for d in found]
        assert all(b >= a - 0.001 for a, b in itertools.pairwise(distances)), distances


def entries_around(
    n: int, zone_id: str, *, now_s: float, rng: random.Random
) -> list[MirrorEntry]:
    out = []
    for i in range(n):
        lat, lon = offset(*BERLIN, rng.uniform(-3, 3), rng.uniform(-3, 3))
        out.append(
            MirrorEntry(f"drv{i}", zone_id, lat, lon, now_s, True, int(now_s * 1e6))
        )
    return out


async def test_a_big_zone_rebuilds_in_small_round_trips(
    redis_url: str, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One MULTI of 20,000 drivers took ~0.6 s here, outlasted the production per-call
    # timeout (0.25 s), failed, and left the zone on the slow PostgreSQL path for good.
    # What keeps every call short is its size, whatever the machine's speed: each round
    # trip carries at most one chunk. The timeout here is a generous ceiling.
    sizes: list[int] = []
    run = GeoMirror._run

    async def counted(self: GeoMirror, pipe: Any) -> list[object]:
        sizes.append(sum(len(args) for args, _ in pipe.command_stack))
        return await run(self, pipe)

    monkeypatch.setattr(GeoMirror, "_run", counted)
    mirror = GeoMirror(connect_redis(redis_url, 10.0), 10.0)
    now = time.time()
    zone = ZONING.zone_of(*BERLIN)
    entries = entries_around(20_000, zone, now_s=now, rng=random.Random(3))
    await mirror.rebuild(zone, entries, now, 60.0)
    assert await mirror.is_built(zone)
    assert await geo_members(redis_client, zone) == {e.driver_id for e in entries}
    assert await redis_client.zcard(keys.zone_seen(zone)) == 20_000
    one_chunk = max(sizes[:-1])  # the last call only marks the zone built
    assert len(sizes) >= 20_000 // UPSERT_CHUNK, sizes
    assert one_chunk <= sum(sizes) // 20, f"a round trip carried {one_chunk} arguments"


async def test_a_rebuild_drops_what_postgres_does_not_hold(
    mirror: GeoMirror, redis_client: Redis
) -> None:
    now = time.time()
    zone = ZONING.zone_of(*BERLIN)
    entries = entries_around(30, zone, now_s=now, rng=random.Random(5))
    # Redis holds a driver PostgreSQL no longer has in this zone, and a heartbeat orphan.
    await redis_client.geoadd(keys.zone_geo(zone), (BERLIN[1], BERLIN[0], "gone"))
    await redis_client.zadd(keys.zone_seen(zone), {"gone": now, "orphan": now})
    offline = dataclasses.replace(entries[0], dispatchable_status=False)
    silent = dataclasses.replace(entries[1], seen_epoch_s=now - 120)
    await mirror.rebuild(zone, [offline, silent, *entries[2:]], now, 60.0)
    expected = {e.driver_id for e in entries[2:]}
    assert await geo_members(redis_client, zone) == expected
    assert as_text(await redis_client.zrange(keys.zone_seen(zone), 0, -1)) == expected
    assert await mirror.is_built(zone)


async def test_a_periodic_repair_rewrites_only_what_differs(
    mirror: GeoMirror, redis_client: Redis
) -> None:
    now = time.time()
    zone = ZONING.zone_of(*BERLIN)
    entries = entries_around(1000, zone, now_s=now, rng=random.Random(9))
    await mirror.rebuild(zone, entries, now, 60.0)
    assert await mirror.repair(zone, entries, now, 60.0) == 0, (
        "nothing differs: nothing written"
    )

    # Redis loses a member, keeps an old position of another (an older fix version),
    # holds a driver PostgreSQL does not have here, and a fourth goes silent in PostgreSQL.
    lost, moved, silent = entries[0], entries[1], entries[2]
    assert moved.lat is not None and moved.lon is not None and moved.fix_us is not None
    await redis_client.zrem(keys.zone_geo(zone), lost.driver_id)
    await redis_client.geoadd(
        keys.zone_geo(zone), (moved.lon + 0.01, moved.lat, moved.driver_id)
    )
    await redis_client.hset(keys.DRIVER_FIX, moved.driver_id, str(moved.fix_us - 1))
    await redis_client.geoadd(keys.zone_geo(zone), (BERLIN[1], BERLIN[0], "stranger"))
    truth = [
        *entries[:2],
        dataclasses.replace(silent, seen_epoch_s=now - 120),
        *entries[3:],
    ]

    assert await mirror.repair(zone, truth, now, 60.0) == 4
    expected = {e.driver_id for e in entries} - {silent.driver_id}
    assert await geo_members(redis_client, zone) == expected
    assert as_text(await redis_client.zrange(keys.zone_seen(zone), 0, -1)) == expected
    (pos,) = await redis_client.geopos(keys.zone_geo(zone), moved.driver_id)
    assert (
        pos is not None
        and haversine_km(moved.lat, moved.lon, float(pos[1]), float(pos[0])) < 0.002
    )
    assert await mirror.repair(zone, truth, now, 60.0) == 0
