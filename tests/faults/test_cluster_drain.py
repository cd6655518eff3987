"""A drained node hosts no zone again, whoever re-creates or restarts one, until reopened."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dispatcher.config import ResolvedSettings
from tests.support.cluster import (
    assert_webhooks_exactly_once,
    cluster_stack,
    node_states,
    placements,
    zone_call_retries,
    zones_command,
)
from tests.support.faults import ScriptedReceiver, assert_booking_invariants, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(1800)]

# Rounds of killing every zone's process after the drain: each restart of a zone that
# was created before the drain (Ray reuses its first options) may pick the drained node.
RESTART_ROUNDS = 2
# A round restarts every zone's process, a couple at a time per node: seconds on an idle
# machine, a minute or more each on one starved of CPU. A ceiling, not a budget.
RESTART_CEILING_S = 900.0


async def test_a_drained_node_hosts_no_zone_whoever_recreates_it_until_reopened(
    fault_settings: Callable[..., ResolvedSettings],
    own_pool: asyncpg.Pool,
    scripted_receiver: ScriptedReceiver,
    tmp_path: Path,
) -> None:
    async with cluster_stack(3, fault_settings, tmp_path) as stack:
        load = stack.load
        before = await placements(stack.env)
        drained_node, _ = Counter(p["node_id"] for p in before.values()).most_common(1)[
            0
        ]
        on_drained = {z for z, p in before.items() if p["node_id"] == drained_node}

        async with load.running():
            await asyncio.sleep(2)
            # Orders and pings keep hitting every zone, so the ingress replicas retry calls
            # that meet a zone in handoff and re-create it by name meanwhile.
            drain = await zones_command(
                stack.env, "rebalance", "--drain-node", drained_node[:12]
            )
            retries_in_drain = await zone_call_retries(stack.apis)
            for _ in range(RESTART_ROUNDS):
                now = await placements(stack.env)
                assert drained_node not in {p["node_id"] for p in now.values()}, now
                # Ray restarts each zone (max_restarts=-1) with the options it was created with.
                since = time.monotonic()
                for zone in now.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(zone["pid"], signal.SIGKILL)

                async def all_answer_again(since: float = since) -> bool:
                    return set(load.answered_again(load.cells, since)) == set(
                        load.cells
                    )

                await wait_until(
                    all_answer_again,
                    within_s=RESTART_CEILING_S,
                    interval_s=0.2,
                    what="every zone answering again",
                )
            await asyncio.sleep(1)

        print(drain["stderr"])
        moves = drain["moves"]
        assert {m["zone_id"] for m in moves} >= on_drained, moves
        assert all(m["error"] is None and m["landed"] != drained_node for m in moves), (
            moves
        )
        assert retries_in_drain > 0, (
            "no call met the handoff: nothing tried to re-create a zone during it"
        )
        after = await placements(stack.env)
        assert set(after) == set(load.cells)
        assert drained_node not in {p["node_id"] for p in after.values()}, after
        assert all(p["state"] == "active" for p in after.values()), after
        assert (await node_states(stack.env))[drained_node] == "closed"

        # Reopened, the node takes zones again: a rebalance evens them out onto it.
        reopened = await zones_command(stack.env, "reopen-node", drained_node[:12])
        assert reopened["node_id"] == drained_node and reopened["was_closed"]
        assert (await node_states(stack.env))[drained_node] == "open"
        rebalanced = await zones_command(stack.env, "rebalance")
        assert all(m["error"] is None for m in rebalanced["moves"]), rebalanced
        assert drained_node in {
            p["node_id"] for p in (await placements(stack.env)).values()
        }

        await load.assert_nothing_lost(own_pool)
        await assert_booking_invariants(own_pool)
        await assert_webhooks_exactly_once(own_pool, scripted_receiver, load)


# Drains an operator runs at most: a move fails when the zone it moves is killed
# meanwhile (the docs tell the operator to drain again); only the first is disturbed.
DRAIN_ATTEMPTS = 3


async def test_zones_restarted_and_recreated_during_a_drain_never_land_on_the_drained_node(
    fault_settings: Callable[..., ResolvedSettings],
    own_pool: asyncpg.Pool,
    scripted_receiver: ScriptedReceiver,
    tmp_path: Path,
) -> None:
    """While the drain runs, every zone on the other nodes is SIGKILLed again and again:
    Ray restarts each with its first options (created before the drain, no exclusion),
    so a restart can pick the drained node, refuse there, and be re-created by name by
    an ingress's retry; the moved zones' successors are killed too. No zone may start
    on the drained node after the moment it was closed, during the drain or after it."""
    async with cluster_stack(3, fault_settings, tmp_path) as stack:
        load = stack.load
        before = await placements(stack.env)
        drained_node, _ = Counter(p["node_id"] for p in before.values()).most_common(1)[
            0
        ]
        landed: list[dict[str, Any]] = []
        kills = listings = 0
        drains: list[dict[str, Any]] = []

        async with load.running():
            await asyncio.sleep(2)
            for attempt in range(DRAIN_ATTEMPTS):
                drain = asyncio.create_task(
                    zones_command(stack.env, "drain", drained_node[:12], check=False)
                )
                while not drain.done():
                    listing = await zones_command(stack.env, "list")
                    listings += 1
                    closed_at = next(
                        n["closed_at"]
                        for n in listing["nodes"]
                        if n["node_id"] == drained_node
                    )
                    for zone in listing["zones"]:
                        if zone["node_id"] == drained_node:
                            if (
                                closed_at is not None
                                and zone["started_at"] >= closed_at
                            ):
                                landed.append(zone)
                        elif attempt == 0 and zone["pid"] and not drain.done():
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(zone["pid"], signal.SIGKILL)
                                kills += 1
                drains.append(await drain)
                if drains[-1]["returncode"] == 0:
                    break
            since = time.monotonic()

            async def all_answer_again() -> bool:
                return set(load.answered_again(load.cells, since)) == set(load.cells)

            await wait_until(
                all_answer_again,
                within_s=RESTART_CEILING_S,
                interval_s=0.2,
                what="every zone answering again",
            )
            await asyncio.sleep(1)

        for done in drains:
            print(done["stderr"])
        print(
            f"drain with kills: {len(drains)} drain(s), {listings} listings, {kills} zone "
            f"processes killed, ingress retried {await zone_call_retries(stack.apis)} calls, "
            f"{stack.cluster.refused_starts()} starts refused on the closed node"
        )
        assert not landed, (
            f"zones started on the drained node after it closed: {landed}"
        )
        assert kills > 0, "no zone was killed while the drain ran"
        assert drains[-1]["returncode"] == 0, drains[-1]["stderr"]
        moves = [m for done in drains for m in done["moves"]]
        assert all(m["landed"] != drained_node for m in moves), moves
        after = await placements(stack.env)
        assert set(after) == set(load.cells)
        assert drained_node not in {p["node_id"] for p in after.values()}, after
        assert all(p["state"] == "active" for p in after.values()), after
        assert (await node_states(stack.env))[drained_node] == "closed"

        await load.assert_nothing_lost(own_pool)
        await assert_booking_invariants(own_pool)
        await assert_webhooks_exactly_once(own_pool, scripted_receiver, load)
