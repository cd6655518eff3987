"""Embedded PostgreSQL/Redis lifecycles and migrations, against real server processes."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from dispatcher.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError
from dispatcher.store.migrate import load_migrations, migrate, migrate_dsn
from tests.support import CORE_TABLES

pytestmark = pytest.mark.integration


async def _fetchval(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _redis_ping(url: str) -> bool:
    client = Redis.from_url(url, socket_connect_timeout=2)
    try:
        return bool(await client.ping())
    except RedisConnectionError:
        return False
    finally:
        await client.aclose()


def _processes_mentioning(path: Path) -> list[int]:
    """Pids whose command line names `path`: what a failed start must not leave."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(path).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
async def fresh_dsn(pg_dsn: str) -> AsyncIterator[str]:
    """An empty database next to the test database, dropped afterwards."""
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    await _execute(pg_dsn, f'CREATE DATABASE "{name}"')
    try:
        yield urlsplit(pg_dsn)._replace(path=f"/{name}").geturl()
    finally:
        await _execute(pg_dsn, f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_postgres_restart_and_crash_keep_port_and_data(tmp_path: Path) -> None:
    # fsync stays on: the committed row must survive the SIGKILL below.
    pg = EmbeddedPostgres(tmp_path / "pg")
    await asyncio.to_thread(pg.start)
    try:
        dsn = pg.dsn
        await _execute(dsn, "CREATE TABLE t (v int); INSERT INTO t VALUES (42)")

        await asyncio.to_thread(pg.stop)
        assert not pg.is_running()
        with pytest.raises(OSError):
            await asyncpg.connect(dsn, timeout=2)

        await asyncio.to_thread(pg.start)
        assert pg.dsn == dsn
        await _execute(dsn, "INSERT INTO t VALUES (43)")

        await asyncio.to_thread(pg.kill)
        assert not pg.is_running()
        await asyncio.to_thread(pg.start)
        assert pg.dsn == dsn
        assert await _fetchval(dsn, "SELECT array_agg(v ORDER BY v) FROM t") == [42, 43]
        assert await _fetchval(dsn, "SHOW max_connections") == "200"
        assert await _fetchval(dsn, "SHOW fsync") == "on"
    finally:
        await asyncio.to_thread(pg.stop)


async def test_postgres_reuses_cluster_and_adopts_running_server(
    tmp_path: Path,
) -> None:
    first = EmbeddedPostgres(tmp_path / "pg", fast=True)
    await asyncio.to_thread(first.start)
    try:
        app_dsn = await asyncio.to_thread(first.create_database, "app")
        assert await asyncio.to_thread(first.create_database, "app") == app_dsn
        assert await _fetchval(first.dsn, "SHOW fsync") == "off"

        # A second process on the same data dir attaches instead of failing on
        # postmaster.pid or starting a twin.
        second = EmbeddedPostgres(tmp_path / "pg", fast=True)
        await asyncio.to_thread(second.start)
        assert (second.port, second.pid) == (first.port, first.pid)
    finally:
        await asyncio.to_thread(first.stop)
    assert not second.is_running()

    # A later `dispatcher serve`: the cluster exists, so no initdb, same databases.
    third = EmbeddedPostgres(tmp_path / "pg", fast=True)
    with third:
        assert (
            await _fetchval(third.dsn_for("app"), "SELECT current_database()") == "app"
        )
    assert not third.is_running()


async def test_postgres_failed_start_leaves_no_process(
    tmp_path: Path, busy_port: int
) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg", port=busy_port, fast=True)
    with pytest.raises(EmbeddedServerError, match="Address already in use"):
        await asyncio.to_thread(pg.start)
    assert not pg.is_running()
    assert _processes_mentioning(pg.data_dir) == []


async def test_redis_restart_and_crash_keep_port(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    try:
        url = server.url
        client = Redis.from_url(url)
        try:
            await client.set("k", "v")
        finally:
            await client.aclose()

        await asyncio.to_thread(server.stop)
        assert not server.is_running()
        assert not await _redis_ping(url)

        await asyncio.to_thread(server.start)
        assert server.url == url
        client = Redis.from_url(url)
        try:
            # Memory only: the GEO mirror is rebuilt from PostgreSQL, never reloaded.
            assert await client.get("k") is None
            assert await client.config_get("save") == {"save": ""}
        finally:
            await client.aclose()

        await asyncio.to_thread(server.kill)
        assert not server.is_running()
        await asyncio.to_thread(server.start)
        assert server.url == url
        assert await _redis_ping(url)
    finally:
        await asyncio.to_thread(server.stop)
    assert not server.is_running()


async def test_redis_failed_start_leaves_no_process(
    tmp_path: Path, busy_port: int
) -> None:
    server = EmbeddedRedis(tmp_path / "redis", port=busy_port)
    with pytest.raises(EmbeddedServerError, match="Address already in use"):
        await asyncio.to_thread(server.start)
    assert not server.is_running()
    assert _processes_mentioning(server.data_dir) == []


async def test_migrate_is_idempotent(fresh_dsn: str) -> None:
    names = [m.name for m in load_migrations()]
    assert names == sorted(names)
    assert "001_init.sql" in names
    assert await migrate_dsn(fresh_dsn) == names
    assert await migrate_dsn(fresh_dsn) == []


async def test_concurrent_migrations_apply_each_file_once(fresh_dsn: str) -> None:
    conns = [await asyncpg.connect(fresh_dsn, timeout=5) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in conns))
        names = [m.name for m in load_migrations()]
        assert sorted(results) == [[]] * 4 + [names]

        rows = await conns[0].fetch(
            "SELECT name, count(*) AS n FROM schema_migrations GROUP BY name ORDER BY name"
        )
        assert [(row["name"], row["n"]) for row in rows] == [(n, 1) for n in names]
        for table in CORE_TABLES:
            assert (
                await conns[0].fetchval("SELECT to_regclass($1)::text", table) == table
            )
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))


async def test_session_fixtures_serve_migrated_database(
    pg_pool: asyncpg.Pool[asyncpg.Record], redis_client: Redis
) -> None:
    async with pg_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(
            load_migrations()
        )
        await conn.execute("INSERT INTO zones (zone_id) VALUES ('z1')")
    assert await redis_client.ping()
    await redis_client.set(b"k", b"v")
    assert await redis_client.get(b"k") == b"v"
