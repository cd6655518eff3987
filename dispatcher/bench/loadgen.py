"""Python load generator, run as its own process: closed loop (saturation) or open loop (fixed rate)."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from dispatcher.bench.httpclient import HttpError, HttpPool, encode_request
from dispatcher.bench.reqfile import RequestSpec, read_requests
from dispatcher.bench.stats import RunResult, latency_summary, percentile

# The line a child prints with its result; everything else on stdout is ignored.
RESULT_MARKER = "BENCH_JSON "
# An answer slower than this counts as an error, so a stuck run still ends.
REQUEST_TIMEOUT_S = 30.0
# Open loop: connections the client may open. Far more than the target rates need at
# sane latencies, so waiting happens in the server (as with thousands of phones), not
# in a client-side queue; a slow server still shows up because latency is measured
# from each request's scheduled time.
OPEN_LOOP_MAX_CONNECTIONS = 256
# Open loop: once the schedule ends, requests still in flight get this long to finish.
DRAIN_S = 5.0

Mode = Literal["closed", "open"]
Count = Literal["none", "accepted", "assigned"]


@dataclass(frozen=True)
class LoadPlan:
    """What one child run does; written as JSON, path given on the command line."""

    base_url: str
    requests_path: str
    mode: Mode
    connections: int
    duration_s: float
    rate: float = 0.0
    # Closed loop: stop after this many requests (0 = run for duration_s).
    max_requests: int = 0
    # Read the answers: "accepted" sums batch results, "assigned" counts assigned orders.
    count: Count = "none"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadPlan:
        return cls(**data)


class _Recorder:
    def __init__(self, count: Count, *, failures_count: bool = False) -> None:
        self.count = count
        # Open loop: a failed or unfinished request still waited; leaving it out of the
        # percentiles would make an overloaded server look fast.
        self.failures_count = failures_count
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.items = 0
        self.last_done = 0.0

    async def send(self, pool: HttpPool, data: bytes, started: float) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, body = await pool.request(data)
        except (HttpError, TimeoutError, OSError) as exc:
            self.statuses[type(exc).__name__] += 1
            if self.failures_count:
                self.latencies.append(time.perf_counter() - started)
            return
        self.last_done = time.perf_counter()
        self.latencies.append(self.last_done - started)
        self.statuses[str(status)] += 1
        if 200 <= status < 300 and self.count != "none":
            self.items += _items(self.count, body)

    def result(
        self, generator: str, duration_s: float, offered: float | None
    ) -> RunResult:
        ok = sum(
            n for s, n in self.statuses.items() if s.isdigit() and 200 <= int(s) < 300
        )
        errors = sum(self.statuses.values()) - ok
        p50, p99, worst = latency_summary(self.latencies)
        lag = percentile([x * 1000.0 for x in self.lags], 99.0) if self.lags else None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return RunResult(
            generator=generator,
            ok=ok,
            errors=errors,
            duration_s=duration_s,
            p50_ms=p50,
            p99_ms=p99,
            max_ms=worst,
            items=self.items,
            offered_rate=offered,
            lag_p99_ms=lag,
            status_counts=dict(self.statuses),
            cpu_s=usage.ru_utime + usage.ru_stime,
        )


def _items(count: Count, body: bytes) -> int:
    try:
        data = json.loads(body)
    except ValueError:
        return 0
    if count == "accepted":
        return int(data.get("accepted", 0))
    return 1 if data.get("assigned") is True else 0


async def closed_loop(plan: LoadPlan, specs: Sequence[RequestSpec]) -> RunResult:
    """`connections` workers, each sending its next request as soon as the last answered."""
    recorder = _Recorder(plan.count)
    pool = HttpPool(plan.base_url, plan.connections)
    encoded = [encode_request(s, pool.authority) for s in specs]
    next_index = 0
    limit = plan.max_requests or None
    begin = time.perf_counter()
    deadline = begin + plan.duration_s

    async def worker() -> None:
        nonlocal next_index
        while time.perf_counter() < deadline and (limit is None or next_index < limit):
            data = encoded[next_index % len(encoded)]
            next_index += 1
            await recorder.send(pool, data, time.perf_counter())

    try:
        await asyncio.gather(*(worker() for _ in range(plan.connections)))
    finally:
        pool.close()
    return recorder.result("python-closed", time.perf_counter() - begin, None)


async def open_loop(plan: LoadPlan, specs: Sequence[RequestSpec]) -> RunResult:
    """Request i is due at start + i/rate whatever happened before; latency counts from then."""
    recorder = _Recorder(plan.count, failures_count=True)
    pool = HttpPool(plan.base_url, max(plan.connections, OPEN_LOOP_MAX_CONNECTIONS))
    encoded = [encode_request(s, pool.authority) for s in specs]
    total = max(1, round(plan.rate * plan.duration_s))
    tasks: dict[asyncio.Task[None], float] = {}

    async def one(data: bytes, due: float) -> None:
        recorder.lags.append(max(0.0, time.perf_counter() - due))
        await recorder.send(pool, data, due)

    begin = time.perf_counter()
    sent = 0
    try:
        while sent < total:
            now = time.perf_counter()
            # Everything already due leaves now: a late generator catches up, and the
            # lateness is charged to latency, never hidden.
            while sent < total and begin + sent / plan.rate <= now:
                due = begin + sent / plan.rate
                task = asyncio.create_task(one(encoded[sent % len(encoded)], due))
                tasks[task] = due
                task.add_done_callback(lambda t: tasks.pop(t, None))
                sent += 1
            if sent < total:
                await asyncio.sleep(
                    max(0.0, begin + sent / plan.rate - time.perf_counter())
                )
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=DRAIN_S)
            now = time.perf_counter()
            for task in pending:
                # Still waiting after the drain: counted as an error, and its wait so
                # far (a lower bound) goes into the latencies.
                recorder.latencies.append(now - tasks.pop(task, now))
                task.cancel()
            if pending:
                recorder.statuses["unfinished"] += len(pending)
                await asyncio.wait(pending)
    finally:
        pool.close()
    # Throughput over the schedule, or until the last answer if the server lagged.
    elapsed = max(total / plan.rate, recorder.last_done - begin)
    return recorder.result("python-open", elapsed, plan.rate)


async def run(plan: LoadPlan) -> RunResult:
    specs = read_requests(Path(plan.requests_path))
    if not specs:
        raise ValueError(f"no requests in {plan.requests_path}")
    if plan.mode == "open":
        return await open_loop(plan, specs)
    return await closed_loop(plan, specs)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m dispatcher.bench.loadgen PLAN.json", file=sys.stderr)
        return 2
    plan = LoadPlan.from_json(json.loads(Path(args[0]).read_text()))
    result = asyncio.run(run(plan))
    print(RESULT_MARKER + json.dumps(result.to_json()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
