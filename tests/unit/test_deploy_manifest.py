"""deploy/ray-cluster.yaml and the Dockerfile agree with the code they deploy."""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from dispatcher.actors.options import ZONE_RESOURCE, zone_actor_options
from dispatcher.config import Settings
from dispatcher.rayenv import ZONE_WORKER_NICENESS
from tests.support.raycluster import FAST_NODE_LOSS

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "ray-cluster.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

HTTP_PORT = 8080
# Values that must never sit in the manifest as literals.
SECRET_ENV = (
    "DISPATCHER_DATABASE_URL",
    "DISPATCHER_REDIS_URL",
    "DISPATCHER_VENDURE_WEBHOOK_SECRET",
    "DISPATCHER_INBOUND_SECRET",
    "DISPATCHER_ADMIN_TOKEN",
)
HEALTH_CHECK_ENV = (
    "RAY_health_check_initial_delay_ms",
    "RAY_health_check_period_ms",
    "RAY_health_check_timeout_ms",
    "RAY_health_check_failure_threshold",
)
# A node whose raylet is gone (connections refused) is declared dead within a second; one
# that vanished without refusing within half a minute (Ray's defaults: 15 to 65 s).
MAX_REFUSED_DETECTION_MS = 1_000
MAX_VANISHED_DETECTION_MS = 30_000
# A live raylet starved of CPU this long must not be taken for lost: under the CPU hog one
# went 7.5 s unanswered, and with two hogged sessions 20 s (docs/RELIABILITY.md).
MIN_STALL_SURVIVED_MS = 20_000


@cache
def manifest() -> dict[str, Any]:
    loaded = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def spec() -> dict[str, Any]:
    result: dict[str, Any] = manifest()["spec"]
    return result


def head_container() -> dict[str, Any]:
    containers = spec()["headGroupSpec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["ray-head"]
    result: dict[str, Any] = containers[0]
    return result


def worker_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = spec()["workerGroupSpecs"]
    assert groups, "no worker group"
    return groups


def zone_group() -> dict[str, Any]:
    """The worker group that offers the zone resource."""
    offering = [
        g for g in worker_groups() if zone_units_offered(g["rayStartParams"]) > 0
    ]
    assert len(offering) == 1, [g["groupName"] for g in worker_groups()]
    return offering[0]


def all_containers() -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = list(
        spec()["headGroupSpec"]["template"]["spec"]["containers"]
    )
    for group in worker_groups():
        containers.extend(group["template"]["spec"]["containers"])
    return containers


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries: list[dict[str, Any]] = container.get("env", [])
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env names in {container['name']}"
    return {e["name"]: e for e in entries}


def literal(container: dict[str, Any], name: str) -> str:
    entry = env_of(container)[name]
    assert "valueFrom" not in entry, name
    value = entry["value"]
    assert isinstance(value, str), f"{name}: env values must be strings, got {value!r}"
    return value


def zone_units_offered(ray_start_params: dict[str, Any]) -> float:
    """KubeRay wants `resources` as a quoted JSON string: '"{\\"name\\": n}"'."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return 0.0
    inner = json.loads(raw)
    assert isinstance(inner, str), (
        f"resources must be a quoted JSON string, got {raw!r}"
    )
    offered = json.loads(inner)
    assert isinstance(offered, dict)
    return float(offered.get(ZONE_RESOURCE, 0))


def shell_of(container: dict[str, Any]) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


# ---- the resource as a whole ----------------------------------------------------------


def test_manifest_is_a_ray_v1_raycluster_with_in_tree_autoscaling() -> None:
    doc = manifest()
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayCluster"
    assert spec()["enableInTreeAutoscaling"] is True
    # Our container commands replace KubeRay's generated `ray start`.
    assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


def test_ray_version_is_the_installed_ray() -> None:
    assert spec()["rayVersion"] == ray.__version__
    pins = re.findall(
        r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M
    )
    assert pins == [ray.__version__]


def test_head_and_workers_run_the_same_image() -> None:
    images = {c["image"] for c in all_containers()}
    assert len(images) == 1, images
    (image,) = images
    # A pinned tag, never a moving one: zone actors run the code of their node's image.
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest", image


# ---- the head: Ray head + ingress -----------------------------------------------------


def test_head_starts_ray_then_runs_dispatcher_serve_on_the_cluster() -> None:
    head = head_container()
    script = shell_of(head)
    assert head["command"][0] == "/bin/bash"
    # `ray start` without --block, then the ingress owns the container (exec: it gets SIGTERM).
    assert '"${KUBERAY_GEN_RAY_START_CMD/--block/}"' in script
    assert f"exec dispatcher serve --host 0.0.0.0 --port {HTTP_PORT}" in script
    assert script.index("KUBERAY_GEN_RAY_START_CMD") < script.index("dispatcher serve")
    assert literal(head, "DISPATCHER_RAY_ADDRESS") == "auto"


def test_worker_group_autoscales_between_its_bounds() -> None:
    group = zone_group()
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"]
    assert group["minReplicas"] >= 1
    script = shell_of(group["template"]["spec"]["containers"][0])
    assert 'eval "$KUBERAY_GEN_RAY_START_CMD"' in script
    assert "dispatcher serve" not in script


def test_zones_ask_for_the_resource_only_workers_offer() -> None:
    head = head_container()
    units = float(literal(head, "DISPATCHER_ZONE_RESOURCE_UNITS"))
    assert units > 0
    offered = zone_units_offered(zone_group()["rayStartParams"])
    assert offered / units == 32
    head_params = spec()["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0"
    assert zone_units_offered(head_params) == 0
    # What the ingress will ask Ray for with that setting.
    options = zone_actor_options("851f1d4bfffffff", "dispatcher", resource_units=units)
    assert options["resources"] == {ZONE_RESOURCE: units}
    assert options["num_cpus"] == 0


def test_secrets_come_from_secret_key_refs_never_literals() -> None:
    head_env = env_of(head_container())
    for name in SECRET_ENV:
        entry = head_env[name]
        assert "value" not in entry, name
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "dispatcher" and ref["key"], name
        # Required: without them each ingress would make up its own.
        assert ref.get("optional", False) is False, name
    for container in all_containers():
        for name, entry in env_of(container).items():
            if name in SECRET_ENV or name == "DISPATCHER_VENDURE_WEBHOOK_URL":
                assert "secretKeyRef" in entry.get("valueFrom", {}), (
                    container["name"],
                    name,
                )


def test_probes_hit_ready_and_health_on_the_declared_http_port() -> None:
    head = head_container()
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["http"] == HTTP_PORT

    def target(probe: str) -> tuple[str, int]:
        get = head[probe]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert target("readinessProbe") == ("/ready", HTTP_PORT)
    assert target("livenessProbe") == ("/health", HTTP_PORT)
    assert target("startupProbe") == ("/health", HTTP_PORT)
    # /ready can take ~6 s with PostgreSQL down and Ray slow (see the manifest).
    assert head["readinessProbe"]["timeoutSeconds"] > 6


def test_every_container_sets_memory_requests_and_limits() -> None:
    resources = [(c["name"], c["resources"]) for c in all_containers()]
    resources.append(("autoscaler", spec()["autoscalerOptions"]["resources"]))
    for name, res in resources:
        assert res["requests"]["memory"], name
        assert res["limits"]["memory"], name
        assert res["requests"]["memory"] == res["limits"]["memory"], name


def test_head_detects_a_lost_node_quickly_but_not_a_starved_one() -> None:
    head = head_container()
    values = {name: int(literal(head, name)) for name in HEALTH_CHECK_ENV}
    period = values["RAY_health_check_period_ms"]
    timeout = values["RAY_health_check_timeout_ms"]
    threshold = values["RAY_health_check_failure_threshold"]
    assert period > 0 and timeout > 0 and threshold >= 3
    # Refused checks fail at once; unanswered ones run one after another, each waiting
    # up to its timeout (measured by benchmarks/nodedetect.py).
    assert period * threshold <= MAX_REFUSED_DETECTION_MS
    assert (period + timeout) * threshold <= MAX_VANISHED_DETECTION_MS
    assert timeout * threshold >= MIN_STALL_SURVIVED_MS


def test_the_test_cluster_checks_health_as_the_manifest_does() -> None:
    head = head_container()
    for name in HEALTH_CHECK_ENV:
        key = name.removeprefix("RAY_")
        if key != "health_check_initial_delay_ms":  # 0 in tests: nodes start at once
            assert FAST_NODE_LOSS[key] == int(literal(head, name)), name


def test_zone_workers_start_zones_at_the_niceness_serve_uses() -> None:
    """The raylet of each zone pod reads it; `dispatcher serve` sets the same for its own
    local Ray, from one place (dispatcher/rayenv.py)."""
    name, value = ZONE_WORKER_NICENESS
    for container in zone_group()["template"]["spec"]["containers"]:
        assert literal(container, name) == value


def test_every_dispatcher_env_var_is_a_setting() -> None:
    prefix = Settings.model_config["env_prefix"]
    assert prefix == "DISPATCHER_"
    literals: dict[str, str] = {}
    seen = 0
    for container in all_containers():
        for name, entry in env_of(container).items():
            if not name.startswith(prefix):
                continue
            seen += 1
            field = name.removeprefix(prefix).lower()
            assert field in Settings.model_fields, f"{name} is not a Settings field"
            if "value" in entry:
                literals[field] = entry["value"]
    assert seen >= len(SECRET_ENV) + 3
    # The literal values pass the same validation as at start (`serve` exits 2 otherwise).
    settings = Settings.model_validate(literals)
    assert settings.ray_address == "auto"


# ---- the image ------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    result = []
    for statement in joined:
        instruction, _, rest = statement.partition(" ")
        result.append((instruction.upper(), rest.strip()))
    return result


def instructions(name: str) -> list[str]:
    return [
        rest for instruction, rest in dockerfile_instructions() if instruction == name
    ]


def test_dockerfile_builds_from_the_ray_image_of_the_manifest() -> None:
    (base,) = instructions("FROM")
    # Python 3.11: the interpreter constraints.txt was resolved on.
    assert base == f"rayproject/ray:{ray.__version__}-py311"


def test_dockerfile_installs_the_package_with_the_constraints() -> None:
    copied = " ".join(instructions("COPY"))
    for path in ("pyproject.toml", "constraints.txt", "README.md", "dispatcher"):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copied), path
    installs = [r for r in instructions("RUN") if "pip install" in r]
    assert len(installs) == 1
    words = shlex.split(installs[0].split("&&")[0])
    assert words[:2] == ["pip", "install"]
    assert "--no-cache-dir" in words
    assert words[words.index("-c") + 1] == "constraints.txt"
    # The project itself, not editable, without the dev extra.
    assert words[-1] == "."
    assert "-e" not in words and "--editable" not in words
    assert not any("[dev]" in w for w in words)


def test_dockerfile_runs_dispatcher_serve_as_non_root_on_8080() -> None:
    assert instructions("EXPOSE") == [str(HTTP_PORT)]
    (user,) = instructions("USER")
    # Numeric, so that Kubernetes' runAsNonRoot can check it.
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    (cmd,) = instructions("CMD")
    command = json.loads(cmd)  # exec form: the process gets SIGTERM itself
    assert command[:2] == ["dispatcher", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert instructions("ENTRYPOINT") == []


@pytest.mark.parametrize(
    "pattern", [".git", ".venv", "tests", ".mypy_cache", ".pytest_cache"]
)
def test_dockerignore_keeps_local_state_out_of_the_build_context(pattern: str) -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert pattern in patterns
