"""Fault-suite fixtures: PostgreSQL and Redis of our own (to kill), a receiver on a fixed port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import ray
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from dispatcher.config import ResolvedSettings
from dispatcher.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from dispatcher.store.migrate import migrate_dsn
from dispatcher.webhooks.signing import new_secret
from tests.support.fixtures import FAST, kill_zone_actors
from tests.support.webhooks import WebhookReceiver

T = TypeVar("T")

DATABASE = "dispatcher_faults"
TRUNCATE_SQL = (
    "TRUNCATE zones, drivers, deliveries, delivery_history, webhook_outbox, "
    "webhook_endpoints, driver_events, driver_event_seq, dispatches, offers RESTART IDENTITY CASCADE"
)
# Measured recovery times of this session, printed at its end (and by each test).
RECOVERY: dict[str, float] = {}


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    # pytest-asyncio owns the main thread's loop; a private thread gets its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class OwnServers:
    """A PostgreSQL and a Redis that this suite may stop, kill and restart."""

    pg: EmbeddedPostgres
    redis: EmbeddedRedis
    dsn: str

    def ensure_running(self) -> None:
        if not self.pg.is_running():
            self.pg.start()
        if not self.redis.is_running():
            self.redis.start()


@pytest.fixture(scope="module")
def own_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnServers]:
    """Per module: never the session servers, which other tests rely on."""
    root = tmp_path_factory.mktemp("fault-servers")
    pg = EmbeddedPostgres(root / "postgres", fast=True)
    redis = EmbeddedRedis(root / "redis")
    pg.start()
    redis.start()
    try:
        dsn = pg.create_database(DATABASE)
        _run_sync(migrate_dsn(dsn))
        yield OwnServers(pg, redis, dsn)
    finally:
        redis.stop()
        pg.stop()


async def _reset(dsn: str, redis_url: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(TRUNCATE_SQL, timeout=10)
    finally:
        await conn.close(timeout=10)
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        await client.flushall()
    finally:
        await client.aclose()


@pytest.fixture
async def fault_stack(own_servers: OwnServers) -> AsyncIterator[OwnServers]:
    """Both servers up and empty at the start of a test, whatever the last one did."""
    own_servers.ensure_running()
    await _reset(own_servers.dsn, own_servers.redis.url)
    yield own_servers
    own_servers.ensure_running()


@pytest.fixture
async def own_pool(fault_stack: OwnServers) -> AsyncIterator[asyncpg.Pool]:
    """A pool on our own database for checks; it survives the server's restarts."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        fault_stack.dsn, min_size=1, max_size=4, timeout=5, command_timeout=10
    )
    yield pool
    try:
        await asyncio.wait_for(pool.close(), 10)
    except TimeoutError:
        pool.terminate()


@pytest.fixture
async def own_redis(fault_stack: OwnServers) -> AsyncIterator[Redis]:
    # Retries ride over the restarts the tests cause: a check must not fail on a stale socket.
    client = Redis.from_url(
        fault_stack.redis.url,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 5),
        retry_on_error=[RedisConnectionError, TimeoutError],
    )
    yield client
    with contextlib.suppress(Exception):
        await client.aclose()


@pytest.fixture
async def scripted_receiver() -> AsyncIterator[WebhookReceiver]:
    """A verifying webhook receiver that can go down and come back on the same port."""
    hooks = WebhookReceiver(secret=new_secret(), port=free_port())
    await hooks.start()
    yield hooks
    await hooks.stop()


@pytest.fixture
def fault_settings(
    fault_stack: OwnServers, scripted_receiver: WebhookReceiver, tmp_path: Path
) -> Callable[..., ResolvedSettings]:
    """Settings over our own servers, FAST knobs, a namespace of the test's own."""

    def make(**overrides: Any) -> ResolvedSettings:
        values: dict[str, Any] = {
            "database_url": fault_stack.dsn,
            "redis_url": fault_stack.redis.url,
            "data_dir": tmp_path / "data",
            "vendure_webhook_url": scripted_receiver.url,
            "vendure_webhook_secret": scripted_receiver.secret,
            "inbound_secret": new_secret(),
            "admin_token": "adm_fault_" + uuid.uuid4().hex,
            **FAST,
            "ray_namespace": "faults-" + uuid.uuid4().hex[:8],
            **overrides,
        }
        return ResolvedSettings.model_validate(values)

    return make


@pytest.fixture
def zone_actors_cleanup(ray_session: None) -> Iterator[None]:
    """Zone actors are detached: end them however the test ended."""
    yield
    if ray.is_initialized():
        kill_zone_actors()


@pytest.fixture
def recovery() -> Callable[[str, float], None]:
    """Record a measured recovery time: printed now and in the session summary."""

    def record(name: str, seconds: float) -> None:
        RECOVERY[name] = round(seconds, 3)
        print(f"RECOVERY {name}: {seconds:.3f} s")
        print("RECOVERY_TIMES " + json.dumps(RECOVERY, sort_keys=True))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RECOVERY:
        terminalreporter.section("fault recovery times (s)")
        for name, seconds in sorted(RECOVERY.items()):
            terminalreporter.write_line(f"{name:<55} {seconds:8.3f}")
        terminalreporter.write_line(
            "RECOVERY_TIMES " + json.dumps(RECOVERY, sort_keys=True)
        )
