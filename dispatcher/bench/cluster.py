"""A multi-node Ray cluster on this machine (head + worker raylets), for scale runs and tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.cluster_utils import Cluster

from dispatcher.actors.options import ZONE_RESOURCE

# Zone actors one worker node offers room for (the custom resource's capacity).
ZONE_SLOTS_PER_NODE = 16


class LocalRayCluster:
    """A head without zone room plus worker raylets that offer it, as KubeRay's layout.

    This process starts and stops the nodes but does not join as a driver: the ingress
    (`dispatcher serve`) and the `dispatcher zones` commands do, as on a real cluster.
    Raylets must be started from the main thread (Ray installs signal handlers).
    """

    def __init__(self, *, system_config: Mapping[str, Any] | None = None, temp_dir: Path | None = None) -> None:
        head: dict[str, Any] = {"num_cpus": 0, "include_dashboard": False}
        if system_config:
            head["_system_config"] = dict(system_config)
        if temp_dir is not None:
            head["temp_dir"] = str(temp_dir)
        self._cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
        self.workers: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return str(self._cluster.address)

    def add_worker(self, zone_slots: int = ZONE_SLOTS_PER_NODE) -> str:
        """Start one more worker node; returns its node id once the GCS knows it."""
        node = self._cluster.add_node(num_cpus=1, resources={ZONE_RESOURCE: zone_slots})
        self._cluster.wait_for_nodes()
        node_id = str(node.node_id)
        self.workers[node_id] = node
        return node_id

    def lose_worker(self, node_id: str) -> None:
        """Kill the node's raylet and object store at once, as a lost machine would."""
        self._cluster.remove_node(self.workers.pop(node_id), allow_graceful=False)

    def shutdown(self) -> None:
        self._cluster.shutdown()  # type: ignore[no-untyped-call]
