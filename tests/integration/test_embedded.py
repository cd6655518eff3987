"""Embedded PostgreSQL/Redis lifecycles and migrations, against real server processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
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


# A cold `dispatcher serve` runs initdb and starts PostgreSQL, Redis and a local Ray.
SERVE_START_WITHIN_S = 180.0
# PostgreSQL's fast shutdown checkpoints first; Redis stops at once.
PORTS_CLOSE_WITHIN_S = 60.0
# Readers of the servers' output, referenced until the test ends.
_DRAINS: set[asyncio.Task[bytes]] = set()


def _serve_env(data_dir: Path, ray_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DISPATCHER_", "RAY_"))
    }
    # Ray's files live under the test's directory, so its processes can be found and ended.
    env.update({"DISPATCHER_DATA_DIR": str(data_dir), "RAY_TMPDIR": str(ray_dir)})
    return env


async def _start_serve(
    data_dir: Path, ray_dir: Path
) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
    """`dispatcher serve` on a free port; returns it once it listens, with its servers' ports."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        "serve",
        "--port",
        "0",
        env=_serve_env(data_dir, ray_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    printed: list[str] = []
    ports: dict[str, int] = {}
    async with asyncio.timeout(SERVE_START_WITHIN_S):
        while not printed or not printed[-1].startswith("dispatcher listening on"):
            line = await proc.stdout.readline()
            assert line, "serve exited early:\n" + "".join(printed)
            text = line.decode()
            printed.append(text)
            for label, name in (
                ("embedded PostgreSQL: ", "pg"),
                ("embedded Redis: ", "redis"),
            ):
                if text.startswith(label):
                    port = urlsplit(text[len(label) :].strip()).port
                    assert port is not None
                    ports[name] = port
    assert set(ports) == {"pg", "redis"}, "".join(printed)
    ports["http"] = urlsplit(printed[-1].split(" on ", 1)[1].strip()).port or 0
    # Keep reading so a full pipe never blocks the server.
    _DRAINS.add(asyncio.get_running_loop().create_task(proc.stdout.read()))
    return proc, ports


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


async def _wait_closed(ports: dict[str, int]) -> list[str]:
    """Names of the ports still open after PORTS_CLOSE_WITHIN_S."""
    deadline = time.monotonic() + PORTS_CLOSE_WITHIN_S
    while time.monotonic() < deadline:
        if not any(_port_open(p) for p in ports.values()):
            return []
        await asyncio.sleep(0.2)
    return [name for name, port in ports.items() if _port_open(port)]


def _end_leftovers(*paths: Path) -> None:
    """SIGKILL what this test started and left behind (Ray's workers, a surviving server)."""
    for path in paths:
        for pid in _processes_mentioning(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_killed_serve_takes_its_embedded_servers_along(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    first: asyncio.subprocess.Process | None = None
    second: asyncio.subprocess.Process | None = None
    try:
        first, ports = await _start_serve(data_dir, ray_dir)
        assert _port_open(ports["pg"]) and _port_open(ports["redis"])
        token = json.loads((data_dir / "secrets.json").read_text())["admin_token"]
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{ports.pop('http')}"
        ) as http:
            created = await http.post(
                "/drivers",
                json={"name": "Survivor"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert created.status == 201
        os.kill(first.pid, signal.SIGKILL)
        await first.wait()

        # The kernel signals PostgreSQL and Redis when their parent dies.
        assert await _wait_closed(ports) == []
        assert _processes_mentioning(data_dir / "postgres") == []
        assert _processes_mentioning(data_dir / "redis") == []

        # A second serve on the same data dir starts cleanly and has the same data.
        second, again = await _start_serve(data_dir, ray_dir)
        again.pop("http")
        owner = json.loads((data_dir / "postgres" / "owner.json").read_text())
        assert owner["pid"] == second.pid
        dsn = f"postgresql://postgres@127.0.0.1:{again['pg']}/dispatcher"
        assert await _fetchval(dsn, "SELECT name FROM drivers") == "Survivor"
        os.kill(second.pid, signal.SIGINT)
        async with asyncio.timeout(PORTS_CLOSE_WITHIN_S):
            assert await second.wait() == 0
        assert await _wait_closed(again) == []
        assert not (data_dir / "postgres" / "owner.json").exists()
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        _end_leftovers(data_dir, ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


async def test_orphaned_servers_are_reclaimed_by_the_next_start(tmp_path: Path) -> None:
    """Servers whose owner died without them (no parent-death signal) are stopped and replaced."""
    pg = EmbeddedPostgres(tmp_path / "pg", fast=True)
    redis_server = EmbeddedRedis(tmp_path / "redis")
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(redis_server.start)
    orphans = {"pg": pg.pid, "redis": redis_server.pid}
    try:
        # Make their recorded owner a process that has exited.
        gone = await asyncio.create_subprocess_exec("true")
        await gone.wait()
        for server in (pg, redis_server):
            owner_file = server.data_dir / "owner.json"
            owner = json.loads(owner_file.read_text())
            owner_file.write_text(json.dumps({**owner, "pid": gone.pid}))

        pg2 = EmbeddedPostgres(tmp_path / "pg", fast=True)
        redis2 = EmbeddedRedis(tmp_path / "redis")
        await asyncio.to_thread(pg2.start)
        await asyncio.to_thread(redis2.start)
        try:
            assert pg2.pid is not None and pg2.pid != orphans["pg"]
            assert redis2.pid is not None and redis2.pid != orphans["redis"]
            assert not pg.is_running() and not redis_server.is_running()
            assert (pg2.port, redis2.port) == (pg.port, redis_server.port)
            assert await _fetchval(pg2.dsn, "SELECT 1") == 1
            assert await _redis_ping(redis2.url)
            for server in (pg2, redis2):
                owner = json.loads((server.data_dir / "owner.json").read_text())
                assert owner["pid"] == os.getpid()
        finally:
            await asyncio.to_thread(pg2.stop)
            await asyncio.to_thread(redis2.stop)
    finally:
        await asyncio.to_thread(pg.stop)
        await asyncio.to_thread(redis_server.stop)
    assert _processes_mentioning(tmp_path) == []


async def test_die_with_parent_refuses_a_start_from_a_worker_thread(
    tmp_path: Path,
) -> None:
    # The kernel ties the parent-death signal to the forking thread: a server started
    # from a short-lived thread would be killed as soon as that thread ended.
    server = EmbeddedRedis(tmp_path / "redis", die_with_parent=True)
    with pytest.raises(EmbeddedServerError, match="main thread"):
        await asyncio.to_thread(server.start)
    assert not server.is_running()
    assert _processes_mentioning(server.data_dir) == []
