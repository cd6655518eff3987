"""The driver event stream scenario: sockets one ingress holds, memory per socket, and
commit-to-receipt latency beside the order answer latency of the same run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

from dispatcher.bench.memory import service_memory
from dispatcher.bench.options import Options
from dispatcher.bench.progress import Progress
from dispatcher.bench.report import Report
from dispatcher.bench.scale import STREAM_BEGIN as BEGIN, STREAM_END as END
from dispatcher.bench.seed import seed
from dispatcher.bench.stack import Stack
from dispatcher.bench.stats import percentile
from dispatcher.bench.workload import (
    CITY_RADIUS_KM,
    PINGS_CITY,
    Driver,
    disc_points,
    make_drivers,
    order_request,
)

# Orders per second while the sockets are open: a busy city's rate, far below the
# orders scenario's saturation, so the figure is the push path's, not a queue's.
ORDER_RATE = 50.0
# Sockets opened at once while connecting (each costs the ingress two queries).
CONNECT_PARALLEL = 100
# Orders before the measured ones, on drivers of their own (not connected): a zone's
# first orders start its actor and prepare its statements.
WARMUP_ORDERS = 50
# After the last order, events still on their way get this long to arrive.
DRAIN_S = 30.0
ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=300)
# The report's machine entry (bench/report.py machine_info) quoted in the section.
LOAD_KEY = "load average at start (1, 5, 15 min)"


def plan_stream_steps() -> int:
    return 7


@dataclass
class StreamRun:
    sockets: int
    held: int = 0
    connect_s: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    orders: int = 0
    booked: int = 0
    # Seconds from each event's `at` (its row's write, just before the commit) to its
    # arrival at the driver's socket, and from each order's send to its answer.
    receipts: list[float] = field(default_factory=list)
    answers: list[float] = field(default_factory=list)
    misrouted: int = 0
    missing: int = 0
    # Orders that booked one of the warm-up drivers, which have no socket.
    unwatched: int = 0

    @property
    def kib_per_socket(self) -> float:
        return (self.rss_after_mb - self.rss_before_mb) * 1024 / max(self.held, 1)


class _Sockets:
    """The drivers' sockets, read by one task each, arrivals timed."""

    def __init__(self) -> None:
        self.got: dict[str, list[str]] = {}
        self.receipts: list[float] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.arrived = asyncio.Event()

    async def open(
        self, session: aiohttp.ClientSession, base: str, driver: Driver
    ) -> None:
        ws = await session.ws_connect(
            f"{base}/drivers/{driver.driver_id}/events",
            headers={"Authorization": f"Bearer {driver.token}"},
        )
        self.sockets.append(ws)
        self.got[driver.driver_id] = []
        self.tasks.append(asyncio.create_task(self._read(driver.driver_id, ws)))

    async def _read(self, driver_id: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                now = datetime.now(UTC)
                event = json.loads(msg.data)
                self.receipts.append(
                    (now - datetime.fromisoformat(event["at"])).total_seconds()
                )
                self.got[driver_id].append(event["data"]["sellerOrderId"])
                self.arrived.set()

    async def close(self) -> None:
        await asyncio.gather(
            *(ws.close() for ws in self.sockets), return_exceptions=True
        )
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _orders(
    session: aiohttp.ClientSession,
    stack: Stack,
    fleet: list[Driver],
    run: StreamRun,
    duration_s: float,
    prefix: str = "stream",
) -> dict[str, str]:
    """Open loop at ORDER_RATE: each order is placed on a distinct driver's spot.
    Returns sellerOrderId -> the driver the answer named."""
    n = min(math.ceil(ORDER_RATE * duration_s), len(fleet))
    booked: dict[str, str] = {}
    started = time.monotonic()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, started + i / ORDER_RATE - time.monotonic()))
        d = fleet[i]
        spec = order_request(
            f"{prefix}-{i}", (d.lat, d.lon), stack.inbound_secret, int(time.time())
        )
        sent = time.monotonic()
        async with session.post(
            stack.service_url + spec.path, data=spec.body, headers=dict(spec.headers)
        ) as resp:
            body = await resp.json()
        run.answers.append(time.monotonic() - sent)
        if resp.status == 200 and body.get("assigned"):
            booked[body["sellerOrderId"]] = body["driverId"]

    await asyncio.gather(*(one(i) for i in range(n)))
    run.orders = n
    return booked


async def measure_stream(
    options: Options, stack: Stack, progress: Progress
) -> StreamRun:
    """Seed, connect `options.sockets` drivers, order at ORDER_RATE, and time the pushes."""
    run = StreamRun(options.sockets)
    assert stack.service is not None
    pid = stack.service.pid

    def ingress_rss_mb() -> float:
        return next(
            m.rss_mb
            for m in service_memory(pid, stack.ray_tmpdir)
            if m.role == "ingress"
        )

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        timeout=ADMIN_TIMEOUT, connector=connector
    ) as session:
        progress.step(f"stream: seeding {options.sockets:,} drivers in one city")
        points = disc_points(
            random.Random(options.seed),
            PINGS_CITY,
            CITY_RADIUS_KM,
            options.sockets + WARMUP_ORDERS,
        )
        fleet = await seed(
            session,
            stack.service_url,
            stack.admin_token,
            stack.database_url,
            make_drivers(points),
        )
        fleet, spare = fleet[: options.sockets], fleet[options.sockets :]
        await _orders(
            session,
            stack,
            spare,
            StreamRun(0),
            WARMUP_ORDERS / ORDER_RATE,
            prefix="warm",
        )
        sockets = _Sockets()
        try:
            progress.step(f"stream: opening {options.sockets:,} sockets")
            run.rss_before_mb = await asyncio.to_thread(ingress_rss_mb)
            t0 = time.monotonic()
            for start in range(0, len(fleet), CONNECT_PARALLEL):
                await asyncio.gather(
                    *(
                        sockets.open(session, stack.service_url, d)
                        for d in fleet[start : start + CONNECT_PARALLEL]
                    )
                )
            run.connect_s = time.monotonic() - t0
            run.held = await _held(session, stack, len(sockets.sockets))
            run.rss_after_mb = await asyncio.to_thread(ingress_rss_mb)
            progress.step(
                f"stream: orders at {ORDER_RATE:g}/s for {options.sizes.duration_s:g} s",
                options.sizes.duration_s,
            )
            booked = await _orders(session, stack, fleet, run, options.sizes.duration_s)
            run.booked = len(booked)
            progress.step("stream: waiting for the last events")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_S):
                    while sum(len(v) for v in sockets.got.values()) < len(booked):
                        sockets.arrived.clear()
                        await sockets.arrived.wait()
            run.receipts = list(sockets.receipts)
            received = {
                (order, driver)
                for driver, orders in sockets.got.items()
                for order in orders
            }
            run.misrouted = len(received - set(booked.items()))
            # A warm-up order that found its own driver taken books another, and so on:
            # a few measured orders may book a driver that has no socket here.
            watched = {(o, d) for o, d in booked.items() if d in sockets.got}
            run.unwatched = len(booked) - len(watched)
            run.missing = len(watched - received)
        finally:
            progress.step("stream: closing the sockets")
            await sockets.close()
    return run


METRIC = re.compile(r"^dispatcher_driver_sockets ([0-9.eE+]+)$", re.MULTILINE)


async def _held(session: aiohttp.ClientSession, stack: Stack, opened: int) -> int:
    """Sockets the ingress says it holds (its gauge), once all `opened` registered
    (registration follows the handshake by a query) or a minute passed."""
    held = 0
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        async with session.get(f"{stack.service_url}/metrics") as resp:
            found = METRIC.search(await resp.text())
        held = int(float(found.group(1))) if found else 0
        if held >= opened:
            break
        await asyncio.sleep(0.1)
    return held


async def run_stream(options: Options, stack: Stack, progress: Progress) -> StreamRun:
    async with progress.ticking():
        progress.step("starting PostgreSQL and Redis")
        await asyncio.to_thread(stack.start_servers)
        progress.step("starting dispatcher serve (it starts its own Ray)")
        await asyncio.to_thread(
            stack.start_service, extra_env=dict(options.service_env)
        )
        return await measure_stream(options, stack, progress)


def _ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def stream_section(run: StreamRun, report: Report) -> str:
    r50, r99 = _ms(run.receipts, 50), _ms(run.receipts, 99)
    a50, a99 = _ms(run.answers, 50), _ms(run.answers, 99)
    lines = [
        BEGIN,
        "## Driver event stream",
        "",
        f"Generated on {report.started:%Y-%m-%d %H:%M %Z} by `{report.command}`: one `dispatcher serve`, "
        f"{run.sockets:,} drivers seeded and each connected to `GET /drivers/{{id}}/events` from one "
        f"client process, then {run.orders} orders at {ORDER_RATE:g}/s (open loop), each on a distinct "
        "driver's spot. Receipt latency is measured at the client, from the event's `at` (its row's "
        "write, just before the commit; PostgreSQL's clock, same machine) to the message's arrival; "
        "`at` has millisecond precision, so each value is over by up to 1 ms. Load average at the "
        f"start (1, 5, 15 min): {report.machine.get(LOAD_KEY, '?')}; machines differ by ~3x from day to "
        "day, so compare the ratios of one run, not absolute values across runs."
        + (f" {report.options.note}" if report.options.note else ""),
        "",
        "| figure | value |",
        "|---|---|",
        f"| sockets held by the ingress | {run.held:,} of {run.sockets:,} opened in {run.connect_s:.1f} s |",
        f"| ingress RSS before / after opening them | {run.rss_before_mb:,.0f} MB / {run.rss_after_mb:,.0f} MB |",
        f"| memory per socket (RSS growth / sockets) | {run.kib_per_socket:,.1f} KiB |",
        f"| orders booked | {run.booked} of {run.orders} ({run.unwatched} of them a warm-up driver, without a socket) |",
        f"| events received / wrong socket / missing | {len(run.receipts)} / {run.misrouted} / {run.missing} |",
        f"| commit → receipt p50 / p99 | {r50:.1f} ms / {r99:.1f} ms |",
        f"| order answer p50 / p99 (same run) | {a50:.1f} ms / {a99:.1f} ms |",
        f"| receipt ÷ answer, p50 / p99 | {r50 / a50:.2f} / {r99 / a99:.2f} |",
        END,
    ]
    return "\n".join(lines) + "\n"
