"""Multi-node harness: operator commands and a steady load over several ingress replicas."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from dispatcher.config import ResolvedSettings
from dispatcher.embedded import free_port
from dispatcher.errors import PROBLEM_BASE
from dispatcher.zoning import Zoning
from tests.support import (
    BERLIN,
    WAIT_CEILING_S,
    Api,
    Driver,
    Point,
    offset,
    point_in,
    zone_cells,
)
from tests.support.faults import (
    ScriptedReceiver,
    ServeProcess,
    remote_api,
    serve_env,
    wait_until,
)
from tests.support.raycluster import FAST_NODE_LOSS, LocalRayCluster

# Errors a careful client (Vendure, a driver app) retries on.
RETRYABLE_STATUS = (502, 503, 504)
# `dispatcher serve` processes sharing the zones, and drivers online in each zone.
REPLICAS = 2
DRIVERS_PER_ZONE = 30


async def run_zones(
    env: Mapping[str, str], *args: str, timeout_s: float
) -> tuple[int, str, str]:
    """Run `dispatcher zones <args>` as an operator would: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        "zones",
        *args,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def zones_table(env: Mapping[str, str]) -> str:
    """`dispatcher zones list` as an operator reads it (the table, not --json)."""
    returncode, out, err = await run_zones(env, "list", timeout_s=WAIT_CEILING_S)
    assert returncode == 0, err[-3000:]
    return out


async def zones_command(
    env: Mapping[str, str], *args: str, timeout_s: float = 900.0, check: bool = True
) -> dict[str, Any]:
    """Run `dispatcher zones <args> --json` as an operator would; its parsed output
    (with `check`, only if it exited 0; "returncode" is in the result)."""
    returncode, out, err = await run_zones(env, *args, "--json", timeout_s=timeout_s)
    assert returncode == 0 or not check, (
        f"dispatcher zones {' '.join(args)}: {returncode}\n{err[-3000:]}"
    )
    result: dict[str, Any] = json.loads(out)
    result["stderr"] = err
    result["returncode"] = returncode
    return result


async def placements(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """zone id -> its `dispatcher zones list` entry, once every zone answered the listing
    (on a busy machine a zone can miss the listing's deadline and show `unreachable`)."""
    deadline = time.monotonic() + WAIT_CEILING_S
    while True:
        listing = await zones_command(env, "list")
        found = {z["zone_id"]: z for z in listing["zones"]}
        if (
            all(z["state"] != "unreachable" for z in found.values())
            or time.monotonic() > deadline
        ):
            return found
        await asyncio.sleep(0.5)


async def standbys(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """zone id -> its standby's `dispatcher zones list` entry (zones that have one)."""
    listing = await zones_command(env, "list")
    return {z["zone_id"]: z for z in listing["standbys"]}


async def zone_call_retries(apis: Sequence[Api]) -> int:
    """Zone calls the ingress replicas retried (a zone restarted, moved or was fenced)."""
    return await counter_total(apis, "dispatcher_zone_call_retries_total")


async def counter_total(apis: Sequence[Api], name: str) -> int:
    """A counter of /metrics summed over the ingress replicas."""
    total = 0.0
    for api in apis:
        resp = await api.client.get("/metrics", headers=api.admin)
        assert resp.status == 200
        for line in (await resp.text()).splitlines():
            if line.startswith(f"{name} "):
                total += float(line.split()[1])
    return int(total)


@dataclass
class Sent:
    """One logical request and its final answer (after retries)."""

    zone_id: str
    sent_at: float
    done_at: float = 0.0
    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    retries: int = 0


def problem_code(raw: bytes) -> str:
    """The code of one of our RFC 9457 problem bodies (its type after PROBLEM_BASE), to
    tell a zone that could not answer from a database that could not; "?" otherwise."""
    try:
        problem = json.loads(raw)
    except ValueError:
        return "?"
    kind = problem.get("type") if isinstance(problem, dict) else None
    if isinstance(kind, str) and kind.startswith(PROBLEM_BASE):
        return kind.removeprefix(PROBLEM_BASE)
    return "?"


@dataclass
class SteadyLoad:
    """Orders and pings through every ingress replica, each retried until answered.

    Records every final answer, so a test can check that nothing acknowledged was lost
    and can time when each zone answered again after a fault.
    """

    apis: Sequence[Api]
    zoning: Zoning
    cells: Sequence[str]
    drivers: dict[str, tuple[Driver, Point, str]] = field(default_factory=dict)
    orders: dict[str, Sent] = field(default_factory=dict)
    pings: list[Sent] = field(default_factory=list)
    # driver id -> (recordedAt, lat, lon) of its newest acknowledged fix
    acked_fix: dict[str, tuple[datetime, float, float]] = field(default_factory=dict)
    retried: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    _apis: Any = None

    def __post_init__(self) -> None:
        self._apis = itertools.cycle(self.apis)

    def _next_api(self) -> Api:
        api: Api = next(self._apis)
        return api

    async def add_drivers(self, per_zone: int) -> None:
        async def one(cell: str, n: int) -> None:
            home = point_in(self.rng, self.zoning, cell)
            driver = await self.apis[n % len(self.apis)].online_driver(
                *home, name=f"{cell}-{n}"
            )
            self.drivers[driver.driver_id] = (driver, home, cell)

        jobs = [one(cell, n) for cell in self.cells for n in range(per_zone)]
        for start in range(0, len(jobs), 20):
            await asyncio.gather(*jobs[start : start + 20])

    async def _until_answered(
        self, sent: Sent, request: Any, retry_s: float = 0.2
    ) -> None:
        """Retry one request (same body, same id) until it gets a final answer."""
        while True:
            try:
                async with asyncio.timeout(30):
                    resp = await request(self._next_api())
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.retried[type(exc).__name__] += 1
                sent.retries += 1
                await asyncio.sleep(retry_s)
                continue
            if status in RETRYABLE_STATUS:
                self.retried[f"{status} {problem_code(raw)}"] += 1
                sent.retries += 1
                await asyncio.sleep(retry_s)
                continue
            sent.status, sent.done_at = status, time.monotonic()
            sent.body = json.loads(raw) if raw else {}
            return

    async def order_worker(self, interval_s: float) -> None:
        while not self.stop.is_set():
            await self.order(self.rng.choice(self.cells))
            await asyncio.sleep(interval_s)

    async def order(self, cell: str, retry_s: float = 0.2) -> Sent:
        """One order picked up in `cell`, retried until it gets its final answer."""
        pickup = point_in(self.rng, self.zoning, cell)
        seller_order_id = "SO-" + uuid.uuid4().hex[:12]
        sent = Sent(cell, time.monotonic())
        self.orders[seller_order_id] = sent
        await self._until_answered(
            sent,
            functools.partial(
                Api.order,
                seller_order_id=seller_order_id,
                lat=pickup[0],
                lon=pickup[1],
            ),
            retry_s,
        )
        return sent

    async def ping_worker(self, interval_s: float) -> None:
        ids = sorted(self.drivers)
        for index in itertools.count(self.rng.randrange(len(ids))):
            if self.stop.is_set():
                return
            driver, home, cell = self.drivers[ids[index % len(ids)]]
            # A few metres around home, never an implausible jump, and never across the cell's
            # border (that would open an eighth zone).
            while True:
                lat, lon = offset(
                    *home,
                    self.rng.uniform(-0.005, 0.005),
                    self.rng.uniform(-0.005, 0.005),
                )
                if self.zoning.zone_of(lat, lon) == cell:
                    break
            at = datetime.now(UTC)
            sent = Sent(cell, time.monotonic())
            self.pings.append(sent)
            await self._until_answered(
                sent,
                functools.partial(
                    Api.ping, driver=driver, lat=lat, lon=lon, recorded_at=at
                ),
            )
            assert sent.status == 204, sent.body
            newest = self.acked_fix.get(driver.driver_id)
            if newest is None or newest[0] < at:
                self.acked_fix[driver.driver_id] = (at, lat, lon)
            await asyncio.sleep(interval_s)

    async def until_it_has_flowed(self, *, orders: int = 20, pings: int = 100) -> None:
        """Keep the load going until more than `orders` orders and `pings` pings were sent.

        A fault test's verdict needs traffic around the fault, and a slow machine sends
        less in the same seconds: wait for the traffic, not for a number of seconds.
        """

        async def flowed() -> bool:
            return len(self.orders) > orders and len(self.pings) > pings

        await wait_until(
            flowed, interval_s=0.2, what=f"{orders} orders and {pings} pings sent"
        )

    @contextlib.asynccontextmanager
    async def running(
        self, *, order_workers: int = 3, ping_workers: int = 4
    ) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(self.order_worker(0.1)) for _ in range(order_workers)
        ]
        tasks += [
            asyncio.create_task(self.ping_worker(0.02)) for _ in range(ping_workers)
        ]
        try:
            yield
        finally:
            self.stop.set()
            async with asyncio.timeout(120):
                await asyncio.gather(*tasks)

    # ---- what the run shows ------------------------------------------------------------

    def answered_again(self, zones: Sequence[str], since: float) -> dict[str, float]:
        """zone -> seconds from `since` until an order sent after it was answered.

        Orders only: pings are written behind, so their answer does not wait for the
        zone and says nothing about whether it is back.
        """
        out: dict[str, float] = {}
        for sent in self.orders.values():
            if sent.zone_id in zones and sent.sent_at >= since and sent.done_at:
                seconds = sent.done_at - since
                out[sent.zone_id] = min(out.get(sent.zone_id, seconds), seconds)
        return out

    async def assert_nothing_lost(self, pool: asyncpg.Pool) -> None:
        """Every acknowledged order and fix is in PostgreSQL as it was answered."""
        for api in self.apis:
            await api.settle()  # acknowledged fixes are written behind
        assert all(s.status == 200 for s in self.orders.values()), Counter(
            s.status for s in self.orders.values()
        )
        rows = {
            r["seller_order_id"]: r
            for r in await pool.fetch(
                "SELECT seller_order_id, driver_id FROM deliveries"
            )
        }
        for seller_order_id, sent in self.orders.items():
            if sent.body["assigned"]:
                assert rows[seller_order_id]["driver_id"] == sent.body["driverId"], (
                    seller_order_id
                )
            else:
                assert seller_order_id not in rows, seller_order_id
        assert set(rows) <= set(self.orders), "a delivery nobody asked for"
        stored = {
            r["id"]: r
            for r in await pool.fetch(
                "SELECT id, lat, lon, location_recorded_at FROM drivers"
            )
        }
        for driver_id, (at, lat, lon) in self.acked_fix.items():
            row = stored[driver_id]
            assert row["location_recorded_at"] >= at, (
                f"{driver_id}: acknowledged fix at {at} lost"
            )
            if row["location_recorded_at"] == at:
                assert (row["lat"], row["lon"]) == (lat, lon), driver_id


@dataclass
class ClusterStack:
    cluster: LocalRayCluster
    settings: ResolvedSettings
    env: dict[str, str]
    apis: list[Api]
    load: SteadyLoad


@contextlib.asynccontextmanager
async def cluster_stack(
    workers: int,
    make_settings: Callable[..., ResolvedSettings],
    tmp_path: Path,
    **overrides: Any,
) -> AsyncIterator[ClusterStack]:
    """`workers` worker nodes, REPLICAS `dispatcher serve` processes sharing the zones,
    and drivers online in the seven zones around Berlin."""
    cluster = LocalRayCluster(system_config=FAST_NODE_LOSS)
    replicas: list[ServeProcess] = []
    try:
        for _ in range(workers):
            cluster.add_worker()
        settings = make_settings(
            ray_address=cluster.address,
            zone_resource_units=1,
            heartbeat_ttl_s=600,
            search_radius_km=8.0,
            **overrides,
        )
        env = serve_env(settings, port=0)
        for n in range(REPLICAS):
            replica = ServeProcess(
                serve_env(settings, port=free_port()), tmp_path / f"serve-{n}.log"
            )
            replicas.append(replica)
        await asyncio.gather(*(r.start() for r in replicas))
        async with contextlib.AsyncExitStack() as stack:
            apis = [
                await stack.enter_async_context(
                    remote_api(f"http://127.0.0.1:{r.env['DISPATCHER_PORT']}", settings)
                )
                for r in replicas
            ]
            zoning = Zoning(settings.zone_resolution)
            load = SteadyLoad(apis, zoning, zone_cells(zoning.zone_of(*BERLIN)))
            await load.add_drivers(DRIVERS_PER_ZONE)
            yield ClusterStack(cluster, settings, env, apis, load)
    finally:
        for replica in replicas:
            await replica.stop()
        await asyncio.to_thread(cluster.shutdown)


async def assert_webhooks_exactly_once(
    pool: asyncpg.Pool, hooks: ScriptedReceiver, load: SteadyLoad
) -> None:
    """Every delivery's `delivery.assigned` arrived, each webhook-id accepted once."""

    async def drained() -> bool:
        pending = await pool.fetchval(
            "SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL"
        )
        return bool(pending == 0)

    await wait_until(drained, within_s=60, what="outbox drained")
    delivered = hooks.delivered()
    assert delivered and max(delivered.values()) == 1, [
        i for i, n in delivered.items() if n > 1
    ]
    bodies = hooks.bodies().values()
    assigned = Counter(
        b["data"]["sellerOrderId"] for b in bodies if b["type"] == "delivery.assigned"
    )
    booked = {s for s, sent in load.orders.items() if sent.body["assigned"]}
    assert set(assigned) == booked
    assert max(assigned.values()) == 1


async def node_states(env: Mapping[str, str]) -> dict[str, str]:
    """node id -> its state in `dispatcher zones list` (open, closed, dying, no-room)."""
    listing = await zones_command(env, "list")
    return {n["node_id"]: n["state"] for n in listing["nodes"]}
