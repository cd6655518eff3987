"""Per-driver ping rate limit: excess pings get 429 + Retry-After and are not stored."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from dispatcher.config import ResolvedSettings
from dispatcher.store import keys
from tests.fuzz.state import problem
from tests.support import BERLIN, Api, Driver, offset

pytestmark = pytest.mark.integration

RATE, BURST = 1.0, 4


async def location(pg_pool: asyncpg.Pool, driver: Driver) -> tuple[float, float]:
    row = await pg_pool.fetchrow(
        "SELECT lat, lon FROM drivers WHERE id = $1", driver.driver_id
    )
    assert row is not None
    return row["lat"], row["lon"]


async def mirrored(
    redis: Redis, pg_pool: asyncpg.Pool, driver: Driver
) -> tuple[float, float] | None:
    zone = await pg_pool.fetchval(
        "SELECT zone_id FROM drivers WHERE id = $1", driver.driver_id
    )
    [pos] = await redis.geopos(keys.zone_geo(zone), driver.driver_id)
    return None if pos is None else (float(pos[1]), float(pos[0]))


@pytest.fixture
async def limited(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
) -> Api:
    api: Api = await start_api(make_settings(ping_rate_per_s=RATE, ping_burst=BURST))
    # Start Berlin's zone actor now: a slow first ping would let buckets refill.
    assert (
        await api.ping(await api.create_driver("warm-up"), *offset(*BERLIN, -1.0, 0.0))
    ).status == 204
    return api


async def test_excess_pings_get_429_with_retry_after_and_change_nothing(
    limited: Api, pg_pool: asyncpg.Pool, redis_client: Redis
) -> None:
    api = limited
    driver = await api.create_driver("fast")
    assert (await api.set_status(driver, "AVAILABLE")).status == 200
    other = await api.create_driver("calm")
    spots = [offset(*BERLIN, 0.01 * i, 0.0) for i in range(BURST + 3)]

    answers = [await api.ping(driver, *spot) for spot in spots]
    assert [a.status for a in answers] == [204] * BURST + [429] * 3
    for answer in answers[BURST:]:
        body = await problem(answer, {429})
        assert body["type"].endswith("/too-many-requests")
        assert "rate limited" in body["detail"]
        retry_after = answer.headers["Retry-After"]
        assert retry_after.isdigit() and 1 <= int(retry_after) <= 60, retry_after
    # Refused, not silently dropped, and not stored: the last accepted fix stands.
    last_ok = spots[BURST - 1]
    assert await location(pg_pool, driver) == pytest.approx(last_ok)
    assert await mirrored(redis_client, pg_pool, driver) == pytest.approx(
        last_ok, abs=1e-5
    )

    # Other drivers have buckets of their own.
    assert (await api.ping(other, *BERLIN)).status == 204
    # The operator pinging for this driver (a gateway) draws on the same bucket.
    as_operator = await api.client.patch(
        f"/drivers/{driver.driver_id}/location",
        json={"lat": BERLIN[0], "lon": BERLIN[1]},
        headers=api.admin,
    )
    await problem(as_operator, {429})

    # After Retry-After, pings are accepted again.
    await asyncio.sleep(int(answers[-1].headers["Retry-After"]))
    late = offset(*BERLIN, 0.2, 0.0)
    assert (await api.ping(driver, *late)).status == 204
    assert await location(pg_pool, driver) == pytest.approx(late)

    metrics = await (await api.client.get("/metrics")).text()
    [sample] = [
        line
        for line in metrics.splitlines()
        if line.startswith('dispatcher_pings_total{verdict="rate_limited"}')
    ]
    assert float(sample.rsplit(" ", 1)[1]) == 4.0


async def test_refused_pings_do_not_drain_the_victims_bucket(limited: Api) -> None:
    """Only authenticated pings count: nobody can exhaust another driver's budget."""
    api = limited
    victim = await api.create_driver("victim")
    attacker = await api.create_driver("attacker")
    path = f"/drivers/{victim.driver_id}/location"
    body = {"lat": BERLIN[0], "lon": BERLIN[1]}
    for headers in (attacker.auth, {"Authorization": "Bearer nope"}, {}) * 4:
        resp = await api.client.patch(path, json=body, headers=headers)
        assert resp.status in (401, 403), resp.status
    answers = [
        await api.ping(victim, *offset(*BERLIN, 0.01 * i, 0.0)) for i in range(BURST)
    ]
    assert [a.status for a in answers] == [204] * BURST


async def test_concurrent_flood_is_answered_not_dropped(
    limited: Api, pg_pool: asyncpg.Pool
) -> None:
    """50 pings at once: exactly BURST are stored, every other one is a 429 (none is lost)."""
    api = limited
    driver = await api.create_driver("flood")
    answers = await asyncio.gather(
        *(api.ping(driver, *offset(*BERLIN, 0.001 * i, 0.0)) for i in range(50))
    )
    counts = Counter(a.status for a in answers)
    assert counts[204] == BURST and counts[429] == 50 - BURST, counts
    assert all("Retry-After" in a.headers for a in answers if a.status == 429)


async def test_a_batch_entry_of_a_limited_driver_is_rejected_with_a_clear_detail(
    limited: Api, pg_pool: asyncpg.Pool
) -> None:
    """A gateway batch takes one token per driver it names; an empty bucket rejects that
    driver's entries (the batch still answers 200 for the others)."""
    api = limited
    busy = await api.create_driver("busy")
    calm = await api.create_driver("calm")
    for i in range(BURST):
        assert (await api.ping(busy, *offset(*BERLIN, 0.01 * i, 0.0))).status == 204
    before = await location(pg_pool, busy)
    pings = [
        {"driverId": busy.driver_id, "lat": BERLIN[0], "lon": BERLIN[1]},
        {"driverId": calm.driver_id, "lat": BERLIN[0], "lon": BERLIN[1]},
        {"driverId": busy.driver_id, "lat": BERLIN[0] + 0.001, "lon": BERLIN[1]},
    ]
    resp = await api.client.post(
        "/drivers/locations",
        data=json.dumps({"pings": pings}),
        headers={**api.admin, "Content-Type": "application/json"},
    )
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["accepted"] == 1
    assert [r["index"] for r in body["rejected"]] == [0, 2]
    for rejection in body["rejected"]:
        assert (
            rejection["detail"].startswith("rate limited:")
            and "retry after" in rejection["detail"]
        )
    await api.settle()
    assert await location(pg_pool, busy) == before
    assert await location(pg_pool, calm) == pytest.approx(BERLIN)

    # Many fixes of one fresh driver in one batch cost it one token: all are accepted.
    fresh = await api.create_driver("fresh")
    many = [{"driverId": fresh.driver_id, "lat": BERLIN[0], "lon": BERLIN[1]}] * (
        BURST * 3
    )
    resp = await api.client.post(
        "/drivers/locations", json={"pings": many}, headers=api.admin
    )
    assert await resp.json() == {"accepted": BURST * 3, "rejected": []}


async def test_zero_turns_the_limit_off(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
) -> None:
    api: Api = await start_api(make_settings(ping_rate_per_s=0, ping_burst=1))
    driver = await api.create_driver("unlimited")
    answers = await asyncio.gather(
        *(api.ping(driver, *offset(*BERLIN, 0.001 * i, 0.0)) for i in range(40))
    )
    assert Counter(a.status for a in answers) == Counter({204: 40})


async def test_the_openapi_document_declares_the_429(limited: Api) -> None:
    doc = await (await limited.client.get("/openapi.json")).json()
    assert "429" in doc["paths"]["/drivers/{driverId}/location"]["patch"]["responses"]
