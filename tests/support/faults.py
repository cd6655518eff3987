"""Fault-suite helpers: a scriptable receiver, mirror/truth comparisons, a real `dispatcher serve`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg
import ray
from redis.asyncio import Redis

from dispatcher.actors.options import zone_actor_name
from dispatcher.config import ResolvedSettings
from dispatcher.geo import haversine_km
from dispatcher.store import keys
from tests.support import Api, as_text
from tests.support.waits import wait_until as wait_until
from tests.support.webhooks import WebhookReceiver

# The fault suites' name for the one receiver (it can go down and come back on its port).
ScriptedReceiver = WebhookReceiver

# GEO positions are 52-bit geohashes: well under a metre off.
GEO_TOLERANCE_KM = 0.002


# ---- load tasks ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def background(
    *coros: Coroutine[Any, Any, None],
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run load tasks; on leaving, wait for them (they watch a stop flag) or cancel them on error."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield tasks
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    await asyncio.gather(*tasks)


# ---- PostgreSQL truth vs the Redis mirror --------------------------------------------------

DISPATCHABLE_SQL = """
SELECT id, zone_id, lat, lon FROM drivers
WHERE status = 'AVAILABLE' AND is_active AND lat IS NOT NULL
  AND last_seen_at > now() - make_interval(secs => $1)
"""


async def dispatchable_by_zone(
    pool: asyncpg.Pool, ttl_s: float
) -> dict[str, dict[str, tuple[float, float]]]:
    """zone -> {driver id: (lat, lon)} of every dispatchable driver, per PostgreSQL."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for row in await pool.fetch(DISPATCHABLE_SQL, ttl_s):
        out.setdefault(row["zone_id"], {})[row["id"]] = (row["lat"], row["lon"])
    return out


async def mirror_by_zone(redis: Redis) -> dict[str, dict[str, tuple[float, float]]]:
    """zone -> {driver id: (lat, lon)} of every member of every zone GEO key in Redis."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    async for key in redis.scan_iter(match=keys.zone_geo("*")):
        name = key.decode() if isinstance(key, bytes) else str(key)
        zone = name[len(keys.PREFIX + "zone:") : -len(":geo")]
        members = sorted(as_text(await redis.zrange(name, 0, -1)))
        positions = await redis.geopos(name, *members) if members else []
        out[zone] = {
            m: (float(p[1]), float(p[0]))
            for m, p in zip(members, positions, strict=True)
            if p is not None
        }
    return {z: m for z, m in out.items() if m}


async def mirror_diff(pool: asyncpg.Pool, redis: Redis, ttl_s: float) -> list[str]:
    """Every way the mirror differs from the dispatchable set (invariant 3, docs/API.md#invariants)."""
    truth = await dispatchable_by_zone(pool, ttl_s)
    mirror = await mirror_by_zone(redis)
    problems: list[str] = []
    for zone in sorted(set(truth) | set(mirror)):
        want, have = truth.get(zone, {}), mirror.get(zone, {})
        if missing := sorted(set(want) - set(have)):
            problems.append(f"zone {zone}: missing {missing}")
        if stale := sorted(set(have) - set(want)):
            problems.append(f"zone {zone}: stale {stale}")
        for driver in set(want) & set(have):
            if haversine_km(*want[driver], *have[driver]) > GEO_TOLERANCE_KM:
                problems.append(
                    f"zone {zone}: {driver} at {have[driver]}, PostgreSQL says {want[driver]}"
                )
    return problems


async def zones_built(pool: asyncpg.Pool, redis: Redis) -> bool:
    """Every known zone has its `:built` marker (Redis knows it was rebuilt)."""
    zones = [r["zone_id"] for r in await pool.fetch("SELECT zone_id FROM zones")]
    return all([await redis.exists(keys.zone_built(z)) for z in zones])


async def assert_booking_invariants(pool: asyncpg.Pool) -> None:
    """Invariants 1 and 2 (docs/API.md#invariants), and one `delivery.assigned` outbox row per delivery."""
    doubled = await pool.fetch(
        """SELECT driver_id, count(*) FROM deliveries WHERE status IN ('ASSIGNED', 'PICKED_UP')
           GROUP BY driver_id HAVING count(*) > 1"""
    )
    assert not doubled, f"drivers with two active deliveries: {doubled}"
    busy_mismatch = await pool.fetch(
        """SELECT d.id, d.status FROM drivers d
           WHERE (d.status = 'BUSY') <> EXISTS (
               SELECT 1 FROM deliveries x WHERE x.driver_id = d.id AND x.status IN ('ASSIGNED', 'PICKED_UP'))"""
    )
    assert not busy_mismatch, (
        f"BUSY without an active delivery, or the reverse: {busy_mismatch}"
    )
    outbox = await pool.fetch(
        """SELECT d.seller_order_id, count(o.id) AS n FROM deliveries d
           LEFT JOIN webhook_outbox o
             ON o.seller_order_id = d.seller_order_id AND o.event_type = 'delivery.assigned'
           GROUP BY d.seller_order_id HAVING count(o.id) <> 1"""
    )
    assert not outbox, (
        f"deliveries without exactly one delivery.assigned event: {outbox}"
    )


# ---- Ray -----------------------------------------------------------------------------------


def zone_actor_handle(zone_id: str, namespace: str) -> Any:
    return ray.get_actor(zone_actor_name(zone_id), namespace=namespace)


def zone_actor_pid(zone_id: str, namespace: str) -> int:
    """The pid of the worker process that runs the zone's actor now (from the GCS)."""
    from ray._private import state as ray_state

    actor_id: str = zone_actor_handle(zone_id, namespace)._actor_id.hex()
    actors = cast(Callable[..., dict[str, Any]], ray_state.actors)
    info: Mapping[str, Any] = actors(actor_id=actor_id)
    assert info["State"] == "ALIVE", info["State"]
    pid = int(info["Pid"])
    assert pid > 0
    return pid


# ---- a real `dispatcher serve` -------------------------------------------------------------


def serve_env(settings: ResolvedSettings, *, port: int) -> dict[str, str]:
    """The environment that makes `dispatcher serve` run with `settings` on `port`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    values: dict[str, Any] = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "RAY_ADDRESS": settings.ray_address,
        "RAY_NAMESPACE": settings.ray_namespace,
        "DATA_DIR": str(settings.data_dir),
        "VENDURE_WEBHOOK_URL": settings.vendure_webhook_url,
        "VENDURE_WEBHOOK_SECRET": settings.vendure_webhook_secret,
        "INBOUND_SECRET": settings.inbound_secret,
        "ADMIN_TOKEN": settings.admin_token,
        "HEARTBEAT_TTL_S": settings.heartbeat_ttl_s,
        "SEARCH_RADIUS_KM": settings.search_radius_km,
        "ZONE_RESOLUTION": settings.zone_resolution,
        "ZONE_RESOURCE_UNITS": settings.zone_resource_units,
        "ZONE_STANDBY": str(settings.zone_standby).lower(),
        "SWEEP_INTERVAL_S": settings.sweep_interval_s,
        "RECONCILE_INTERVAL_S": settings.reconcile_interval_s,
        "WEBHOOK_TIMEOUT_S": settings.webhook_timeout_s,
        "WEBHOOK_SCHEDULE_S": json.dumps(list(settings.webhook_schedule_s)),
        "WEBHOOK_POLL_INTERVAL_S": settings.webhook_poll_interval_s,
        "HOST": "127.0.0.1",
        "PORT": port,
        "LOG_LEVEL": "INFO",
    }
    env.update({f"DISPATCHER_{k}": str(v) for k, v in values.items() if v is not None})
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServeProcess:
    """`python -m dispatcher.cli serve` in its own process group; stderr goes to a log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *, within_s: float = 90.0) -> float:
        """Start and wait for `dispatcher listening on`; returns the seconds it took."""
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "dispatcher.cli",
                "serve",
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        async with asyncio.timeout(within_s):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"dispatcher serve exited: {self.log_tail()}")
                if line.startswith(b"dispatcher listening on"):
                    return time.monotonic() - started

    def log_tail(self, size: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-size:]

    async def kill(self) -> None:
        """SIGKILL the whole process group, as a crash (OOM kill, node loss) would."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await self.proc.wait()
        except TimeoutError:
            await self.kill()


@contextlib.asynccontextmanager
async def remote_api(base_url: str, settings: ResolvedSettings) -> AsyncIterator[Api]:
    """An `Api` speaking real HTTP to an out-of-process ingress."""
    async with aiohttp.ClientSession(base_url=base_url) as session:
        yield Api(cast(Any, session), settings)


async def read_answer(resp: Any) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers of a response, released."""
    body: bytes = await resp.read()
    return resp.status, body, dict(resp.headers)
