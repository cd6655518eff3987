"""Zone placement: closed and dying nodes never host a zone; a label selector Ray accepts."""

from __future__ import annotations

import pytest
from ray._private.label_utils import validate_label_selector
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dispatcher.actors import hosting
from dispatcher.actors.hosting import placement_rule
from dispatcher.actors.options import NODE_ID_LABEL, zone_actor_options

NODE_A = "a" * 56
NODE_B = "b" * 56


def test_no_closed_node_means_plain_spread_and_no_selector() -> None:
    options = zone_actor_options("z", "ns", resource_units=1)
    assert options["scheduling_strategy"] == "SPREAD"
    assert "label_selector" not in options


def test_closed_nodes_are_excluded_by_a_valid_selector_in_a_stable_order() -> None:
    options = zone_actor_options("z", "ns", excluded=frozenset({NODE_B, NODE_A}))
    assert options["label_selector"] == {NODE_ID_LABEL: f"!in({NODE_A},{NODE_B})"}
    assert validate_label_selector(options["label_selector"]) is None
    assert options["scheduling_strategy"] == "SPREAD"


def test_a_handoff_target_keeps_the_exclusion_beside_its_soft_affinity() -> None:
    options = zone_actor_options("z", "ns", node_id=NODE_B, excluded=[NODE_A])
    strategy = options["scheduling_strategy"]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy)
    assert strategy.node_id == NODE_B and strategy.soft
    assert options["label_selector"] == {NODE_ID_LABEL: f"!in({NODE_A})"}


NODE_C = "c" * 56


def test_the_rule_excludes_closed_and_dying_nodes_alike() -> None:
    rule = placement_rule(closed=[NODE_A], dying={NODE_B})
    assert rule.excluded == {NODE_A, NODE_B}
    assert rule.target is None


def test_the_rule_keeps_an_open_target_and_drops_a_closed_or_dying_one() -> None:
    assert placement_rule(closed=[NODE_A], dying=(), target=NODE_C).target == NODE_C
    assert placement_rule(closed=[NODE_A], dying=(), target=NODE_A).target is None
    assert placement_rule(closed=(), dying=[NODE_B], target=NODE_B).target is None


def fake_cluster(
    monkeypatch: pytest.MonkeyPatch,
    *,
    closed: set[str],
    dying: set[str],
    published: str | None,
) -> None:
    """What Ray's KV and GCS would say; zone_placement only reads them."""
    monkeypatch.setattr(
        hosting,
        "closed_nodes",
        lambda _ns: {n: hosting.ClosedNode(n, "drained", 0.0) for n in closed},
    )
    monkeypatch.setattr(hosting, "dying_nodes", lambda: set(dying))
    monkeypatch.setattr(hosting, "zone_target", lambda _ns, _zone: published)


def test_a_recreation_by_name_never_lands_on_a_closed_or_dying_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An ingress's retry: default placement (SPREAD), but never on A (closed) or B (dying).
    fake_cluster(monkeypatch, closed={NODE_A}, dying={NODE_B}, published=None)
    options = hosting.zone_placement("z", "ns", resource_units=1)
    assert options["scheduling_strategy"] == "SPREAD"
    assert options["label_selector"] == {NODE_ID_LABEL: f"!in({NODE_A},{NODE_B})"}
    assert options["get_if_exists"] and options["max_restarts"] == -1


def test_a_recreation_during_a_handoff_follows_the_published_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cluster(monkeypatch, closed={NODE_A}, dying=set(), published=NODE_C)
    strategy = hosting.zone_placement("z", "ns", resource_units=1)[
        "scheduling_strategy"
    ]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy)
    assert strategy.node_id == NODE_C


def test_a_handoff_onto_a_node_closed_meanwhile_goes_to_any_open_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The target was chosen, then an operator closed it: the exclusion wins.
    fake_cluster(monkeypatch, closed={NODE_C}, dying=set(), published=None)
    options = hosting.zone_placement("z", "ns", resource_units=1, target=NODE_C)
    assert options["scheduling_strategy"] == "SPREAD"
    assert options["label_selector"] == {NODE_ID_LABEL: f"!in({NODE_C})"}


def test_a_standby_avoids_its_live_incarnations_node_when_another_can_host_it() -> None:
    excluded = frozenset({NODE_C})
    assert hosting.standby_exclusions(excluded, NODE_A, [NODE_A, NODE_B]) == {
        NODE_A,
        NODE_C,
    }


def test_on_a_single_host_the_standby_shares_the_live_ones_node() -> None:
    # A laptop: still a second process, which covers a crashed zone process.
    assert hosting.standby_exclusions(frozenset(), NODE_A, [NODE_A]) == frozenset()


def test_a_standby_is_named_for_its_slot_and_placed_by_the_same_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cluster(monkeypatch, closed={NODE_C}, dying=set(), published=None)
    monkeypatch.setattr(
        hosting, "zone_hosts", lambda _units, _excluded: [NODE_A, NODE_B]
    )
    options = hosting.zone_placement(
        "z", "ns", resource_units=1, slot="b", away_from=NODE_A
    )
    assert options["name"] == "zone-b:z"
    assert options["label_selector"] == {NODE_ID_LABEL: f"!in({NODE_A},{NODE_C})"}
    assert options["get_if_exists"] and options["max_restarts"] == -1
