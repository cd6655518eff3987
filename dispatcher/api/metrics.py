"""Prometheus metrics of one ingress process, in a registry of its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Dispatch latencies live between a millisecond and a few seconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)


FAILOVERS_HELP = (
    "zones this ingress handed to their standby after the live incarnation died"
)
RETRIES_HELP = (
    "zone actor calls retried because the zone restarted, moved or was fenced"
)
WRITTEN_HELP = (
    "fixes written to PostgreSQL (a driver's fixes within one flush window count once)"
)
REFUSED_HELP = (
    "acknowledged fixes that PostgreSQL then refused (stale, too fast, inactive)"
)
DROPPED_HELP = (
    "acknowledged fixes given up on: older than the heartbeat TTL when retried"
)


class _ReadOnScrape(Collector):
    """A counter owned elsewhere, read at each scrape."""

    def __init__(self, name: str, help_text: str, read: Callable[[], int]) -> None:
        self._name, self._help, self._read = name, help_text, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._help, value=self._read())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dispatcher_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dispatcher_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.assignments = Counter(
            "dispatcher_assignments",
            "seller-order-ready outcomes",
            ["outcome", "path"],
            registry=self.registry,
        )
        self.pings = Counter(
            "dispatcher_pings",
            "location pings by verdict",
            ["verdict"],
            registry=self.registry,
        )
        self._ping_children: dict[str, Any] = {}
        self.outbox_pending = Gauge(
            "dispatcher_outbox_pending",
            "webhooks not yet delivered",
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "dispatcher_redis_up",
            "1 when the GEO mirror answers",
            registry=self.registry,
        )

    def count_pings(self, verdict: str, n: int = 1) -> None:
        """Count pings by verdict (once per request: its child is looked up once)."""
        child = self._ping_children.get(verdict)
        if child is None:
            child = self._ping_children[verdict] = self.pings.labels(verdict)
        child.inc(n)

    def count_zone_retries(
        self, read: Callable[[], int], failovers: Callable[[], int]
    ) -> None:
        """Expose the ingress's retried zone calls (a zone restarted, moved or was fenced)
        and the zones it handed to their standby, read when scraped."""
        self.registry.register(
            _ReadOnScrape("dispatcher_zone_call_retries", RETRIES_HELP, read)
        )
        self.registry.register(
            _ReadOnScrape("dispatcher_zone_failovers", FAILOVERS_HELP, failovers)
        )

    def count_ping_writes(
        self,
        *,
        written: Callable[[], int],
        refused: Callable[[], int],
        dropped: Callable[[], int],
    ) -> None:
        """Expose what became of acknowledged fixes (written behind)."""
        self.registry.register(
            _ReadOnScrape("dispatcher_ping_fixes_written", WRITTEN_HELP, written)
        )
        self.registry.register(
            _ReadOnScrape("dispatcher_pings_refused_on_write", REFUSED_HELP, refused)
        )
        self.registry.register(
            _ReadOnScrape("dispatcher_pings_dropped", DROPPED_HELP, dropped)
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_middleware(metrics: Metrics) -> Any:
    # `labels()` validates and locks on every call; the children of a route are few
    # (methods x statuses), so each is looked up once. Pings make this the hot path.
    counters: dict[tuple[str, str, int], Any] = {}
    histograms: dict[str, Any] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.resource
        # Label by route template, never by raw path: ids would explode the series.
        name = route.canonical if route is not None else "unmatched"
        response: web.StreamResponse = await handler(request)
        key = (request.method, name, response.status)
        counter = counters.get(key)
        if counter is None:
            counter = counters[key] = metrics.requests.labels(
                request.method, name, str(response.status)
            )
        counter.inc()
        histogram = histograms.get(name)
        if histogram is None:
            histogram = histograms[name] = metrics.latency.labels(name)
        histogram.observe(time.perf_counter() - started)
        return response

    return middleware
