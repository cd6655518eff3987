"""Which nodes may host zones: nodes closed to zones and handoff targets, kept in Ray's KV."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import ray
from ray._private.state import state as ray_state
from ray.experimental import internal_kv

# Ray's own label on every node; a label selector on it keeps zones off given nodes
# (Ray 2.60 `label_selector` with "!in(...)"; it combines with SPREAD and with a soft
# node affinity, and Ray reuses it when it restarts the actor).
NODE_ID_LABEL = "ray.io/node-id"
# Ray's internal KV lives in the GCS (and in its Redis with GCS fault tolerance), so a
# closure outlives every ingress and CLI process but not the cluster, whose node ids it
# names. Keys are scoped by the dispatcher's Ray namespace.
KV_NAMESPACE = "dispatcher"
# A handoff target older than this is ignored (a `zones rebalance` that died mid-move);
# longer than a move may take (rebalance.MOVE_TIMEOUT_S).
TARGET_TTL_S = 360.0


@dataclass(frozen=True, slots=True)
class ClosedNode:
    node_id: str
    reason: str
    closed_at: float


def _closed_key(namespace: str, node_id: str = "") -> bytes:
    return f"{namespace}/closed-node/{node_id}".encode()


def _target_key(namespace: str, zone_id: str) -> bytes:
    return f"{namespace}/zone-target/{zone_id}".encode()


def close_node(namespace: str, node_id: str, reason: str) -> None:
    """No zone may start on `node_id` until `reopen_node`."""
    value = json.dumps({"reason": reason, "closed_at": time.time()}).encode()
    internal_kv._internal_kv_put(
        _closed_key(namespace, node_id), value, overwrite=True, namespace=KV_NAMESPACE
    )


def reopen_node(namespace: str, node_id: str) -> bool:
    """Let zones start on `node_id` again; False if it was not closed."""
    deleted = internal_kv._internal_kv_del(
        _closed_key(namespace, node_id), namespace=KV_NAMESPACE
    )
    return bool(deleted)


def closed_nodes(namespace: str) -> dict[str, ClosedNode]:
    """node id -> why and since when it is closed to zones (by an operator's drain)."""
    prefix = _closed_key(namespace)
    out: dict[str, ClosedNode] = {}
    for key in internal_kv._internal_kv_list(prefix, namespace=KV_NAMESPACE):
        raw: bytes | None = internal_kv._internal_kv_get(
            key, namespace=KV_NAMESPACE
        )  # None once deleted
        if raw is None:  # reopened meanwhile
            continue
        node_id = key[len(prefix) :].decode()
        fields = json.loads(raw)
        out[node_id] = ClosedNode(
            node_id, str(fields["reason"]), float(fields["closed_at"])
        )
    return out


def dying_nodes() -> set[str]:
    """Nodes Ray is draining (autoscaler scale-down, preemption notice): about to go."""
    return set(ray_state.get_draining_nodes())


def excluded_nodes(namespace: str) -> frozenset[str]:
    """Nodes no new or restarted zone may land on."""
    return frozenset(closed_nodes(namespace)) | dying_nodes()


def is_excluded(namespace: str, node_id: str) -> bool:
    """Whether this node must not host a zone (asked by a zone actor as it starts)."""
    if internal_kv._internal_kv_exists(
        _closed_key(namespace, node_id), namespace=KV_NAMESPACE
    ):
        return True
    return node_id in dying_nodes()


def set_zone_target(namespace: str, zone_id: str, node_id: str) -> None:
    """Where a zone being handed over should start, whoever creates its successor (the
    handoff itself, or an ingress retrying a call in between)."""
    value = json.dumps({"node_id": node_id, "at": time.time()}).encode()
    internal_kv._internal_kv_put(
        _target_key(namespace, zone_id), value, overwrite=True, namespace=KV_NAMESPACE
    )


def clear_zone_target(namespace: str, zone_id: str) -> None:
    internal_kv._internal_kv_del(
        _target_key(namespace, zone_id), namespace=KV_NAMESPACE
    )


def zone_target(namespace: str, zone_id: str) -> str | None:
    raw: bytes | None = internal_kv._internal_kv_get(
        _target_key(namespace, zone_id), namespace=KV_NAMESPACE
    )
    if raw is None:
        return None
    fields = json.loads(raw)
    if time.time() - float(fields["at"]) > TARGET_TTL_S:
        return None
    return str(fields["node_id"])


def current_node() -> str:
    return str(ray.get_runtime_context().get_node_id())
