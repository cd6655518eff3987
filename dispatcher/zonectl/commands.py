"""`dispatcher zones list|rebalance|drain|reopen`: operator commands against a running Ray cluster."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from typing import TextIO

from dispatcher.actors.hosting import closed_nodes, reopen_node
from dispatcher.config import Settings
from dispatcher.zonectl.placement import Move
from dispatcher.zonectl.rebalance import (
    MoveResult,
    node_states,
    placements,
    rebalance,
    resolve_node,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    zones = sub.add_parser(
        "zones", help="list or rebalance the zone actors of a running cluster"
    )
    actions = zones.add_subparsers(dest="zones_command", required=True)
    listing = actions.add_parser(
        "list",
        help="each zone actor (node, process, state, epoch, drivers) and each node (open or closed)",
    )
    listing.add_argument(
        "--json", action="store_true", help="one JSON document instead of a table"
    )
    moving = actions.add_parser(
        "rebalance",
        help="move zone actors so every node hosts an even share (one at a time)",
    )
    moving.add_argument(
        "--dry-run", action="store_true", help="print the plan, move nothing"
    )
    moving.add_argument(
        "--drain-node",
        dest="draining",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="close this node to zones (an id or its prefix, from `zones list`) and move every "
        "zone off it, e.g. before taking it down for an upgrade; it takes no zone again "
        "until `zones reopen-node`; repeatable",
    )
    moving.add_argument(
        "--all",
        dest="every_zone",
        action="store_true",
        help="also hand every other zone over to a new process on its own node "
        "(a rolling restart of all zones)",
    )
    moving.add_argument(
        "--json", action="store_true", help="print the results as JSON at the end"
    )
    drain = actions.add_parser(
        "drain",
        help="close a node to zones and move every zone off it (same as "
        "`rebalance --drain-node`); it takes no zone until `zones reopen`",
    )
    drain.add_argument(
        "nodes",
        nargs="+",
        metavar="NODE_ID",
        help="a node id or its prefix, as `zones list` shows it",
    )
    drain.add_argument(
        "--json", action="store_true", help="print the results as JSON at the end"
    )
    drain.set_defaults(every_zone=False, dry_run=False)
    reopen = actions.add_parser(
        "reopen",
        aliases=["reopen-node"],
        help="let zones start again on a node closed by a drain",
    )
    reopen.add_argument(
        "node",
        metavar="NODE_ID",
        help="a node id or its prefix (`zones list` shows closed ones)",
    )
    reopen.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if settings.ray_address is None:
        print(
            "dispatcher zones: set DISPATCHER_RAY_ADDRESS to the cluster's address "
            "(zone actors of a laptop run live and die with its `dispatcher serve`)",
            file=sys.stderr,
        )
        return 2
    import ray

    out = sys.stdout
    # Ray prints its own notices ("a worker died ...") to stdout from a background
    # thread, even with log_to_driver off: they go to stderr, so that stdout carries only
    # this command's answer (one JSON document with --json).
    with contextlib.redirect_stdout(sys.stderr):
        ray.init(
            address=settings.ray_address,
            namespace=settings.ray_namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        try:
            if args.zones_command == "list":
                return _list(
                    settings.ray_namespace,
                    settings.zone_resource_units,
                    as_json=args.json,
                    out=out,
                )
            if args.zones_command in ("reopen", "reopen-node"):
                return _reopen(
                    settings.ray_namespace, args.node, as_json=args.json, out=out
                )
            return _rebalance(args, settings, out=out)
        finally:
            ray.shutdown()


def _list(namespace: str, resource_units: float, *, as_json: bool, out: TextIO) -> int:
    found = placements(namespace)
    standbys = {p.zone_id: p for p in placements(namespace, standbys=True)}
    nodes = node_states(namespace, resource_units)
    if as_json:
        _print(
            out,
            json.dumps(
                {
                    "zones": [dataclasses.asdict(p) for p in found],
                    "standbys": [dataclasses.asdict(p) for p in standbys.values()],
                    "nodes": [dataclasses.asdict(n) for n in nodes],
                },
                indent=2,
            ),
        )
        return 0
    _print(
        out,
        f"{'zone':<17} {'node':<10} {'pid':>7} {'state':<11} {'epoch':>5} {'drivers':>7} {'standby':<10}",
    )
    for p in found:
        standby = standbys.get(p.zone_id)
        standby_node = _short(standby.node_id) if standby is not None else "-"
        _print(
            out,
            f"{p.zone_id:<17} {_short(p.node_id):<10} {p.pid:>7} {p.state:<11} {p.epoch:>5} {p.drivers:>7} {standby_node:<10}",
        )
    _print(
        out,
        f"{len(found)} zones on {len({p.node_id for p in found if p.node_id})} nodes",
    )
    hosted = {n.node_id: sum(p.node_id == n.node_id for p in found) for n in nodes}
    _print(out, f"\n{'node':<10} {'state':<8} {'zones':>5} {'slots':>5}")
    for n in nodes:
        _print(
            out,
            f"{_short(n.node_id):<10} {n.state:<8} {hosted[n.node_id]:>5} {n.zone_slots:>5g}",
        )
    return 0


def _reopen(namespace: str, prefix: str, *, as_json: bool, out: TextIO) -> int:
    # A closed node may have died since; match the closed list, not only alive nodes.
    matches = [n for n in closed_nodes(namespace) if n.startswith(prefix)]
    node_id = matches[0] if len(matches) == 1 else resolve_node(prefix)
    was_closed = reopen_node(namespace, node_id)
    if as_json:
        _print(out, json.dumps({"node_id": node_id, "was_closed": was_closed}))
    else:
        _print(
            out,
            f"node {_short(node_id)} {'reopened to zones' if was_closed else 'was not closed'}",
        )
    return 0


def _rebalance(args: argparse.Namespace, settings: Settings, *, out: TextIO) -> int:
    def report(index: int, total: int, move: Move, result: MoveResult | None) -> None:
        head = f"[{index}/{total}] zone {move.zone_id}: {_short(move.source)} -> {_short(move.target)}"
        if result is None:
            line = f"{head} (dry run)"
        elif result.error is not None:
            line = f"{head} NOT MOVED: {result.error}"
        else:
            line = (
                f"{head} landed on {_short(result.landed)}, epoch {result.epoch_before} -> "
                f"{result.epoch_after}, {result.seconds:.2f} s"
            )
        print(line, file=sys.stderr if args.json else out, flush=True)

    results = rebalance(
        settings.ray_namespace,
        settings.zone_resource_units,
        every_zone=args.every_zone,
        draining=args.nodes if args.zones_command == "drain" else args.draining,
        dry_run=args.dry_run,
        progress=report,
    )
    if args.json:
        _print(
            out,
            json.dumps({"moves": [dataclasses.asdict(r) for r in results]}, indent=2),
        )
    elif not args.dry_run:
        _print(
            out,
            f"{sum(r.error is None for r in results)} of {len(results)} zones moved",
        )
    return 1 if any(r.error is not None for r in results) else 0


def _print(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


def _short(node_id: str) -> str:
    return node_id[:8] if node_id else "-"
