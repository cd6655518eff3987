"""Zone actor options: closed nodes become a label selector Ray accepts."""

from __future__ import annotations

from ray._private.label_utils import validate_label_selector
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dispatcher.actors.hosting import NODE_ID_LABEL
from dispatcher.actors.options import zone_actor_options

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
