"""The import arrows run one way: api → actors (through the zone client) → store → rules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dispatcher"

# Pure modules: no I/O, importable from every process, importing only each other.
PURE = {
    "dispatcher",
    "dispatcher.backoff",
    "dispatcher.config",
    "dispatcher.errors",
    "dispatcher.geo",
    "dispatcher.messages",
    "dispatcher.models",
    # The offer state machine and its wire models: decisions only, no I/O.
    "dispatcher.offers",
    "dispatcher.offers.policy",
    "dispatcher.offers.wire",
    "dispatcher.rules",
    "dispatcher.zoning",
}
# Which layers each layer may import, besides itself and the pure modules.
ALLOWED: dict[str, set[str]] = {
    "pure": set(),
    "dispatcher.embedded": set(),
    "dispatcher.store": set(),
    "dispatcher.webhooks": {"dispatcher.store"},
    "dispatcher.actors": {"dispatcher.store"},
    "dispatcher.api": {"dispatcher.store", "dispatcher.webhooks", "dispatcher.actors"},
    "dispatcher.zonectl": {"dispatcher.actors"},
    "dispatcher.runtime": {"dispatcher.embedded", "dispatcher.webhooks"},
    # The simulator is a client of the public API; without --url it hosts an ingress itself.
    "dispatcher.simulate": {
        "dispatcher.api",
        "dispatcher.embedded",
        "dispatcher.runtime",
        "dispatcher.store",
        "dispatcher.webhooks",
    },
    "dispatcher.cli": {
        "dispatcher.api",
        "dispatcher.runtime",
        "dispatcher.simulate",
        "dispatcher.store",
        "dispatcher.zonectl",
    },
}
# The ingress reaches zone actors through one module: the typed client.
ACTOR_GATEWAY = "dispatcher.api.zoneclient"
# Route handlers go through the Dispatcher service, never to the stores themselves.
ROUTES = "dispatcher.api.routes"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    if module in PURE:
        return "pure"
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to test_layering.py")


def imports_of(path: Path) -> set[str]:
    """Every `dispatcher…` or `benchmarks…` module the file imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from dispatcher.api import routes` names a module too.
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {
        m for m in found if m.split(".")[0] in {"dispatcher", "benchmarks", "tests"}
    }


def _existing(name: str) -> str:
    """The module `name` refers to: itself if it is one, else its parent (a from-import)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        base = ROOT.joinpath(*parts[:end])
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
            return candidate
    return name


SOURCES = sorted(PACKAGE.rglob("*.py"))


def check(here: str, targets: set[str]) -> list[str]:
    """The wrong arrows among `here`'s imports (module names, as `imports_of` gives)."""
    found = []
    mine = layer_of(here)
    for target in sorted({_existing(m) for m in targets}):
        if target.split(".")[0] != "dispatcher":
            found.append(f"{here} imports {target}: the package ships alone")
            continue
        theirs = layer_of(target)
        if theirs not in {"pure", mine} and theirs not in ALLOWED[mine]:
            found.append(f"{here} ({mine}) imports {target} ({theirs})")
        elif (
            mine == "dispatcher.api"
            and theirs == "dispatcher.actors"
            and here != ACTOR_GATEWAY
        ):
            found.append(
                f"{here} imports {target}: only {ACTOR_GATEWAY} talks to actors"
            )
        elif here.startswith(ROUTES) and theirs == "dispatcher.store":
            found.append(f"{here} imports {target}: routes go through the Dispatcher")
    return found


def test_every_module_belongs_to_a_layer() -> None:
    for path in SOURCES:
        layer_of(module_name(path))


def test_imports_run_one_way() -> None:
    wrong = [v for path in SOURCES for v in check(module_name(path), imports_of(path))]
    assert wrong == []


@pytest.mark.parametrize(
    ("here", "target"),
    [
        ("dispatcher.store.drivers", "dispatcher.api.pinggate"),
        ("dispatcher.store.deliveries", "dispatcher.actors.core"),
        ("dispatcher.store.deliveries", "dispatcher.webhooks.sender"),
        ("dispatcher.actors.core", "dispatcher.api.service"),
        ("dispatcher.api.service", "dispatcher.actors.core"),
        ("dispatcher.api.routes.ops", "dispatcher.store.pg"),
        ("dispatcher.rules", "dispatcher.store.pg"),
        ("dispatcher.messages", "dispatcher.actors.zone"),
        ("dispatcher.cli", "benchmarks.stack"),
        ("dispatcher.api.app", "tests.support"),
    ],
)
def test_a_wrong_arrow_is_caught(here: str, target: str) -> None:
    assert check(here, {target}) != []


def test_the_allowed_arrows_pass() -> None:
    assert (
        check(
            "dispatcher.api.zoneclient",
            {"dispatcher.actors.zone", "dispatcher.messages"},
        )
        == []
    )
    assert (
        check("dispatcher.actors.core", {"dispatcher.store.geo", "dispatcher.rules"})
        == []
    )
    assert check("dispatcher.webhooks.sender", {"dispatcher.store.outbox"}) == []
