"""Listing zone actors and moving them between nodes with an epoch-fenced handoff."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from dispatcher.actors.hosting import (
    clear_zone_target,
    close_node,
    closed_nodes,
    dying_nodes,
    excluded_nodes,
    live_slot,
    set_live_slot,
    set_zone_target,
    zone_hosts,
    zone_placement,
)
from dispatcher.actors.options import (
    ZONE_RESOURCE,
    ZoneSlot,
    other_slot,
    zone_actor_name,
)
from dispatcher.actors.zone import ZoneActorRemote
from dispatcher.config import ResolvedSettings
from dispatcher.errors import StaleEpochError
from dispatcher.messages import ZonePlacement
from dispatcher.zonectl.placement import Move, plan_rebalance

log = logging.getLogger(__name__)

ZONE_PREFIX = zone_actor_name("")
# A zone that does not say where it is within this long is listed as unreachable (its
# node is likely lost; a busy node's zone answers in well under this).
WHERE_TIMEOUT_S = 10.0
# A drain repeats its plan until no zone is left on a closed node: a zone an ingress
# created just before the node closed can land there after the first listing.
DRAIN_PASSES = 3
# A handoff that has not finished in this long is given up (the zone is left to Ray's
# restart or the next request). A ceiling, not an estimate: a handoff starts a new Python
# process, 1-2 s here when idle, a minute on a machine starved of CPU.
MOVE_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class MoveResult:
    zone_id: str
    source: str
    target: str
    landed: str
    epoch_before: int
    epoch_after: int
    seconds: float
    # Why the move did not happen (the zone stays where it was), else None.
    error: str | None = None


def alive_nodes() -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return [n for n in nodes if n["Alive"]]


@dataclass(frozen=True, slots=True)
class NodeState:
    node_id: str
    # open: takes zones; closed: drained by an operator, takes none until reopened;
    # dying: Ray is draining it; no-room: offers no zone resource (e.g. the head)
    state: str
    zone_slots: float
    # Unix time an operator closed it (a drain), None if it is not closed.
    closed_at: float | None = None


def node_states(namespace: str, resource_units: float) -> list[NodeState]:
    """Every alive node and whether zones may start on it."""
    closed, dying = closed_nodes(namespace), dying_nodes()
    out = []
    for n in sorted(alive_nodes(), key=lambda n: str(n["NodeID"])):
        node_id, slots = str(n["NodeID"]), float(n["Resources"].get(ZONE_RESOURCE, 0))
        if node_id in closed:
            state = "closed"
        elif node_id in dying:
            state = "dying"
        elif resource_units > 0 and slots < resource_units:
            state = "no-room"
        else:
            state = "open"
        since = closed[node_id].closed_at if node_id in closed else None
        out.append(NodeState(node_id, state, slots, since))
    return out


def resolve_node(prefix: str) -> str:
    """The one alive node whose id starts with `prefix` (as `zones list` shows it)."""
    found = [n["NodeID"] for n in alive_nodes() if n["NodeID"].startswith(prefix)]
    if len(found) != 1:
        raise ValueError(
            f"node {prefix!r}: {'no alive node' if not found else 'ambiguous'}"
        )
    return str(found[0])


def zone_ids(namespace: str) -> list[str]:
    """Every zone with a named actor in the namespace (in either slot)."""
    prefixes = (zone_actor_name("", "a"), zone_actor_name("", "b"))
    found = set()
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != namespace:
            continue
        for prefix in prefixes:
            if entry["name"].startswith(prefix):
                found.add(entry["name"][len(prefix) :])
    return sorted(found)


def _handle(zone_id: str, namespace: str, slot: ZoneSlot | None = None) -> Any:
    """The zone's actor in `slot` (default: the live one)."""
    if slot is None:
        slot = live_slot(namespace, zone_id)
    return ray.get_actor(zone_actor_name(zone_id, slot), namespace=namespace)


def placements(namespace: str, *, standbys: bool = False) -> list[ZonePlacement]:
    """Where each zone's live actor runs (with `standbys`: each zone's standby, for
    the zones that have one); asked of all of them at once."""
    asked = []
    for zone_id in zone_ids(namespace):
        slot = live_slot(namespace, zone_id)
        if standbys:
            slot = other_slot(slot)
        try:
            asked.append(
                (zone_id, slot, _handle(zone_id, namespace, slot).where.remote())
            )
        except ValueError:  # it went away between the listing and now (or no standby)
            continue
    out = []
    for zone_id, slot, ref in asked:
        try:
            out.append(ray.get(ref, timeout=WHERE_TIMEOUT_S))
        except (GetTimeoutError, RayActorError):
            out.append(ZonePlacement(zone_id, "", 0, "unreachable", 0, 0, slot=slot))
    return out


def plan(
    namespace: str,
    resource_units: float,
    *,
    every_zone: bool = False,
    draining: Sequence[str] = (),
) -> list[Move]:
    """The moves that even out zones over the nodes. Nodes whose id starts with one of
    `draining` host no zone afterwards (emptied before they are taken down). With
    `every_zone`, every other zone is handed over too, on its own node (a restart of
    every zone process, e.g. to pick up changed settings)."""
    where = {
        p.zone_id: p.node_id for p in placements(namespace) if p.state != "unreachable"
    }
    excluded = excluded_nodes(namespace)
    nodes = [
        n
        for n in zone_hosts(resource_units, excluded)
        if not any(n.startswith(d) for d in draining)
    ]
    moves = plan_rebalance(where, nodes)
    if every_zone:
        moved = {m.zone_id for m in moves}
        moves += [
            Move(z, node, node) for z, node in sorted(where.items()) if z not in moved
        ]
    return moves


def move_zone(
    move: Move, namespace: str, *, timeout_s: float = MOVE_TIMEOUT_S
) -> MoveResult:
    """Hand one zone over to a new incarnation on `move.target`.

    The old incarnation finishes its in-flight calls and then refuses calls (the ingress
    retries them); it is killed; the new one takes the zone with a higher epoch and
    rebuilds its shard and mirror from PostgreSQL before this returns. With standbys,
    the new incarnation is the zone's standby, started on the target (if it is not
    there already) while the old one still serves: the zone stops only to drain and
    be taken, not to start a process.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    slot = live_slot(namespace, move.zone_id)
    old = _handle(move.zone_id, namespace, slot)
    before: ZonePlacement = ray.get(old.where.remote(), timeout=WHERE_TIMEOUT_S)
    settings_json: str = ray.get(old.created_with.remote(), timeout=WHERE_TIMEOUT_S)
    settings = ResolvedSettings.model_validate_json(settings_json)
    # An ingress that re-creates the zone in between (its call met the drained
    # incarnation) starts it on the target too, never back on the source; ingress
    # keepers leave its standby alone until the move is over.
    set_zone_target(namespace, move.zone_id, move.target)
    try:
        if settings.zone_standby:
            successor = _standby_on_target(
                move, namespace, other_slot(slot), settings_json, before, deadline
            )
            ray.get(old.drain.remote(), timeout=max(0.1, deadline - time.monotonic()))
            set_live_slot(namespace, move.zone_id, other_slot(slot))
            after = _take(move.zone_id, successor, deadline)
            # The keepers start a new standby away from the zone's new node.
            ray.kill(old, no_restart=True)
        else:
            ray.get(old.drain.remote(), timeout=timeout_s)
            ray.kill(old, no_restart=True)
            after = _start_successor(move, namespace, slot, settings_json, deadline)
    finally:
        clear_zone_target(namespace, move.zone_id)
    return MoveResult(
        move.zone_id,
        move.source,
        move.target,
        after.node_id,
        before.epoch,
        after.epoch,
        time.monotonic() - started,
    )


def _create(
    move: Move,
    namespace: str,
    slot: ZoneSlot,
    settings_json: str,
    away_from: str | None = None,
) -> Any:
    settings = ResolvedSettings.model_validate_json(settings_json)
    options = zone_placement(
        move.zone_id,
        namespace,
        resource_units=settings.zone_resource_units,
        target=move.target,
        slot=slot,
        away_from=away_from,
        standby=settings.zone_standby,
    )
    return ZoneActorRemote.options(**options).remote(move.zone_id, settings_json, slot)


def _start_successor(
    move: Move, namespace: str, slot: ZoneSlot, settings_json: str, deadline: float
) -> ZonePlacement:
    # Until the GCS has seen the old process die, its name still resolves to it and the
    # "successor" we get is the drained one: ask again until a live one takes the zone.
    # An ingress may also create the successor first (its calls are retried); it starts
    # on the zone's target as well (set_zone_target), or elsewhere if the target filled
    # up or died meanwhile, and the result says where.
    while True:
        handle = _create(move, namespace, slot, settings_json)
        try:
            return _take(move.zone_id, handle, deadline, once=True)
        except (RayActorError, RayTaskError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"zone {move.zone_id}: no successor started in time"
                ) from exc
            time.sleep(0.02)


def _take(
    zone_id: str, handle: Any, deadline: float, *, once: bool = False
) -> ZonePlacement:
    """Have `handle` take the zone (epoch, shard, mirror); a call that meets a drained
    or still-dying incarnation (StaleEpochError, RayActorError) is asked again."""
    while True:
        try:
            placement: ZonePlacement = ray.get(
                handle.warm.remote(), timeout=max(0.1, deadline - time.monotonic())
            )
            return placement
        except (RayActorError, RayTaskError) as exc:
            if isinstance(exc, RayTaskError) and not isinstance(
                exc.cause, StaleEpochError
            ):
                raise
            if once:
                raise
            if time.monotonic() > deadline:
                raise RuntimeError(f"zone {zone_id}: not taken in time") from exc
            time.sleep(0.02)


def _standby_on_target(
    move: Move,
    namespace: str,
    slot: ZoneSlot,
    settings_json: str,
    live: ZonePlacement,
    deadline: float,
) -> Any:
    """The zone's standby, running on the move's target: the one there is kept, one
    elsewhere is replaced. One this creates may land on another open node if the target
    filled up or died meanwhile (never on the live one's node or a closed one)."""
    created = False
    while time.monotonic() < deadline:
        try:
            handle = _handle(move.zone_id, namespace, slot)
            where: ZonePlacement = ray.get(
                handle.where.remote(), timeout=WHERE_TIMEOUT_S
            )
        except ValueError:
            # Off the live one's node, unless the move restarts the zone in place (--all).
            away = None if move.target == live.node_id else live.node_id
            _create(move, namespace, slot, settings_json, away_from=away)
            created = True
            continue
        except (GetTimeoutError, RayActorError):
            # Starting, or a killed one whose name still resolves: ask again.
            time.sleep(0.05)
            continue
        landed_well = where.node_id == move.target or (
            created
            and where.node_id != live.node_id
            and where.node_id not in excluded_nodes(namespace)
        )
        if landed_well and where.state in ("idle", "fenced"):
            return handle
        ray.kill(handle, no_restart=True)
        time.sleep(0.05)
    raise RuntimeError(f"zone {move.zone_id}: no standby started on the target in time")


def rebalance(
    namespace: str,
    resource_units: float,
    *,
    every_zone: bool = False,
    draining: Sequence[str] = (),
    dry_run: bool = False,
    progress: Callable[[int, int, Move, MoveResult | None], None] = lambda *_: None,
) -> list[MoveResult]:
    """Plan, then move zones one at a time (only one zone is ever in handoff).

    `draining` nodes (ids or prefixes) are closed to zones first, for good: no zone
    starts there again, whoever creates it, until `reopen_node`.
    """
    drained = [resolve_node(prefix) for prefix in draining]
    if not dry_run:
        for node_id in drained:
            close_node(namespace, node_id, "drained")
    moves = plan(namespace, resource_units, every_zone=every_zone, draining=drained)
    if dry_run:
        for index, move in enumerate(moves, start=1):
            progress(index, len(moves), move, None)
        return []
    results = _move_all(moves, namespace, progress)
    for _ in range(DRAIN_PASSES if drained else 0):
        stragglers = plan(namespace, resource_units, draining=drained)
        stragglers = [m for m in stragglers if m.source in excluded_nodes(namespace)]
        if not stragglers:
            break
        results += _move_all(stragglers, namespace, progress)
    return results


def _move_all(
    moves: Sequence[Move],
    namespace: str,
    progress: Callable[[int, int, Move, MoveResult | None], None],
) -> list[MoveResult]:
    results: list[MoveResult] = []
    for index, move in enumerate(moves, start=1):
        try:
            result = move_zone(move, namespace)
        except (GetTimeoutError, RayActorError, ValueError, RuntimeError) as exc:
            # Unreachable or gone: left to Ray's restart (or to the next request, which
            # recreates it); the other zones go on.
            log.warning("zone %s not moved: %s", move.zone_id, exc)
            result = MoveResult(
                move.zone_id, move.source, move.target, move.source, 0, 0, 0.0, str(exc)
            )
        results.append(result)
        progress(index, len(moves), move, result)
    return results
