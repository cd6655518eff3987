"""Every Ray option of a zone actor, in one place."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# Each zone is its own process; asking for no CPU lets a laptop host dozens of zones,
# while the custom resource lets a cluster's autoscaler see and place them.
ZONE_RESOURCE = "dispatcher_zone"
# Ray's own label on every node; a label selector on it keeps zones off given nodes
# (Ray 2.60 `label_selector` with "!in(...)"; it combines with SPREAD and with a soft
# node affinity, and Ray reuses it when it restarts the actor).
NODE_ID_LABEL = "ray.io/node-id"


# Calls a zone actor runs at once: a few ping batches plus one assignment.
ZONE_MAX_CONCURRENCY = 8


# With standbys on (settings.zone_standby), each zone has two incarnations, one per slot:
# `a` is the zone's first and only one without standbys; `b` its standby. Which slot
# holds the zone is kept in Ray's KV (actors/hosting.py, `live_slot`); the other waits.
ZoneSlot = Literal["a", "b"]


def zone_actor_name(zone_id: str, slot: ZoneSlot = "a") -> str:
    return f"zone:{zone_id}" if slot == "a" else f"zone-b:{zone_id}"


def other_slot(slot: ZoneSlot) -> ZoneSlot:
    return "b" if slot == "a" else "a"


def zone_actor_options(
    zone_id: str,
    namespace: str,
    *,
    resource_units: float = 0.0,
    node_id: str | None = None,
    excluded: Collection[str] = (),
    slot: ZoneSlot = "a",
    standby: bool = False,
) -> dict[str, Any]:
    """Options for creating (or finding) a zone's actor; `node_id` pins a new
    incarnation to that node when it still has room (rebalancing); `excluded` nodes
    (closed to zones, or dying) never host it, not even when Ray restarts it."""
    options: dict[str, Any] = {
        "name": zone_actor_name(zone_id, slot),
        "namespace": namespace,
        "get_if_exists": True,
        # Detached: zones outlive any one ingress replica and are shared by all.
        "lifetime": "detached",
        # A dead zone restarts forever; its constructor rebuilds from PostgreSQL. With
        # standbys it is not restarted: its standby takes the zone, and the ingress
        # keepers start a new standby once the zone serves again, so that no process
        # start competes for the CPU with the takeover (api/standby.py).
        "max_restarts": 0 if standby else -1,
        # Calls are not retried by Ray: the ingress retries with its own bounded
        # policy, and every method is idempotent (sellerOrderId, ping recordedAt).
        "max_task_retries": 0,
        # Ping batches overlap their round trips; ZoneCore's ZoneLock still runs
        # assignment, refreshes and sweeps one at a time (an async actor would otherwise
        # interleave up to 1000 calls, so the bound also caps memory under bursts).
        "max_concurrency": ZONE_MAX_CONCURRENCY,
        "num_cpus": 0,
        # Spread zones over the nodes that can host them, so no node carries most of
        # the zones (and a lost node takes as few as possible with it).
        "scheduling_strategy": "SPREAD",
    }
    if resource_units > 0:
        options["resources"] = {ZONE_RESOURCE: resource_units}
    if node_id is not None:
        # Soft: if the node died or filled up meanwhile, any other node will do.
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id, soft=True
        )
    if excluded:
        # A hard constraint that holds under SPREAD and the soft affinity's fallback alike.
        options["label_selector"] = {
            NODE_ID_LABEL: f"!in({','.join(sorted(excluded))})"
        }
    return options
