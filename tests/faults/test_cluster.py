"""Scale-out faults on a 3-node local cluster: a node lost under load, a node added and rebalanced."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from dispatcher.bench.cluster import LocalRayCluster
from dispatcher.config import ResolvedSettings
from dispatcher.embedded import free_port
from dispatcher.zoning import Zoning
from tests.faults.cluster import (
    FAST_NODE_LOSS,
    SteadyLoad,
    placements,
    zone_call_retries,
    zones_command,
)
from tests.faults.helpers import (
    ScriptedReceiver,
    ServeProcess,
    assert_booking_invariants,
    remote_api,
    serve_env,
    wait_until,
)
from tests.support import BERLIN, Api, zone_cells

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPLICAS = 2
DRIVERS_PER_ZONE = 30


@dataclass
class ClusterStack:
    cluster: LocalRayCluster
    settings: ResolvedSettings
    env: dict[str, str]
    apis: list[Api]
    load: SteadyLoad


@contextlib.asynccontextmanager
async def cluster_stack(
    workers: int, make_settings: Callable[..., ResolvedSettings], tmp_path: Path
) -> AsyncIterator[ClusterStack]:
    """`workers` worker nodes, REPLICAS `dispatcher serve` processes sharing the zones,
    and drivers online in the seven zones around Berlin."""
    cluster = LocalRayCluster(system_config=FAST_NODE_LOSS)
    replicas: list[ServeProcess] = []
    try:
        for _ in range(workers):
            cluster.add_worker()
        settings = make_settings(
            ray_address=cluster.address,
            zone_resource_units=1,
            heartbeat_ttl_s=600,
            search_radius_km=8.0,
        )
        env = serve_env(settings, port=0)
        for n in range(REPLICAS):
            replica = ServeProcess(
                serve_env(settings, port=free_port()), tmp_path / f"serve-{n}.log"
            )
            replicas.append(replica)
        await asyncio.gather(*(r.start() for r in replicas))
        async with contextlib.AsyncExitStack() as stack:
            apis = [
                await stack.enter_async_context(
                    remote_api(f"http://127.0.0.1:{r.env['DISPATCHER_PORT']}", settings)
                )
                for r in replicas
            ]
            zoning = Zoning(settings.zone_resolution)
            load = SteadyLoad(apis, zoning, zone_cells(zoning.zone_of(*BERLIN)))
            await load.add_drivers(DRIVERS_PER_ZONE)
            yield ClusterStack(cluster, settings, env, apis, load)
    finally:
        for replica in replicas:
            await replica.stop()
        await asyncio.to_thread(cluster.shutdown)


async def assert_webhooks_exactly_once(
    pool: asyncpg.Pool, hooks: ScriptedReceiver, load: SteadyLoad
) -> None:
    """Every delivery's `delivery.assigned` arrived, each webhook-id accepted once."""

    async def drained() -> bool:
        pending = await pool.fetchval(
            "SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL"
        )
        return bool(pending == 0)

    await wait_until(drained, within_s=60, what="outbox drained")
    delivered = hooks.delivered()
    assert delivered and max(delivered.values()) == 1, [
        i for i, n in delivered.items() if n > 1
    ]
    bodies = hooks.bodies().values()
    assigned = Counter(
        b["data"]["sellerOrderId"] for b in bodies if b["type"] == "delivery.assigned"
    )
    booked = {s for s, sent in load.orders.items() if sent.body["assigned"]}
    assert set(assigned) == booked
    assert max(assigned.values()) == 1


async def test_node_lost_under_load_restarts_its_zones_elsewhere_and_loses_nothing(
    fault_settings: Callable[..., ResolvedSettings],
    own_pool: asyncpg.Pool,
    scripted_receiver: ScriptedReceiver,
    tmp_path: Path,
    recovery: Callable[[str, float], None],
) -> None:
    async with cluster_stack(3, fault_settings, tmp_path) as stack:
        load = stack.load
        before = await placements(stack.env)
        assert set(before) == set(load.cells), "every zone has its actor"
        hosts = Counter(p["node_id"] for p in before.values())
        assert set(hosts) <= set(stack.cluster.workers), (
            "a zone actor landed on the head"
        )
        assert len(hosts) >= 2, f"zones not spread over the workers: {hosts}"
        victim, _ = hosts.most_common(1)[0]
        lost = sorted(z for z, p in before.items() if p["node_id"] == victim)

        async with load.running():
            await asyncio.sleep(3)
            lost_at = time.monotonic()
            await asyncio.to_thread(stack.cluster.lose_worker, victim)

            async def lost_zones_answer() -> bool:
                return set(load.answered_again(lost, lost_at)) == set(lost)

            await wait_until(
                lost_zones_answer,
                within_s=90,
                interval_s=0.1,
                what="lost zones answering",
            )
            await asyncio.sleep(2)

        recovered = load.answered_again(lost, lost_at)
        recovery(
            f"node lost ({len(lost)} of {len(before)} zones) -> all answer",
            max(recovered.values()),
        )
        after = await placements(stack.env)
        for zone_id in lost:
            assert after[zone_id]["node_id"] in stack.cluster.workers, after[zone_id]
            assert after[zone_id]["state"] == "active"
            assert after[zone_id]["epoch"] > before[zone_id]["epoch"], (
                "the new incarnation took a new epoch"
            )
        epochs = {
            r["zone_id"]: r["epoch"]
            for r in await own_pool.fetch("SELECT zone_id, epoch FROM zones")
        }
        assert all(epochs[z] == after[z]["epoch"] for z in after), (
            "PostgreSQL's epoch is the live one's"
        )
        retries = await zone_call_retries(stack.apis)
        print(
            f"node loss: {len(load.orders)} orders, {len(load.pings)} pings, "
            f"ingress retried {retries} zone calls, clients retried {dict(load.retried)}"
        )
        assert retries > 0, "the load never reached a lost zone"
        assert len(load.orders) > 20 and len(load.pings) > 100, "the load did not flow"
        await load.assert_nothing_lost(own_pool)
        await assert_booking_invariants(own_pool)
        await assert_webhooks_exactly_once(own_pool, scripted_receiver, load)


async def test_rebalance_onto_added_nodes_then_draining_one_hands_zones_over_cleanly_under_load(
    fault_settings: Callable[..., ResolvedSettings],
    own_pool: asyncpg.Pool,
    scripted_receiver: ScriptedReceiver,
    tmp_path: Path,
    recovery: Callable[[str, float], None],
) -> None:
    async with cluster_stack(1, fault_settings, tmp_path) as stack:
        load = stack.load
        before = await placements(stack.env)
        (first_node,) = {p["node_id"] for p in before.values()}
        # Raylets start from the main thread only (Ray installs signal handlers).
        added = [stack.cluster.add_worker() for _ in range(2)]

        async with load.running():
            await asyncio.sleep(2)
            result = await zones_command(stack.env, "rebalance")
            await asyncio.sleep(1)
            middle = await placements(stack.env)
            # Then empty the first node, as before taking it down for an upgrade.
            drained = await zones_command(
                stack.env, "rebalance", "--drain-node", first_node[:12]
            )
            await asyncio.sleep(2)

        moves = result["moves"]
        print(result["stderr"], drained["stderr"])
        assert all(m["error"] is None for m in moves), moves
        # 7 zones over 3 nodes: 3/2/2, so 4 handoffs, each onto a new node.
        assert len(moves) == 4 and {m["landed"] for m in moves} == set(added), moves
        spread = Counter(p["node_id"] for p in middle.values())
        assert max(spread.values()) - min(spread.values()) <= 1 and set(spread) == {
            first_node,
            *added,
        }
        evacuated = drained["moves"]
        assert {m["zone_id"] for m in evacuated} == {
            z for z, p in middle.items() if p["node_id"] == first_node
        }
        assert all(m["error"] is None and m["landed"] in added for m in evacuated), (
            evacuated
        )
        moves += evacuated
        recovery("rebalance: slowest zone handoff", max(m["seconds"] for m in moves))
        after = await placements(stack.env)
        assert set(after) == set(load.cells)
        assert sorted(Counter(p["node_id"] for p in after.values()).values()) == [3, 4]
        assert first_node not in {p["node_id"] for p in after.values()}
        for move in moves:
            zone_id = move["zone_id"]
            assert move["epoch_after"] == move["epoch_before"] + 1, move
            assert after[zone_id]["state"] == "active"
            assert after[zone_id]["epoch"] >= move["epoch_after"]
        retries = await zone_call_retries(stack.apis)
        print(
            f"rebalance: {len(load.orders)} orders, {len(load.pings)} pings, "
            f"ingress retried {retries} zone calls, clients retried {dict(load.retried)}"
        )
        assert retries > 0, "no call met a handoff: the load did not overlap the moves"
        # A clean handoff: the ingress retried the calls it held back, no client saw an error.
        assert not load.retried, load.retried
        await load.assert_nothing_lost(own_pool)
        await assert_booking_invariants(own_pool)
        await assert_webhooks_exactly_once(own_pool, scripted_receiver, load)
