"""Rebalancing plan: which zone actors to move so every node hosts an even share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Move:
    zone_id: str
    source: str
    target: str


def plan_rebalance(placements: Mapping[str, str], nodes: Sequence[str]) -> list[Move]:
    """The fewest moves after which every node in `nodes` hosts within one zone of
    every other, and no zone stays on a node outside `nodes` (gone, or unable to
    host zones). `placements` maps zone id -> node id.

    Deterministic (zones and nodes taken in sorted order), so a dry run shows what
    the real run will do.
    """
    if not nodes:
        return []
    hosted: dict[str, list[str]] = {node: [] for node in sorted(set(nodes))}
    stranded: list[tuple[str, str]] = []
    for zone_id, node in sorted(placements.items()):
        if node in hosted:
            hosted[node].append(zone_id)
        else:
            stranded.append((zone_id, node))

    def emptiest() -> str:
        return min(hosted, key=lambda n: (len(hosted[n]), n))

    def fullest() -> str:
        return max(hosted, key=lambda n: (len(hosted[n]), n))

    moves: list[Move] = []
    for zone_id, source in stranded:
        target = emptiest()
        hosted[target].append(zone_id)
        moves.append(Move(zone_id, source, target))
    while len(hosted[fullest()]) - len(hosted[emptiest()]) > 1:
        source, target = fullest(), emptiest()
        zone_id = hosted[source].pop()
        hosted[target].append(zone_id)
        moves.append(Move(zone_id, source, target))
    return moves
