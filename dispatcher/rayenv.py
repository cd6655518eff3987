"""Ray settings this service starts Ray with, read by Ray from the environment."""

from __future__ import annotations

import os

# Ray holds a call that failed on a vanished process for up to 1 s (its default), waiting
# for the GCS to say why, before failing it; 0 fails it at once, so a zone's standby takes
# over that much sooner (KubeRay sets the same for its RayService). Read by the calling
# process's Ray core worker (the ingress) when Ray is initialised.
FAIL_FAST_ON_DEAD_ZONES = ("RAY_timeout_ms_task_wait_for_death_info", "0")

# Ray starts its worker processes, zone actors among them, at nice 15 by default, so that
# they yield to the driver. Here the zone actors are the service's hot path: at nice 15 a
# zone gets about 1/20 of a core against anything at nice 0 on its node (the ingress,
# PostgreSQL, a neighbour), and under CPU contention zones answered 20 times slower
# while the rest slowed 2 times (docs/RELIABILITY.md). 0 lets them compete as equals.
# Read by the raylet when it starts: it matters in the process that starts Ray
# (`dispatcher serve` with a local Ray) and in the worker pods (deploy/ray-cluster.yaml).
ZONE_WORKER_NICENESS = ("RAY_worker_niceness", "0")

RAY_ENV = dict((FAIL_FAST_ON_DEAD_ZONES, ZONE_WORKER_NICENESS))


def apply_ray_env() -> None:
    """Call before ray.init() or starting a raylet; an operator's own values win."""
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
