"""The references and the four scenarios of issue 4, each turning load runs into report figures."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import asyncpg

from dispatcher.actors.core import CANDIDATES, nearest_widening, search_steps
from dispatcher.bench import profile
from dispatcher.bench.memory import server_memory, service_memory
from dispatcher.bench.options import Options
from dispatcher.bench.progress import Progress
from dispatcher.bench.report import Report
from dispatcher.bench.results import Figure, Target
from dispatcher.bench.runner import LoadRunner
from dispatcher.bench.seed import booking_counts, locate, reset_bookings, seed, settle
from dispatcher.bench.stack import SERVICE_REDIS_DB, Stack
from dispatcher.bench.stats import RunResult, latency_summary, median
from dispatcher.bench.workload import (
    CITY_RADIUS_KM,
    LOOKUP_CITY,
    ORDER_CITIES,
    ORDER_WARMUP_S,
    PINGS_CITY,
    ZONE_RESOLUTION,
    Driver,
    batch_bodies,
    batch_request,
    dense_city_points,
    disc_points,
    make_drivers,
    order_requests,
    ping_request,
    zone_centres,
    zoned_points,
)
from dispatcher.geo import bounding_box
from dispatcher.store.deliveries import PICK_SQL
from dispatcher.store.geo import GeoMirror, connect_redis
from dispatcher.zoning import Zoning

REFERENCES = ("ceiling", "naive")
# The service's defaults (DISPATCHER_SEARCH_RADIUS_KM, DISPATCHER_HEARTBEAT_TTL_S),
# which the bench's `serve` runs with; the direct lookups use the same values.
SEARCH_RADIUS_KM = 5.0
HEARTBEAT_TTL_S = 60.0
# A timed lookup series stops well before heartbeats expire, or later samples would
# search a mirror the sweeper is emptying.
LOOKUP_SERIES_MAX_S = 40.0
# Redis calls from the bench may wait this long: a slow answer is a figure, not an error.
LOOKUP_REDIS_TIMEOUT_S = 5.0
# The PostgreSQL fallback is timed on this share of the lookup samples (it is slower).
PG_LOOKUP_SHARE = 4
# Orders pre-signed for a saturation run, per second of it: above any rate two cores
# reach, so the generator never wraps around into idempotent replays.
SATURATION_ORDERS_PER_S = 3000
# Distinct pickup points the orders rotate over.
PICKUPS = 4096
# Batched pings are few, large requests: a gateway holds a handful of connections.
BATCH_CONNECTIONS = 8
# Drivers seeded for a profile run when the pings scenario did not run.
PROFILE_DRIVERS = 2000
# Seeding, warm-up and metric reads may take long on a busy machine.
ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=300)
# A warm-up (one ping per driver) is bounded by this, whatever the fleet size.
WARMUP_MAX_S = 600.0
# One sample of the service's Prometheus text: name{labels} value.
METRIC_LINE = re.compile(
    r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ([-+0-9.eE]+|NaN)$"
)
# Ping verdicts the service answers 204 (or counts as accepted in a batch).
PING_OK_VERDICTS = ("accepted", "stale")


def plan_steps(o: Options) -> int:
    """How many progress steps a run has (setup, references, scenarios, shutdown)."""
    r = o.sizes.repeats
    steps = 3 + 2 * r + 1
    per = {"pings": 2 + 5 * r, "orders": 2 + 4 * r, "lookup": 1 + 5 * r, "memory": 3}
    steps += sum(per[s] for s in o.scenarios)
    if "lookup" in o.scenarios and "memory" in o.scenarios:
        steps -= 1  # one seeding serves both
    return steps + (1 if o.profile else 0)


def parse_counter(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from Prometheus text, keyed by their label values joined with '/'."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line.strip())
        if m and m.group(1) == name:
            labels = re.findall(r'="([^"]*)"', m.group(2) or "")
            found["/".join(labels)] = float(m.group(3))
    return found


def parse_assignment_metrics(text: str) -> dict[str, float]:
    """`outcome/path` -> count from the service's Prometheus text."""
    return parse_counter(text, "dispatcher_assignments_total")


def error_note(results: Sequence[RunResult]) -> str | None:
    """'errors: 3 of 3000 (503: 2, …)' over runs, or None when every answer was 2xx."""
    errors = sum(r.errors for r in results)
    if not errors:
        return None
    kinds: Counter[str] = Counter()
    for r in results:
        for status, n in r.status_counts.items():
            if not (status.isdigit() and 200 <= int(status) < 300):
                kinds[status] += n
    detail = ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
    return f"errors: {errors} of {sum(r.ok + r.errors for r in results)} requests ({detail})"


def rate_note(results: Sequence[RunResult]) -> str:
    achieved = median([r.throughput for r in results])
    offered = results[0].offered_rate or 0.0
    lag = median([r.lag_p99_ms for r in results if r.lag_p99_ms is not None])
    text = f"answered {achieved:,.0f}/s of {offered:,.0f}/s offered"
    if not math.isnan(lag):
        text += f"; generator send lag p99 {lag:.1f} ms (included in latency)"
    return text


def _pick(result: RunResult, what: str) -> float:
    if what == "rps":
        return result.throughput
    return result.p50_ms if what == "p50" else result.p99_ms


class Bench:
    """One benchmark run over one stack; every method adds figures to the report."""

    def __init__(
        self,
        options: Options,
        stack: Stack,
        runner: LoadRunner,
        progress: Progress,
        session: aiohttp.ClientSession,
        report: Report,
    ) -> None:
        self.o = options
        self.s = options.sizes
        self.stack = stack
        self.runner = runner
        self.progress = progress
        self.session = session
        self.report = report
        self.rng = random.Random(options.seed)
        self.ref_sat: dict[str, list[RunResult]] = {}
        self.ref_rate: dict[tuple[str, float], list[RunResult]] = {}
        self.ref_requests: Path | None = None
        self.lookup_fleet: list[Driver] | None = None
        # Per batched-ping run tag: how many acknowledged fixes reached PostgreSQL.
        self.written_notes: dict[str, str] = {}

    @property
    def base(self) -> str:
        return self.stack.service_url

    def step(self, label: str, expected_s: float | None = None) -> None:
        self.progress.step(label, expected_s)

    def add(self, figure: Figure, *results: Sequence[RunResult]) -> None:
        for group in results:
            note = error_note(group)
            if note:
                figure.notes.append(note)
        self.report.figures.append(figure)

    async def _seed(self, drivers: list[Driver]) -> list[Driver]:
        return await seed(
            self.session,
            self.base,
            self.stack.admin_token,
            self.stack.database_url,
            drivers,
        )

    async def _renew(self, drivers: Sequence[Driver]) -> None:
        """Renew every heartbeat (and the mirror) with batched pings before a run."""
        await locate(self.session, self.base, self.stack.admin_token, drivers)

    # ---- references -------------------------------------------------------------------

    async def references(self) -> None:
        """Both references at saturation, interleaved, so machine noise hits them alike."""
        n = min(self.s.drivers, 20_000)
        drivers = make_drivers(disc_points(self.rng, PINGS_CITY, CITY_RADIUS_KM, n))
        self.ref_requests = self.runner.write(
            "reference-pings", [ping_request(d) for d in drivers]
        )
        for rep in range(self.s.repeats):
            for kind in REFERENCES:
                self.step(
                    f"reference {kind}: saturation ({rep + 1}/{self.s.repeats})",
                    self.s.duration_s,
                )
                url = self.stack.references[kind][1]
                result = await self.runner.saturate(
                    url,
                    self.ref_requests,
                    connections=self.s.connections,
                    duration_s=self.s.duration_s,
                )
                self.ref_sat.setdefault(kind, []).append(result)
        for kind in REFERENCES:
            runs = self.ref_sat[kind]
            self.add(
                Figure(
                    "reference",
                    f"{kind}: single ping, saturation",
                    "req/s",
                    [r.throughput for r in runs],
                    self._ref("rps"),
                    self._ref("rps", "naive"),
                ),
                runs,
            )
            self.add(
                Figure(
                    "reference",
                    f"{kind}: p99 at saturation",
                    "ms",
                    [r.p99_ms for r in runs],
                    self._ref("p99"),
                    self._ref("p99", "naive"),
                )
            )

    def _ref(
        self, what: str, kind: str = "ceiling", rate: float | None = None
    ) -> float | None:
        runs = (
            self.ref_sat.get(kind, [])
            if rate is None
            else self.ref_rate.get((kind, rate), [])
        )
        if not runs:
            return None
        return median([_pick(r, what) for r in runs])

    async def _refs_at(self, rate: float, only: int | None = None) -> None:
        """The references under the same fixed offered rate as a figure of ours.

        Called with `only` (a repeat) right after our run of that repeat, so a noisy moment of the
        machine hits ours and the references alike; without, it fills in every repeat.
        """
        assert self.ref_requests is not None
        for rep in range(self.s.repeats) if only is None else [only]:
            for kind in REFERENCES:
                if len(self.ref_rate.get((kind, rate), [])) > rep:
                    continue
                self.step(
                    f"reference {kind}: {rate:g}/s ({rep + 1}/{self.s.repeats})",
                    self.s.duration_s,
                )
                result = await self.runner.fixed_rate(
                    self.stack.references[kind][1],
                    self.ref_requests,
                    rate=rate,
                    duration_s=self.s.duration_s,
                )
                self.ref_rate.setdefault((kind, rate), []).append(result)
        if len(self.ref_rate.get(("naive", rate), [])) < self.s.repeats:
            return
        for kind in REFERENCES:
            runs = self.ref_rate[(kind, rate)]
            label = f"{kind}: single ping at {rate:g}/s: p99"
            if any(f.name == label for f in self.report.figures):
                continue
            fig = Figure(
                "reference",
                label,
                "ms",
                [r.p99_ms for r in runs],
                self._ref("p99", "ceiling", rate),
                self._ref("p99", "naive", rate),
            )
            fig.notes.append(rate_note(runs))
            self.add(fig, runs)

    def _latency_figures(
        self,
        scenario: str,
        label: str,
        runs: list[RunResult],
        rate: float | None,
        p99_target: Target | None = None,
    ) -> None:
        for what, target in (("p50", None), ("p99", p99_target)):
            values = [r.p50_ms if what == "p50" else r.p99_ms for r in runs]
            fig = Figure(
                scenario,
                f"{label}: {what}",
                "ms",
                values,
                self._ref(what, "ceiling", rate),
                self._ref(what, "naive", rate),
                target,
            )
            if rate is not None and what == "p99":
                fig.notes.append(rate_note(runs))
            self.add(fig, runs if what == "p99" else [])

    # ---- 1. pings ---------------------------------------------------------------------

    async def pings(self) -> None:
        s = self.s
        self.step(f"pings: seeding {s.drivers:,} drivers in one city")
        fleet = await self._seed(
            make_drivers(disc_points(self.rng, PINGS_CITY, CITY_RADIUS_KM, s.drivers))
        )
        single = self.runner.write("pings-single", [ping_request(d) for d in fleet])
        self.step(f"pings: warm-up, one ping per driver ({len(fleet):,})")
        await self.runner.saturate(
            self.base,
            single,
            connections=s.connections,
            duration_s=WARMUP_MAX_S,
            max_requests=len(fleet),
            python_only=True,
        )
        sat: list[RunResult] = []
        for rep in range(s.repeats):
            self.step(
                f"pings: single, saturation ({rep + 1}/{s.repeats})", s.duration_s
            )
            sat.append(
                await self.runner.saturate(
                    self.base,
                    single,
                    connections=s.connections,
                    duration_s=s.duration_s,
                )
            )
        self.add(
            Figure(
                "pings",
                "single PATCH …/location, saturation",
                "req/s",
                [r.throughput for r in sat],
                self._ref("rps"),
                self._ref("rps", "naive"),
                Target("≥ 0.7 x ceiling", ceiling_factor=0.7),
            ),
            sat,
        )
        self._latency_figures("pings", "single, at saturation", sat, None)

        batched, pings_per_s, per_body = await self.batched_pings(fleet, "pings")
        fig = Figure(
            "pings",
            "batched POST /drivers/locations, saturation",
            "pings/s",
            pings_per_s,
            self._ref("rps"),
            self._ref("rps", "naive"),
            Target("≥ 50,000", minimum=50_000),
        )
        fig.notes.append(
            f"{per_body:.0f} pings per request on average (the most that fit 64 KiB, ≤ 1000), "
            f"{min(s.connections, BATCH_CONNECTIONS)} connections, "
            f"{median([r.throughput for r in batched]):,.1f} requests/s; "
            + self.written_notes["pings"]
        )
        self.add(fig, batched)

        rate = s.ping_rate
        fixed: list[RunResult] = []
        for rep in range(s.repeats):
            self.step(
                f"pings: single at {rate:g}/s ({rep + 1}/{s.repeats})", s.duration_s
            )
            fixed.append(
                await self.runner.fixed_rate(
                    self.base, single, rate=rate, duration_s=s.duration_s
                )
            )
            await self._refs_at(rate, rep)
        self._latency_figures(
            "pings",
            f"single at {rate:g}/s",
            fixed,
            rate,
            Target("≤ 25 ms", maximum=25.0) if rate == 3000 else None,
        )

    async def batched_pings(
        self, fleet: Sequence[Driver], tag: str
    ) -> tuple[list[RunResult], list[float], float]:
        """Batched pings at saturation, `repeats` times: the runs, accepted pings/s of each
        (the service's own count), and pings per request."""
        s = self.s
        bodies = batch_bodies(fleet)
        batch = self.runner.write(
            f"{tag}-batch", [batch_request(b, self.stack.admin_token) for b in bodies]
        )
        batched: list[RunResult] = []
        pings_per_s: list[float] = []
        written_per_s: list[float] = []
        drains: list[float] = []
        for rep in range(s.repeats):
            self.step(
                f"{tag}: batched, saturation ({rep + 1}/{s.repeats})", s.duration_s
            )
            # The service's own count of accepted pings: wrk cannot read the answers,
            # and a batch answered 200 may still reject entries (rate limit, …).
            before, written_before = await self._pings_ok(), await self._pings_written()
            result = await self.runner.saturate(
                self.base,
                batch,
                connections=min(s.connections, BATCH_CONNECTIONS),
                duration_s=s.duration_s,
            )
            batched.append(result)
            pings_per_s.append((await self._pings_ok() - before) / result.duration_s)
            # Pings are written behind: a read waits for the queued ones (how long it
            # takes after the load is the staleness PostgreSQL had), then count what
            # reached PostgreSQL (a driver's queued fixes are written once, the newest).
            drain_started = time.monotonic()
            await self._settle()
            drains.append(time.monotonic() - drain_started)
            written_per_s.append(
                (await self._pings_written() - written_before) / result.duration_s
            )
        self.written_notes[tag] = (
            f"written to PostgreSQL: {median(written_per_s):,.0f} fixes/s "
            f"({median(written_per_s) / max(median(pings_per_s), 1.0):.0%} of those acknowledged; each zone writes "
            f"the newest queued fix per driver, one call at a time, so the rest were superseded by the same "
            f"driver's newer fix before their turn); queues drained {median(drains) * 1000:,.0f} ms after the load"
        )
        return batched, pings_per_s, len(fleet) / len(bodies)

    # ---- 2. orders --------------------------------------------------------------------

    async def orders(self) -> None:
        s = self.s
        centres = zone_centres(ORDER_CITIES)
        self.step(f"orders: seeding {s.drivers:,} drivers over {len(centres)} zones")
        fleet = await self._seed(
            make_drivers(zoned_points(self.rng, centres, s.drivers))
        )
        pickups = zoned_points(self.rng, centres, PICKUPS)
        doubled_total = 0

        # A zone's first orders prepare its statements and load its scripts on each of
        # its connections: warm them, as in a service that has been up a while.
        self.step(
            f"orders: warm-up, {ORDER_WARMUP_S:g} s at {s.order_rate:g}/s (not measured)",
            ORDER_WARMUP_S,
        )
        await self._renew(fleet)
        warm = order_requests(
            "warm",
            pickups,
            math.ceil(s.order_rate * ORDER_WARMUP_S) + 10,
            self.stack.inbound_secret,
        )
        await self.runner.fixed_rate(
            self.base,
            self.runner.write("warm", warm),
            rate=s.order_rate,
            duration_s=ORDER_WARMUP_S,
            count="assigned",
        )
        doubled_total += (await booking_counts(self.stack.database_url, "warm"))[1]
        await reset_bookings(self.stack.database_url)

        fixed: list[RunResult] = []
        assigned_share: list[float] = []
        for rep in range(s.repeats):
            self.step(
                f"orders: {s.order_rate:g}/s ({rep + 1}/{s.repeats})", s.duration_s
            )
            await self._renew(fleet)
            prefix = f"rate{rep}"
            specs = order_requests(
                prefix,
                pickups,
                math.ceil(s.order_rate * s.duration_s) + 10,
                self.stack.inbound_secret,
            )
            result = await self.runner.fixed_rate(
                self.base,
                self.runner.write(prefix, specs),
                rate=s.order_rate,
                duration_s=s.duration_s,
                count="assigned",
            )
            fixed.append(result)
            made, doubled = await booking_counts(self.stack.database_url, prefix)
            doubled_total += doubled
            assigned_share.append(made / max(1, result.ok))
            await reset_bookings(self.stack.database_url)
            await self._refs_at(s.order_rate, rep)
        self._latency_figures(
            "orders",
            f"seller-order-ready at {s.order_rate:g}/s",
            fixed,
            s.order_rate,
            Target("≤ 50 ms", maximum=50.0) if s.order_rate == 200 else None,
        )
        self.report.figures[-1].notes.append(
            f"share of answered orders booked: {median(assigned_share):.0%}"
        )

        sat, per_s, doubled = await self.orders_saturation(fleet, pickups, "orders")
        doubled_total += doubled
        self.add(
            Figure(
                "orders",
                "seller-order-ready, saturation",
                "req/s",
                [r.throughput for r in sat],
                self._ref("rps"),
                self._ref("rps", "naive"),
            ),
            sat,
        )
        fig = Figure(
            "orders",
            "assignments at saturation",
            "assignments/s",
            per_s,
            self._ref("rps"),
            self._ref("rps", "naive"),
            Target("≥ 1,000", minimum=1000),
        )
        fig.notes.append(
            f"{s.drivers:,} drivers available at the start of each run; counted in PostgreSQL"
        )
        self.add(fig)
        self._latency_figures("orders", "seller-order-ready, at saturation", sat, None)
        self.add(
            Figure(
                "orders",
                "double bookings (all order runs)",
                "count",
                [float(doubled_total)],
                target=Target("= 0", maximum=0),
            )
        )

    async def orders_saturation(
        self,
        fleet: Sequence[Driver],
        pickups: Sequence[tuple[float, float]],
        tag: str,
        id_prefix: str = "sat",
    ) -> tuple[list[RunResult], list[float], int]:
        """Orders at saturation, `repeats` times, each over a renewed fleet: the runs,
        assignments/s of each (counted in PostgreSQL), and double bookings seen.
        `id_prefix` must differ between calls on one database, or orders would replay."""
        s = self.s
        sat: list[RunResult] = []
        per_s: list[float] = []
        doubled_total = 0
        for rep in range(s.repeats):
            self.step(f"{tag}: saturation ({rep + 1}/{s.repeats})", s.duration_s)
            await self._renew(fleet)
            prefix = f"{id_prefix}{rep}"
            specs = order_requests(
                prefix,
                pickups,
                round(SATURATION_ORDERS_PER_S * s.duration_s),
                self.stack.inbound_secret,
            )
            result = await self.runner.saturate(
                self.base,
                self.runner.write(prefix, specs),
                connections=s.connections,
                duration_s=s.duration_s,
            )
            sat.append(result)
            made, doubled = await booking_counts(self.stack.database_url, prefix)
            doubled_total += doubled
            per_s.append(made / result.duration_s)
            await reset_bookings(self.stack.database_url)
        return sat, per_s, doubled_total

    # ---- 3. lookup --------------------------------------------------------------------

    async def _lookup_fleet(self) -> list[Driver]:
        if self.lookup_fleet is None:
            self.step(
                f"lookup: seeding {self.s.lookup_drivers:,} drivers, dense centre"
            )
            points = dense_city_points(self.rng, LOOKUP_CITY, self.s.lookup_drivers)
            self.lookup_fleet = await self._seed(make_drivers(points))
        return self.lookup_fleet

    async def lookup(self) -> None:
        s = self.s
        fleet = await self._lookup_fleet()
        pickups = dense_city_points(self.rng, LOOKUP_CITY, s.lookup_samples)
        mirror = GeoMirror(
            connect_redis(
                self.stack.redis_url(SERVICE_REDIS_DB), LOOKUP_REDIS_TIMEOUT_S
            ),
            LOOKUP_REDIS_TIMEOUT_S,
        )
        zoning = Zoning(ZONE_RESOLUTION)
        redis_runs: list[tuple[float, float]] = []
        empty = 0
        try:
            for rep in range(s.repeats):
                self.step(
                    f"lookup: Redis nearest, {len(pickups)} calls ({rep + 1}/{s.repeats})"
                )
                await self._renew(fleet)
                latencies: list[float] = []
                stop_at = time.monotonic() + LOOKUP_SERIES_MAX_S
                for lat, lon in pickups:
                    began = time.perf_counter()
                    found = await nearest_widening(
                        mirror, zoning, lat, lon, SEARCH_RADIUS_KM
                    )
                    latencies.append(time.perf_counter() - began)
                    empty += not found
                    if time.monotonic() > stop_at:
                        break
                p50, p99, _ = latency_summary(latencies)
                redis_runs.append((p50, p99))
        finally:
            await mirror.client.aclose()
        steps = ", ".join(f"{r:g}" for r in search_steps(SEARCH_RADIUS_KM))
        note = (
            f"the zone actor's nearest_widening (circles of {steps} km in one script call), COUNT {CANDIDATES}, "
            f"one call at a time from the bench process; {empty} calls found nobody"
        )
        for i, what in enumerate(("p50", "p99")):
            fig = Figure(
                "lookup",
                f"Redis mirror lookup, {s.lookup_drivers:,} drivers: {what}",
                "ms",
                [r[i] for r in redis_runs],
                target=Target("≤ 2 ms", maximum=2.0) if what == "p99" else None,
            )
            if what == "p99":
                fig.notes.append(note)
            self.add(fig)

        pg_runs: list[tuple[float, float]] = []
        conn = await asyncpg.connect(self.stack.database_url)
        try:
            for rep in range(s.repeats):
                self.step(f"lookup: PostgreSQL fallback ({rep + 1}/{s.repeats})")
                await self._renew(fleet)
                latencies = []
                stop_at = time.monotonic() + LOOKUP_SERIES_MAX_S
                # PICK_SQL is fenced by a zone's epoch: borrow a live zone's, in a rolled-back
                # transaction, so the statement runs exactly as a booking runs it.
                fence = await conn.fetchrow(
                    "SELECT zone_id, epoch FROM zones ORDER BY zone_id LIMIT 1"
                )
                assert fence is not None, "no zone exists: seed pings first"
                for lat, lon in pickups[: max(1, len(pickups) // PG_LOOKUP_SHARE)]:
                    tx = conn.transaction()
                    await tx.start()
                    began = time.perf_counter()
                    await conn.fetchrow(
                        PICK_SQL,
                        lat,
                        lon,
                        HEARTBEAT_TTL_S,
                        *bounding_box(lat, lon, SEARCH_RADIUS_KM),
                        None,
                        SEARCH_RADIUS_KM,
                        [],
                        fence["zone_id"],
                        fence["epoch"],
                    )
                    latencies.append(time.perf_counter() - began)
                    await tx.rollback()
                    if time.monotonic() > stop_at:
                        break
                p50, p99, _ = latency_summary(latencies)
                pg_runs.append((p50, p99))
        finally:
            await conn.close()
        for i, what in enumerate(("p50", "p99")):
            fig = Figure(
                "lookup",
                f"PostgreSQL fallback (PICK_SQL), {s.lookup_drivers:,} drivers: {what}",
                "ms",
                [r[i] for r in pg_runs],
            )
            if what == "p99":
                fig.notes.append(
                    "no candidate filter, FOR UPDATE SKIP LOCKED in a rolled-back transaction"
                )
            self.add(fig)

        rate = s.lookup_order_rate
        runs: list[RunResult] = []
        before = await self._assignment_metrics()
        for rep in range(s.repeats):
            self.step(
                f"lookup: assignment path at {rate:g}/s ({rep + 1}/{s.repeats})",
                s.duration_s,
            )
            await self._renew(fleet)
            prefix = f"lookup{rep}"
            specs = order_requests(
                prefix,
                pickups,
                math.ceil(rate * s.duration_s) + 10,
                self.stack.inbound_secret,
            )
            runs.append(
                await self.runner.fixed_rate(
                    self.base,
                    self.runner.write(prefix, specs),
                    rate=rate,
                    duration_s=s.duration_s,
                    count="assigned",
                )
            )
            await reset_bookings(self.stack.database_url)
            await self._refs_at(rate, rep)
        after = await self._assignment_metrics()
        self._latency_figures(
            "lookup", f"assignment path (seller-order-ready) at {rate:g}/s", runs, rate
        )
        paths = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        split = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(paths.items()) if v)
        self.report.figures[-1].notes.append(
            f"outcome/lookup path of these orders: {split or 'none'}"
        )

    async def _assignment_metrics(self) -> dict[str, float]:
        return parse_assignment_metrics(await self._metrics_text())

    async def _pings_ok(self) -> float:
        """Pings the service has accepted so far (its own counter, by verdict)."""
        counts = parse_counter(await self._metrics_text(), "dispatcher_pings_total")
        return sum(counts.get(v, 0.0) for v in PING_OK_VERDICTS)

    async def _pings_written(self) -> float:
        counts = parse_counter(
            await self._metrics_text(), "dispatcher_ping_fixes_written_total"
        )
        return sum(counts.values())

    async def _settle(self) -> None:
        await settle(self.session, self.base, self.stack.admin_token)

    async def _metrics_text(self) -> str:
        async with self.session.get(
            f"{self.base}/metrics", timeout=ADMIN_TIMEOUT
        ) as resp:
            return await resp.text()

    # ---- 4. memory --------------------------------------------------------------------

    async def memory(self) -> None:
        fleet = await self._lookup_fleet()
        self.step(f"memory: one ping per driver ({len(fleet):,}), token cache warm")
        warm = self.runner.write("memory-warm", [ping_request(d) for d in fleet])
        await self.runner.saturate(
            self.base,
            warm,
            connections=self.s.connections,
            duration_s=WARMUP_MAX_S,
            max_requests=len(fleet),
            python_only=True,
        )
        self.step("memory: measuring resident memory")
        async with self.session.get(
            f"{self.base}/zones",
            timeout=ADMIN_TIMEOUT,
            headers={"Authorization": f"Bearer {self.stack.admin_token}"},
        ) as resp:
            zones = {z["zoneId"]: z["drivers"] for z in (await resp.json())["zones"]}
        assert self.stack.service is not None
        rows = service_memory(self.stack.service.pid, self.stack.ray_tmpdir)
        rows = [
            dataclasses.replace(
                m, name=f"{m.name} ({zones.get(m.zone_id, '?')} drivers)"
            )
            if m.role == "zone actor"
            else m
            for m in rows
        ]
        for role, pid in (
            ("postgres", self.stack.postgres.pid),
            ("redis", self.stack.redis.pid),
        ):
            row = server_memory(role, pid)
            if row is not None:
                rows.append(row)
        self.report.memory = rows
        total = sum(zones.values())
        ingress = [m.rss_mb for m in rows if m.role == "ingress"]
        actors = [m.rss_mb for m in rows if m.role == "zone actor"]
        daemons = [m.rss_mb for m in rows if m.role == "ray"]
        self.add(
            Figure(
                "memory", f"ingress RSS ({total:,} drivers in zones)", "MB", ingress[:1]
            )
        )
        fig = Figure(
            "memory", "largest zone actor RSS", "MB", [max(actors)] if actors else []
        )
        fig.notes.append(
            f"{len(actors)} zone actors, {sum(actors):,.0f} MB together; per zone in the memory table"
        )
        self.add(fig)
        self.add(
            Figure(
                "memory",
                f"Ray's own processes, {len(daemons)} together",
                "MB",
                [sum(daemons)],
            )
        )

    # ---- profile ----------------------------------------------------------------------

    async def profile(self) -> None:
        """One extra single-ping saturation run, py-spy sampling the ingress and the busiest zone actor."""
        self.step("profile: single pings under py-spy", self.s.duration_s)
        py_spy = profile.find_py_spy()
        if py_spy is None or self.stack.service is None:
            self.report.notes.append("profile skipped: py-spy not found")
            return
        existing = sorted(self.runner.workdir.glob("*-pings-single.requests"))
        if existing:
            requests = existing[0]
        else:
            n = min(self.s.drivers, PROFILE_DRIVERS)
            fleet = await self._seed(
                make_drivers(disc_points(self.rng, PINGS_CITY, CITY_RADIUS_KM, n))
            )
            requests = self.runner.write(
                "profile-pings", [ping_request(d) for d in fleet]
            )
        targets = {"ingress": self.stack.service.pid}
        actor = profile.busiest_zone_actor(self.stack.service.pid)
        if actor is not None:
            targets["busiest zone actor"] = actor
        seconds = max(1.0, self.s.duration_s - 1)
        recordings = [
            profile.record(
                py_spy, pid, seconds, self.runner.workdir / f"pyspy-{pid}.txt"
            )
            for pid in targets.values()
        ]
        *raws, _ = await asyncio.gather(
            *recordings,
            self.runner.saturate(
                self.base,
                requests,
                connections=self.s.connections,
                duration_s=self.s.duration_s,
            ),
        )
        for (label, pid), raw in zip(targets.items(), raws, strict=True):
            if raw:
                self.report.profile[f"{label} (pid {pid})"] = profile.top_frames(
                    str(raw)
                )
            else:
                self.report.notes.append(
                    f"profile of the {label} failed: py-spy gave no samples"
                )
