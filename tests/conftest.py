"""Session PostgreSQL and Redis (embedded unless given by env), per-test clients, Ray guard."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import asyncpg
import pytest
import ray
from redis.asyncio import Redis

from dispatcher.embedded import EmbeddedPostgres, EmbeddedRedis
from dispatcher.store.migrate import migrate_dsn
from tests.support import ALL_TABLES

# Ray, the ingress and the webhook receiver, shared by tests/integration and tests/faults;
# the run's order (quick tests first) and CI's time budget for the long ones.
pytest_plugins = ["tests.support.fixtures", "tests.support.time_budget"]

PG_URL_ENV = "DISPATCHER_TEST_DATABASE_URL"
REDIS_URL_ENV = "DISPATCHER_TEST_REDIS_URL"
TEST_DATABASE = "dispatcher_test"
# RESTART IDENTITY keeps bigserial ids independent of which tests ran before.
TRUNCATE_SQL = f"TRUNCATE {', '.join(ALL_TABLES)} RESTART IDENTITY CASCADE"
# A test that leaks a checked-out connection must not hang the whole session.
TEARDOWN_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0

T = TypeVar("T")


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    # A private thread keeps asyncio.run from replacing the main thread's event loop,
    # which pytest-asyncio manages.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _prepare_database(dsn: str) -> None:
    await migrate_dsn(dsn)
    # An external database may hold rows from an earlier, interrupted session.
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    try:
        await conn.execute(TRUNCATE_SQL, timeout=TEARDOWN_TIMEOUT_S)
    finally:
        await conn.close(timeout=TEARDOWN_TIMEOUT_S)


@pytest.fixture(autouse=True)
def _disallow_ray_init(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit tests must not start Ray; integration tests may."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            "ray.init() called from a unit test: mark it integration or use a fake"
        )

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def embedded_pg(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmbeddedPostgres | None]:
    """The session's own PostgreSQL, or None when DISPATCHER_TEST_DATABASE_URL is set."""
    if _env(PG_URL_ENV) is not None:
        yield None
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"), fast=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_dsn(embedded_pg: EmbeddedPostgres | None) -> str:
    """DSN of the migrated test database, emptied once at session start."""
    dsn = _env(PG_URL_ENV)
    if dsn is None:
        assert embedded_pg is not None
        dsn = embedded_pg.create_database(TEST_DATABASE)
    _run_sync(_prepare_database(dsn))
    return dsn


@pytest.fixture(scope="session")
def embedded_redis(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmbeddedRedis | None]:
    """The session's own Redis, or None when DISPATCHER_TEST_REDIS_URL is set."""
    if _env(REDIS_URL_ENV) is not None:
        yield None
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(embedded_redis: EmbeddedRedis | None) -> str:
    url = _env(REDIS_URL_ENV)
    if url is None:
        assert embedded_redis is not None
        url = embedded_redis.url
    return url


@pytest.fixture
async def pg_pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    """A pool on the test database; every table is emptied after the test."""
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=1, max_size=10, timeout=CONNECT_TIMEOUT_S
    )
    try:
        yield pool
    finally:
        try:
            async with pool.acquire(timeout=TEARDOWN_TIMEOUT_S) as conn:
                await conn.execute(TRUNCATE_SQL, timeout=TEARDOWN_TIMEOUT_S)
        finally:
            try:
                await asyncio.wait_for(pool.close(), TEARDOWN_TIMEOUT_S)
            except TimeoutError:
                pool.terminate()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A bytes client on the test Redis; the database is flushed after the test."""
    client = Redis.from_url(
        redis_url, decode_responses=False, socket_connect_timeout=CONNECT_TIMEOUT_S
    )
    try:
        yield client
    finally:
        try:
            await client.flushdb()
        finally:
            await client.aclose()
