"""PostgreSQL plumbing: pool creation, SQLSTATE translation, zone epochs (fencing)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from dispatcher.errors import DatabaseUnavailableError

log = logging.getLogger(__name__)

# A pool acquire that waits longer than this means PostgreSQL is gone or saturated;
# answering 503 quickly beats holding the request.
ACQUIRE_TIMEOUT_S = 3.0


def haversine_sql(lat_a: str, lon_a: str, lat_b: str, lon_b: str) -> str:
    """SQL for the km between two points: the formula of dispatcher.geo.haversine_km,
    so both lookup paths compute the same numbers."""
    return f"""(2 * 6372.797560856 * asin(least(1.0, sqrt(
        power(sin(radians({lat_b} - {lat_a}) / 2), 2)
        + cos(radians({lat_a})) * cos(radians({lat_b}))
          * power(sin(radians({lon_b} - {lon_a}) / 2), 2)))))"""


# Errors that mean "PostgreSQL cannot be reached now", as opposed to a bad statement.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


DOWN_ERRORS: tuple[type[BaseException], ...] = (
    DatabaseUnavailableError,
    *UNAVAILABLE_ERRORS,
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No session reset on release (asyncpg still rolls back an open transaction)."""


async def create_pool(
    dsn: str,
    *,
    max_size: int,
    command_timeout_s: float,
    server_settings: dict[str, str] | None = None,
    stateless: bool = False,
) -> asyncpg.Pool:
    """A pool whose every statement gets `command_timeout_s`.

    `stateless`: its users never LISTEN, take advisory locks or change session settings,
    so a released connection needs no `RESET ALL`/`UNLISTEN *` round trip (zone actors:
    one round trip saved per booking and per ping batch).
    """
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=max_size,
            command_timeout=command_timeout_s,
            timeout=ACQUIRE_TIMEOUT_S,
            server_settings=server_settings,
            # A dead server otherwise leaves idle connections that fail once each.
            max_inactive_connection_lifetime=30.0,
            reset=_keep_session if stateless else None,
        )
    except UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailableError(
            f"PostgreSQL unreachable: {type(exc).__name__}"
        ) from exc
    return pool


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close a pool; a slow or broken close is logged, not raised.

    asyncpg bounds closing each connection by the pool's command timeout and raises
    TimeoutError past it, which a process starved of CPU can hit (a zone handing over
    under load did). The pool terminates its connections all the same, and its owner
    (a zone handing over, an ingress shutting down) must not fail on it."""
    try:
        await pool.close()
    except UNAVAILABLE_ERRORS as exc:
        log.warning("PostgreSQL pool closed uncleanly: %r", exc)


@asynccontextmanager
async def connection(
    pool: asyncpg.Pool,
) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[Any]]:
    """Acquire with a bounded wait; connection failures become DatabaseUnavailableError."""
    try:
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            yield conn
    except UNAVAILABLE_ERRORS as exc:
        log.warning("PostgreSQL unavailable: %s", exc)
        raise DatabaseUnavailableError(
            f"PostgreSQL unavailable: {type(exc).__name__}"
        ) from exc


async def activate_zone(pool: asyncpg.Pool, zone_id: str) -> int:
    """Claim the zone for a new actor incarnation; returns its fencing epoch."""
    async with connection(pool) as conn:
        epoch: int = await conn.fetchval(
            """
            INSERT INTO zones (zone_id, epoch, activated_at) VALUES ($1, 1, now())
            ON CONFLICT (zone_id)
            DO UPDATE SET epoch = zones.epoch + 1, activated_at = now()
            RETURNING epoch
            """,
            zone_id,
        )
    return epoch


# Fixed key for pg_advisory_xact_lock: serialises zone creation across ingress replicas,
# so that counting the zones and adding one is a single step. The bytes spell "dispzone".
ZONE_CREATE_LOCK_KEY = 0x646973707A6F6E65


async def reserve_zone(pool: asyncpg.Pool, zone_id: str, *, max_zones: int) -> bool:
    """Add the zone's row unless `max_zones` zones exist; True if the zone exists now.

    Atomic across concurrent pings and ingress replicas: the count and the insert run
    under one transaction-scoped advisory lock. The row's epoch stays 0 until the
    zone's actor activates it (activate_zone).
    """
    async with connection(pool) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ZONE_CREATE_LOCK_KEY)
        exists: bool = await conn.fetchval(
            """
            WITH added AS (
                INSERT INTO zones (zone_id)
                SELECT $1 WHERE (SELECT count(*) FROM zones) < $2
                ON CONFLICT (zone_id) DO NOTHING
                RETURNING zone_id
            )
            SELECT EXISTS (SELECT 1 FROM added) OR EXISTS (SELECT 1 FROM zones WHERE zone_id = $1)
            """,
            zone_id,
            max_zones,
        )
    return exists


async def known_zones(pool: asyncpg.Pool) -> list[str]:
    async with connection(pool) as conn:
        rows = await conn.fetch("SELECT zone_id FROM zones ORDER BY zone_id")
    return [r["zone_id"] for r in rows]


async def existing_zones(pool: asyncpg.Pool, zone_ids: list[str]) -> list[str]:
    """Those of `zone_ids` that exist."""
    async with connection(pool) as conn:
        rows = await conn.fetch(
            "SELECT zone_id FROM zones WHERE zone_id = ANY($1::text[])", zone_ids
        )
    return [r["zone_id"] for r in rows]


async def ping_database(pool: asyncpg.Pool) -> bool:
    try:
        async with connection(pool) as conn:
            await conn.fetchval("SELECT 1", timeout=1.0)
    except DOWN_ERRORS:
        return False
    return True
