"""Prometheus metrics of the driver event stream, in the ingress's registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dispatcher.api.metrics import LATENCY_BUCKETS

# Events replayed to a socket on connect: mostly none, a reconnect after a gap a few.
REPLAY_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "dispatcher_driver_sockets",
            "driver event sockets open on this ingress",
            registry=registry,
        )
        self.replay = Histogram(
            "dispatcher_driver_event_replay_events",
            "events replayed to a socket when it connected with `after`",
            buckets=REPLAY_BUCKETS,
            registry=registry,
        )
        self.push_latency = Histogram(
            "dispatcher_driver_event_push_seconds",
            "from the event row's write (just before its commit) to its send on the socket",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.closes = Counter(
            "dispatcher_driver_socket_closes",
            "driver event sockets closed, by close code",
            ["code"],
            registry=registry,
        )
        self._close_children: dict[int, Any] = {}

    def count_close(self, code: int) -> None:
        child = self._close_children.get(code)
        if child is None:
            child = self._close_children[code] = self.closes.labels(str(code))
        child.inc()
