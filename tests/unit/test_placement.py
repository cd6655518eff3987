"""plan_rebalance: even shares, fewest moves, stranded zones first, deterministic."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, strategies as st

from dispatcher.actors.placement import Move, plan_rebalance


def apply(placements: dict[str, str], moves: list[Move]) -> dict[str, str]:
    out = dict(placements)
    for move in moves:
        assert out[move.zone_id] == move.source, "a move starts where the zone is"
        out[move.zone_id] = move.target
    return out


def test_added_node_takes_its_share_from_the_crowded_one() -> None:
    placements = {f"z{i}": "a" for i in range(7)}
    moves = plan_rebalance(placements, ["a", "b", "c"])
    assert len(moves) == 4
    assert Counter(apply(placements, moves).values()) == {"a": 3, "b": 2, "c": 2}
    assert {m.target for m in moves} == {"b", "c"}


def test_balanced_cluster_needs_no_move() -> None:
    assert plan_rebalance({"z1": "a", "z2": "b", "z3": "a"}, ["a", "b"]) == []


def test_zones_on_a_node_outside_the_set_move_first() -> None:
    placements = {"z1": "head", "z2": "a", "z3": "b"}
    moves = plan_rebalance(placements, ["a", "b"])
    assert moves[0] == Move("z1", "head", "a")
    assert "head" not in apply(placements, moves).values()


def test_no_node_to_host_zones_means_no_plan() -> None:
    assert plan_rebalance({"z1": "a"}, []) == []


def test_the_plan_is_deterministic() -> None:
    placements = {f"z{i}": "abc"[i % 2] for i in range(9)}
    assert plan_rebalance(placements, ["c", "b", "a"]) == plan_rebalance(
        dict(reversed(placements.items())), ["a", "b", "c"]
    )


@given(
    st.dictionaries(
        st.text("xyz0123", min_size=1, max_size=4),
        st.sampled_from("abcdh"),
        max_size=40,
    ),
    st.sets(st.sampled_from("abcd"), min_size=1),
)
def test_after_the_plan_every_node_is_within_one_zone(
    placements: dict[str, str], nodes: set[str]
) -> None:
    moves = plan_rebalance(placements, sorted(nodes))
    after = apply(placements, moves)
    counts = Counter(after.values())
    assert set(counts) <= nodes
    spread = [counts.get(n, 0) for n in nodes]
    assert max(spread) - min(spread) <= 1
    # Each zone moves at most once, and a zone already in place and not needed elsewhere stays.
    assert len({m.zone_id for m in moves}) == len(moves)
    stranded = sum(1 for n in placements.values() if n not in nodes)
    ideal = max(len(placements) // len(nodes), 0)
    excess = sum(
        max(0, c - (ideal + 1))
        for n, c in Counter(placements.values()).items()
        if n in nodes
    )
    assert len(moves) <= stranded + excess + len(nodes)
