"""What one operator-page snapshot costs with 2,000 drivers on shift (docs/PERFORMANCE.md).

Prints the figures (`-s`); asserts only what the snapshot says, never a time.
"""

from __future__ import annotations

import gzip
import random
import statistics
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import h3
import pytest

from dispatcher.api.keys import OPS_VIEW
from dispatcher.store.opsview import read_ops_rows
from tests.support import BERLIN, Api, offset

pytestmark = [pytest.mark.integration, pytest.mark.bench]

DRIVERS = 2_000
BUSY = 600
OFFERED = 100
STALE = 100
UNASSIGNED = 150
RUNS = 30


async def seed_city(pool: asyncpg.Pool, resolution: int) -> None:
    """2,000 drivers around Berlin: busy ones with a delivery, offered ones with an open
    offer, some silent, the rest available; and orders that gave up."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    drivers: list[tuple[object, ...]] = []
    deliveries: list[tuple[object, ...]] = []
    dispatches: list[tuple[object, ...]] = []
    offers: list[tuple[object, ...]] = []
    zones: set[str] = set()
    for n in range(DRIVERS):
        lat, lon = offset(*BERLIN, rng.uniform(-15, 15), rng.uniform(-15, 15))
        zone = str(h3.latlng_to_cell(lat, lon, resolution))
        zones.add(zone)
        driver_id = f"drv_bench_{n:05d}"
        busy = n < BUSY
        offered = BUSY <= n < BUSY + OFFERED
        seen = now - timedelta(hours=1) if n >= DRIVERS - STALE else now
        offer_id = f"off_bench_{n:05d}" if offered else None
        drivers.append(
            (
                driver_id,
                f"Driver {n}",
                driver_id.encode(),
                "BUSY" if busy else "AVAILABLE",
                lat,
                lon,
                seen,
                seen,
                zone,
                offer_id,
            )
        )
        if busy:
            deliveries.append(
                (f"SO-bench-{n}", f"asg_{n}", driver_id, zone, "ASSIGNED", lat, lon)
            )
        if offered:
            order = f"SO-offer-{n}"
            dispatches.append(
                (order, zone, "OFFERED", lat, lon, now + timedelta(minutes=2), None)
            )
            offers.append((offer_id, order, driver_id, now + timedelta(seconds=20)))
    for n in range(UNASSIGNED):
        dispatches.append(
            (
                f"SO-gave-up-{n}",
                next(iter(zones)),
                "UNASSIGNED",
                *BERLIN,
                now,
                "NO_DRIVER_AVAILABLE",
            )
        )
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO zones (zone_id) VALUES ($1)", [(z,) for z in sorted(zones)]
        )
        await conn.executemany(
            """INSERT INTO drivers (id, name, token_hash, status, lat, lon,
                   location_recorded_at, last_seen_at, zone_id, open_offer_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
            drivers,
        )
        await conn.executemany(
            """INSERT INTO deliveries (seller_order_id, assignment_id, driver_id, zone_id,
                   status, pickup_lat, pickup_lon, distance_km, response_body)
               VALUES ($1, $2, $3, $4, $5, $6, $7, 0.5, '{}')""",
            deliveries,
        )
        await conn.executemany(
            """INSERT INTO dispatches (seller_order_id, zone_id, mode, status, pickup_lat,
                   pickup_lon, deadline_at, reason, ended_at)
               VALUES ($1, $2, 'cascade', $3, $4, $5, $6, $7,
                       CASE WHEN $3::text = 'UNASSIGNED' THEN now() END)""",
            dispatches,
        )
        await conn.executemany(
            """INSERT INTO offers (offer_id, seller_order_id, attempt, round, driver_id,
                   status, distance_km, expires_at, accept_by)
               VALUES ($1, $2, 1, 1, $3, 'OPEN', 0.5, $4::timestamptz,
                       $4::timestamptz + interval '2 seconds')""",
            offers,
        )


def summary(label: str, samples_ms: list[float]) -> str:
    p95 = statistics.quantiles(samples_ms, n=20, method="inclusive")[-1]
    return f"{label}: median {statistics.median(samples_ms):.1f} ms, p95 {p95:.1f} ms"


async def test_a_snapshot_of_2000_drivers(
    api: Api, pg_pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed_city(pg_pool, api.settings.zone_resolution)
    view = api.client.app[OPS_VIEW]

    read_ms, build_ms, route_ms = [], [], []
    for _ in range(RUNS):
        started = time.perf_counter()
        rows = await read_ops_rows(pg_pool)
        read_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        snap = await view.snapshot()
        body = snap.model_dump_json()
        build_ms.append((time.perf_counter() - started) * 1000)
    assert len(rows.drivers) == DRIVERS
    for _ in range(RUNS):
        started = time.perf_counter()
        resp = await api.client.get(
            "/ops/snapshot", headers={**api.admin, "Accept-Encoding": "gzip"}
        )
        await resp.read()
        route_ms.append((time.perf_counter() - started) * 1000)
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"

    counts = snap.counts
    assert counts.drivers == DRIVERS
    assert (counts.busy, counts.offered, counts.stale) == (BUSY, OFFERED, STALE)
    assert counts.available == DRIVERS - BUSY - OFFERED - STALE
    assert counts.assigned == BUSY and counts.offered_orders == OFFERED
    assert counts.unassigned == UNASSIGNED and len(snap.queue.unassigned) == 100
    raw = len(body.encode())
    gzipped = len(gzip.compress(body.encode()))
    with capsys.disabled():
        print(
            f"\nops snapshot, {DRIVERS} drivers, {len(snap.zones)} zones, {RUNS} runs each:"
            f"\n  {summary('PostgreSQL read alone (in process)', read_ms)}"
            f"\n  {summary('read + build + JSON (in process)', build_ms)}"
            f"\n  {summary('GET /ops/snapshot (HTTP, gzip)', route_ms)}"
            f"\n  size: {raw / 1024:.0f} KiB JSON, {gzipped / 1024:.0f} KiB gzipped"
        )
