"""Putting drivers in place: created through the API (small fleets) or by SQL (large), then located by batched pings."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import aiohttp
import asyncpg

from benchmarks.workload import Driver, batch_bodies
from dispatcher.store.drivers import hash_token

# Up to this many drivers, seed through POST /drivers (exercises the real path);
# beyond, one COPY into `drivers` is minutes faster.
API_SEED_MAX = 2000
# Parallel requests while seeding: enough to overlap round trips, few enough not to
# trip the service's pool (DISPATCHER_PG_POOL_MAX = 8).
SEED_CONCURRENCY = 16
# Batched location requests in flight at once while locating a fleet.
LOCATE_CONCURRENCY = 4


class SeedError(RuntimeError):
    """The service refused a seeding request."""


async def _check(resp: aiohttp.ClientResponse, what: str) -> None:
    if resp.status >= 300:
        raise SeedError(f"{what}: {resp.status} {await resp.text()}")


async def create_via_api(
    session: aiohttp.ClientSession,
    base: str,
    admin_token: str,
    points: Sequence[tuple[float, float]],
) -> list[Driver]:
    """POST /drivers, then PATCH …/status AVAILABLE with each driver's own token."""
    admin = {"Authorization": f"Bearer {admin_token}"}
    sem = asyncio.Semaphore(SEED_CONCURRENCY)

    async def one(index: int, point: tuple[float, float]) -> Driver:
        async with sem:
            body = {"name": f"bench driver {index}", "vehicleType": "bike"}
            async with session.post(
                f"{base}/drivers", json=body, headers=admin
            ) as resp:
                await _check(resp, "POST /drivers")
                created = await resp.json()
            driver = Driver(created["driverId"], created["token"], point[0], point[1])
            async with session.patch(
                f"{base}/drivers/{driver.driver_id}/status",
                json={"status": "AVAILABLE"},
                headers={"Authorization": f"Bearer {driver.token}"},
            ) as resp:
                await _check(resp, "PATCH /drivers/{id}/status")
            return driver

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(points))))


async def insert_via_sql(dsn: str, drivers: Sequence[Driver]) -> None:
    """COPY the rows as POST /drivers would write them (token hash), already AVAILABLE."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "drivers",
            records=[
                (
                    d.driver_id,
                    f"bench driver {i}",
                    "bike",
                    hash_token(d.token),
                    "AVAILABLE",
                )
                for i, d in enumerate(drivers)
            ],
            columns=["id", "name", "vehicle_type", "token_hash", "status"],
        )
    finally:
        await conn.close()


async def locate(
    session: aiohttp.ClientSession,
    base: str,
    admin_token: str,
    drivers: Sequence[Driver],
) -> None:
    """One fix per driver through POST /drivers/locations; also renews every heartbeat.

    Raises SeedError, with the service's reasons, unless every ping was accepted.
    """
    headers = {
        "Authorization": f"Bearer {admin_token}",
        "Content-Type": "application/json",
    }
    sem = asyncio.Semaphore(LOCATE_CONCURRENCY)
    reasons: Counter[str] = Counter()

    async def one(body: bytes) -> int:
        async with (
            sem,
            session.post(
                f"{base}/drivers/locations", data=body, headers=headers
            ) as resp,
        ):
            await _check(resp, "POST /drivers/locations")
            answer = await resp.json()
        reasons.update(str(r["detail"]) for r in answer["rejected"])
        accepted: int = answer["accepted"]
        return accepted

    accepted = sum(await asyncio.gather(*(one(b) for b in batch_bodies(drivers))))
    if accepted != len(drivers):
        detail = "; ".join(f"{n}x {reason}" for reason, n in reasons.most_common(3))
        raise SeedError(
            f"only {accepted} of {len(drivers)} pings were accepted: {detail}"
        )
    await settle(session, base, admin_token)


async def settle(session: aiohttp.ClientSession, base: str, admin_token: str) -> None:
    """Wait until the pings the ingress acknowledged are written: pings are written
    behind, and a read through the ingress waits for them."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with session.get(
        f"{base}/drivers", params={"limit": "1"}, headers=headers
    ) as resp:
        await _check(resp, "GET /drivers")


async def seed(
    session: aiohttp.ClientSession,
    base: str,
    admin_token: str,
    dsn: str,
    drivers: Sequence[Driver],
) -> list[Driver]:
    """Create (API or SQL), make AVAILABLE and locate `drivers`; API-made ones get new ids."""
    if len(drivers) <= API_SEED_MAX:
        made = await create_via_api(
            session, base, admin_token, [(d.lat, d.lon) for d in drivers]
        )
    else:
        await insert_via_sql(dsn, drivers)
        made = list(drivers)
    await locate(session, base, admin_token, made)
    return made


async def reset_bookings(dsn: str) -> None:
    """Free every driver between order runs: deliveries delivered, drivers AVAILABLE again.

    Only for the bench's own throwaway database; the mirror is repaired by the next
    `locate`, whose pings re-add every dispatchable driver.
    """
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "UPDATE deliveries SET status = 'DELIVERED', delivered_at = now() "
                "WHERE status IN ('ASSIGNED', 'PICKED_UP')"
            )
            await conn.execute(
                "UPDATE drivers SET status = 'AVAILABLE' WHERE status = 'BUSY'"
            )
    finally:
        await conn.close()


async def booking_counts(dsn: str, prefix: str) -> tuple[int, int]:
    """(deliveries whose sellerOrderId starts with `prefix`, drivers holding two or more of them).

    Drivers are not freed during a run, so any driver with two of the run's deliveries
    was double booked.
    """
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) AS deliveries,
                      (SELECT count(*) FROM (
                          SELECT driver_id FROM deliveries WHERE seller_order_id LIKE $1 || '-%'
                          GROUP BY driver_id HAVING count(*) > 1) AS twice) AS doubled
               FROM deliveries WHERE seller_order_id LIKE $1 || '-%'""",
            prefix,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["deliveries"]), int(row["doubled"])
