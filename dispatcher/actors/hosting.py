"""Which nodes may host zones: nodes closed to zones and handoff targets, kept in Ray's KV."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import ray
from ray._private.state import state as ray_state
from ray.experimental import internal_kv

from dispatcher.actors.options import (
    ZONE_RESOURCE,
    ZoneSlot,
    other_slot,
    zone_actor_options,
)

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


def _live_key(namespace: str, zone_id: str) -> bytes:
    return f"{namespace}/zone-live/{zone_id}".encode()


def close_node(namespace: str, node_id: str, reason: str) -> None:
    """No zone may start on `node_id` until `reopen_node`."""
    # Written twice: `closed_at` is stamped once the closure is in the KV, so a zone
    # whose constructor began after `closed_at` is sure to have seen it (and refused).
    for _ in range(2):
        value = json.dumps({"reason": reason, "closed_at": time.time()}).encode()
        internal_kv._internal_kv_put(
            _closed_key(namespace, node_id),
            value,
            overwrite=True,
            namespace=KV_NAMESPACE,
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
    return placement_rule(closed=closed_nodes(namespace), dying=dying_nodes()).excluded


def is_excluded(namespace: str, node_id: str) -> bool:
    """Whether this node must not host a zone (asked by a zone actor as it starts)."""
    if internal_kv._internal_kv_exists(
        _closed_key(namespace, node_id), namespace=KV_NAMESPACE
    ):
        return True
    return node_id in dying_nodes()


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a zone's new incarnation may start: never on `excluded`, and on `target`
    (softly) when one was chosen for it."""

    target: str | None
    excluded: frozenset[str]


def placement_rule(
    *,
    closed: Collection[str],
    dying: Collection[str],
    target: str | None = None,
) -> Placement:
    """The placement rule, pure: a node closed by an operator or dying by Ray's word
    hosts no zone, even as a handoff's target (a target that closed since it was
    chosen is dropped, the zone goes to any open node)."""
    excluded = frozenset(closed) | frozenset(dying)
    return Placement(target if target not in excluded else None, excluded)


def zone_placement(
    zone_id: str,
    namespace: str,
    *,
    resource_units: float,
    target: str | None = None,
    slot: ZoneSlot = "a",
    away_from: str | None = None,
    standby: bool = False,
) -> dict[str, Any]:
    """Ray options for creating (or finding) a zone's actor: the ONE way every zone is
    placed, by an ingress (first call, or a retry that re-creates it by name), by a
    handoff or by a rebalance. Read from Ray's KV at each creation, so it sees a node
    closed a moment ago by any process. `target`: the handoff's chosen node; without
    one, a target published for the zone by a handoff in progress is used.
    `away_from`: the node of the zone's live incarnation, which its standby avoids
    whenever another node can host it. `standby`: the zone has standbys (settings)."""
    if target is None:
        target = zone_target(namespace, zone_id)
    rule = placement_rule(
        closed=closed_nodes(namespace), dying=dying_nodes(), target=target
    )
    excluded = rule.excluded
    if away_from is not None:
        excluded = standby_exclusions(
            excluded, away_from, zone_hosts(resource_units, excluded)
        )
    return zone_actor_options(
        zone_id,
        namespace,
        resource_units=resource_units,
        node_id=rule.target,
        excluded=excluded,
        slot=slot,
        standby=standby,
    )


def standby_exclusions(
    excluded: frozenset[str], live_node: str, hosts: Collection[str]
) -> frozenset[str]:
    """A standby shares no node with its live incarnation, so one lost node never takes
    both; on a single host (a laptop) it shares it, and still covers a crashed process."""
    if any(node != live_node for node in hosts):
        return excluded | {live_node}
    return excluded


def zone_hosts(resource_units: float, excluded: Collection[str]) -> list[str]:
    """Alive nodes that can host a zone actor and are not excluded."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return sorted(
        str(n["NodeID"])
        for n in nodes
        if n["Alive"]
        and n["NodeID"] not in excluded
        and (
            resource_units <= 0
            or n["Resources"].get(ZONE_RESOURCE, 0) >= resource_units
        )
    )


def live_slot(namespace: str, zone_id: str) -> ZoneSlot:
    """The slot whose incarnation holds the zone (`a` until a standby took over)."""
    raw: bytes | None = internal_kv._internal_kv_get(
        _live_key(namespace, zone_id), namespace=KV_NAMESPACE
    )
    return "b" if raw == b"b" else "a"


def set_live_slot(namespace: str, zone_id: str, slot: ZoneSlot) -> None:
    """Hand the zone to `slot`'s incarnation: from now on only it may take the zone
    (a new epoch fences the other's writes once it does)."""
    internal_kv._internal_kv_put(
        _live_key(namespace, zone_id),
        slot.encode(),
        overwrite=True,
        namespace=KV_NAMESPACE,
    )


def standby_slot(namespace: str, zone_id: str) -> ZoneSlot:
    return other_slot(live_slot(namespace, zone_id))


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
