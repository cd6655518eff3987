"""How fast Ray alone brings back the actors of a lost node: the floor under a zone's node-loss time.

    python -m benchmarks.restartfloor [--actors 3] [--preload]

Starts a local cluster (a head and 3 worker nodes, the health checks of FAST_NODE_LOSS),
places detached actors with max_restarts=-1 on one worker, kills that node as a lost
machine would, and prints, after the kill: when the GCS declared the node dead, when each
actor's new process ran its constructor, and when each answered a call again. Two kinds
of actor: `bare` (no import beyond Ray) and `dispatcher` (imports the zone actor's
modules, as a zone's process does before its constructor). A zone then still has to
take its epoch and rebuild its shard and mirror from PostgreSQL.

With --preload, every node's Python workers import the zone actor's modules before they
accept work (Ray's `preload_python_modules`), and a raylet keeps the workers it prestarts
at start-up (`num_prestart_python_workers` = its CPUs) idle: an actor restarted onto an
idle preloaded worker skips both the process start and the imports.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections import Counter
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

# How long to wait for every actor to answer again before giving up.
CEILING_S = 120.0


class Probe:
    """Reports when its process started and when its constructor ran."""

    def __init__(self, module: str) -> None:
        self.imported_at = time.time()
        if module:
            importlib.import_module(module)
        self.constructed_at = time.time()

    def born(self) -> tuple[float, float, str]:
        return (
            self.imported_at,
            self.constructed_at,
            str(ray.get_runtime_context().get_node_id()),
        )


def run(actors: int, *, preload: bool = False) -> dict[str, Any]:
    # Imported here: an actor's process imports this module, and `bare` must stay bare.
    from dispatcher.actors.options import ZONE_RESOURCE
    from tests.support.raycluster import FAST_NODE_LOSS, LocalRayCluster

    config: dict[str, Any] = dict(FAST_NODE_LOSS)
    if preload:
        config["preload_python_modules"] = ["dispatcher.actors.zone"]
    cluster = LocalRayCluster(system_config=config)
    try:
        workers = [cluster.add_worker() for _ in range(3)]
        victim = workers[0]
        ray.init(address=cluster.address, namespace="restartfloor", log_to_driver=False)
        remote = ray.remote(Probe)
        handles: dict[str, Any] = {}
        for kind, module in (("bare", ""), ("dispatcher", "dispatcher.actors.zone")):
            for n in range(actors):
                handles[f"{kind}-{n}"] = remote.options(
                    name=f"{kind}-{n}",
                    lifetime="detached",
                    max_restarts=-1,
                    max_task_retries=0,
                    num_cpus=0,
                    resources={ZONE_RESOURCE: 1},
                    # Soft: on the victim now, anywhere else once it is gone.
                    scheduling_strategy=NodeAffinitySchedulingStrategy(
                        victim, soft=True
                    ),
                ).remote(module)
        first = {
            name: ray.get(h.born.remote(), timeout=CEILING_S)
            for name, h in handles.items()
        }
        assert Counter(b[2] for b in first.values()) == {victim: len(handles)}, (
            "not all on the victim"
        )
        lost_at = time.time()
        cluster.lose_worker(victim)
        answered: dict[str, float] = {}
        born: dict[str, tuple[float, float, str]] = {}
        while len(answered) < len(handles) and time.time() - lost_at < CEILING_S:
            for name, handle in handles.items():
                if name in answered:
                    continue
                try:
                    born[name] = ray.get(handle.born.remote(), timeout=0.2)
                    answered[name] = time.time()
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
        dead_at = cluster.node_dead_at(victim)
        return {
            "dead_s": None if dead_at is None else dead_at - lost_at,
            "actors": {
                name: {
                    "process_started_s": born[name][0] - lost_at,
                    "constructed_s": born[name][1] - lost_at,
                    "answered_s": answered[name] - lost_at,
                }
                for name in sorted(answered)
            },
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--actors", type=int, default=3, help="actors of each kind on the lost node"
    )
    parser.add_argument(
        "--preload",
        action="store_true",
        help="workers import the zone actor's modules before accepting work",
    )
    args = parser.parse_args()
    result = run(args.actors, preload=args.preload)
    dead = result["dead_s"]
    print(
        f"GCS declared the node dead: {'?' if dead is None else f'{dead:.2f}'} s after the kill"
    )
    print(
        f"{'actor':<14} {'process up':>10} {'constructed':>11} {'answers':>8}   (s after the kill)"
    )
    for name, t in result["actors"].items():
        print(
            f"{name:<14} {t['process_started_s']:>10.2f} {t['constructed_s']:>11.2f} {t['answered_s']:>8.2f}"
        )


if __name__ == "__main__":
    main()
