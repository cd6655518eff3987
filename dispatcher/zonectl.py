"""`dispatcher zones list|rebalance`: operator commands against a running Ray cluster."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from dispatcher.actors.placement import Move
from dispatcher.actors.rebalance import MoveResult, placements, rebalance
from dispatcher.config import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    zones = sub.add_parser(
        "zones", help="list or rebalance the zone actors of a running cluster"
    )
    actions = zones.add_subparsers(dest="zones_command", required=True)
    listing = actions.add_parser(
        "list", help="each zone actor: node, process, state, epoch, drivers"
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
        help="move every zone off this node (an id or its prefix, from `zones list`), e.g. "
        "before taking it down for an upgrade; repeatable",
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


def run(args: argparse.Namespace, settings: Settings) -> int:
    if settings.ray_address is None:
        print(
            "dispatcher zones: set DISPATCHER_RAY_ADDRESS to the cluster's address "
            "(zone actors of a laptop run live and die with its `dispatcher serve`)",
            file=sys.stderr,
        )
        return 2
    import ray

    ray.init(
        address=settings.ray_address,
        namespace=settings.ray_namespace,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        if args.zones_command == "list":
            return _list(settings.ray_namespace, as_json=args.json)
        return _rebalance(args, settings)
    finally:
        ray.shutdown()


def _list(namespace: str, *, as_json: bool) -> int:
    found = placements(namespace)
    if as_json:
        print(json.dumps({"zones": [dataclasses.asdict(p) for p in found]}, indent=2))
        return 0
    print(
        f"{'zone':<17} {'node':<10} {'pid':>7} {'state':<11} {'epoch':>5} {'drivers':>7}"
    )
    for p in found:
        print(
            f"{p.zone_id:<17} {_short(p.node_id):<10} {p.pid:>7} {p.state:<11} {p.epoch:>5} {p.drivers:>7}"
        )
    print(f"{len(found)} zones on {len({p.node_id for p in found if p.node_id})} nodes")
    return 0


def _rebalance(args: argparse.Namespace, settings: Settings) -> int:
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
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    results = rebalance(
        settings.ray_namespace,
        settings.zone_resource_units,
        every_zone=args.every_zone,
        draining=args.draining,
        dry_run=args.dry_run,
        progress=report,
    )
    if args.json:
        print(json.dumps({"moves": [dataclasses.asdict(r) for r in results]}, indent=2))
    elif not args.dry_run:
        print(f"{sum(r.error is None for r in results)} of {len(results)} zones moved")
    return 1 if any(r.error is not None for r in results) else 0


def _short(node_id: str) -> str:
    return node_id[:8] if node_id else "-"
