"""The booking statements keep a good plan once PostgreSQL caches a generic one.

asyncpg prepares every statement; after five runs PostgreSQL may switch to a generic
plan chosen without the parameters. A pick among candidates that scans the bounding
box instead of reaching the candidates by primary key cost 12 ms per booking at 20,000
drivers (0.8 ms otherwise). The plan's shape is checked, not its time.
"""

from __future__ import annotations

import asyncpg
import pytest

from dispatcher.geo import bounding_box
from dispatcher.store.deliveries import PICK_AMONG_SQL, PICK_SQL
from tests.support import BERLIN, offset

pytestmark = pytest.mark.integration

PARAMS = "float8, float8, float8, float8, float8, float8, float8, text[], float8, text[], text, bigint"


async def generic_plan(
    conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], sql: str, candidates: str
) -> str:
    lat, lon = BERLIN
    b = bounding_box(lat, lon, 5.0)
    await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
    await conn.execute(f"PREPARE pick_plan({PARAMS}) AS {sql}")
    rows = await conn.fetch(
        f"EXPLAIN EXECUTE pick_plan({lat}, {lon}, 60, {b[0]}, {b[1]}, {b[2]}, {b[3]}, {candidates}, 5, '{{}}', 'z', 1)"
    )
    await conn.execute("DEALLOCATE pick_plan")
    return "\n".join(r[0] for r in rows)


async def test_generic_plans_reach_candidates_by_key_and_others_by_the_box(
    pg_pool: asyncpg.Pool,
) -> None:
    async with pg_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        # A city's worth of dispatchable drivers, so the planner has real statistics.
        await conn.executemany(
            """INSERT INTO drivers (id, name, token_hash, status, lat, lon, last_seen_at, zone_id)
               VALUES ($1, 'n', $2, 'AVAILABLE', $3, $4, now(), 'z')""",
            [
                (
                    f"plan{i}",
                    f"h{i}".encode(),
                    *offset(*BERLIN, (i % 100) * 0.05 - 2.5, (i // 100) * 0.05 - 2.5),
                )
                for i in range(5000)
            ],
        )
        await conn.execute("ANALYZE drivers")
        among = await generic_plan(conn, PICK_AMONG_SQL, "'{plan1,plan2,plan3}'")
        nearest = await generic_plan(conn, PICK_SQL, "NULL")
        await tx.rollback()  # the rows go; the statistics stay, which is harmless
    assert (
        "Function Scan on unnest" in among
        and "Index Scan using drivers_pkey on drivers d" in among
    ), among
    assert "drivers_dispatchable_idx" not in among, among
    assert "drivers_dispatchable_idx" in nearest, nearest
