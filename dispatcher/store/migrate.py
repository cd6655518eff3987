"""Schema migrations: apply store/migrations/*.sql once each, in filename order."""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any, NamedTuple

import asyncpg
from asyncpg.pool import PoolConnectionProxy

logger = logging.getLogger(__name__)

# Fixed key for pg_advisory_lock: serialises migrators across processes on one database.
# The bytes spell "dispmigr", so it is recognisable in pg_locks.
MIGRATION_LOCK_KEY = 0x646973706D696772
# A migrator waits this long for another process to finish migrating before giving up.
LOCK_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 10.0

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class Migration(NamedTuple):
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Every packaged migration, sorted by filename."""
    folder = resources.files("dispatcher.store").joinpath("migrations")
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(f.name, f.read_text(encoding="utf-8")) for f in files]


async def migrate(
    conn: asyncpg.Connection[Any] | PoolConnectionProxy[Any],
) -> list[str]:
    """Apply the migrations `conn`'s database lacks, each in its own transaction.

    Safe to run twice and from several processes at once: migrators queue on an
    advisory lock, and each one re-reads the ledger after getting it.

    Returns:
        The names applied by this call, in order (empty when up to date).
    """
    await conn.execute(
        "SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY, timeout=LOCK_TIMEOUT_S
    )
    try:
        await conn.execute(_CREATE_LEDGER)
        rows = await conn.fetch("SELECT name FROM schema_migrations")
        done = {row["name"] for row in rows}
        applied: list[str] = []
        for migration in load_migrations():
            if migration.name in done:
                continue
            logger.info("applying migration %s", migration.name)
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name) VALUES ($1)", migration.name
                )
            applied.append(migration.name)
        return applied
    finally:
        # A broken connection has already dropped its session lock.
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def migrate_dsn(dsn: str) -> list[str]:
    """Connect to `dsn`, migrate, and close; returns the names applied."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        return await migrate(conn)
    finally:
        await conn.close(timeout=CLOSE_TIMEOUT_S)
