"""The import arrows run one way: api → actors (through the zone client) → store → rules."""

from __future__ import annotations

import ast
import re
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
    # The Ray settings a process sets in its environment before it starts Ray.
    "dispatcher.rayenv": set(),
    # The simulator is a client of the public API; without --url it hosts an ingress itself.
    "dispatcher.simulate": {
        "dispatcher.api",
        "dispatcher.embedded",
        "dispatcher.rayenv",
        "dispatcher.runtime",
        "dispatcher.store",
        "dispatcher.webhooks",
    },
    "dispatcher.cli": {
        "dispatcher.api",
        "dispatcher.rayenv",
        "dispatcher.runtime",
        "dispatcher.simulate",
        "dispatcher.store",
        "dispatcher.zonectl",
    },
}
# The HTTP wire (request and response bodies): storage knows none of it; the zone actor
# renders the answers it stores (models.assigned_body) and hands the store the result.
WIRE = {"dispatcher.models", "dispatcher.offers.wire"}
NO_WIRE = {"dispatcher.store", "dispatcher.webhooks"}
# The ingress reaches zone actors through two modules: the typed client, which calls
# them, and the standby keeper, which places each zone's standby.
ACTOR_GATEWAYS = {"dispatcher.api.zoneclient", "dispatcher.api.standby"}
# The ingress modules that hold a store: the wiring, the Dispatcher service, and the
# engines that own a table of their own. Handlers (routes, auth, inbound, bodies) go
# through the Dispatcher's methods.
STORE_HOLDERS = {
    "dispatcher.api.app",  # wiring: opens the pools, builds the stores
    "dispatcher.api.keys",  # the app keys' types
    "dispatcher.api.service",  # the Dispatcher: every handler's way to the stores
    "dispatcher.api.zonerouter",  # the zones table: which zones exist
    "dispatcher.api.event_hub",  # the driver event log it streams
    "dispatcher.api.offers",  # the offer answers and the backstop over the offer tables
    "dispatcher.api.opsview",  # the operator page's snapshot: one read of its own
    "dispatcher.api.driver_stream",  # builds the hub over that log; its outage errors
    "dispatcher.api.responses",  # renders the DriverRecord the Dispatcher returns
}
# What a handler must not reach through the Dispatcher (its stores and engines).
DISPATCHER_INSIDES = {"drivers", "deliveries", "zones", "router", "offer_store"}
# Modules these rules do not hold yet (each with its reason).
EXEMPT: set[str] = set()


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
        elif mine in NO_WIRE and target in WIRE and here not in EXEMPT:
            found.append(f"{here} imports {target}: storage builds no HTTP bodies")
        elif (
            mine == "dispatcher.api"
            and theirs == "dispatcher.actors"
            and here not in ACTOR_GATEWAYS
        ):
            found.append(
                f"{here} imports {target}: only {sorted(ACTOR_GATEWAYS)} talk to actors"
            )
        elif (
            mine == "dispatcher.api"
            and theirs == "dispatcher.store"
            and here not in STORE_HOLDERS | EXEMPT
        ):
            found.append(f"{here} imports {target}: handlers go through the Dispatcher")
    return found


def _names_the_dispatcher(node: ast.expr) -> bool:
    """`dispatcher`, `self.dispatcher` or `app[DISPATCHER]`."""
    if isinstance(node, ast.Name):
        return node.id == "dispatcher"
    if isinstance(node, ast.Attribute):
        return node.attr == "dispatcher"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Name) and node.slice.id == "DISPATCHER"
    return False


def reaches_around(source: str) -> list[str]:
    """Where `source` uses the Dispatcher's stores or engines instead of its methods."""
    return [
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr in DISPATCHER_INSIDES
        and _names_the_dispatcher(node.value)
    ]


def test_every_module_belongs_to_a_layer() -> None:
    for path in SOURCES:
        layer_of(module_name(path))


def test_imports_run_one_way() -> None:
    wrong = [v for path in SOURCES for v in check(module_name(path), imports_of(path))]
    assert wrong == []


def test_handlers_go_through_the_dispatcher() -> None:
    """Only the Dispatcher (and the processes that own it) touch its stores."""
    wrong = {
        module_name(path): found
        for path in SOURCES
        if module_name(path) != "dispatcher.api.service"
        and module_name(path) not in EXEMPT | {"dispatcher.simulate.service"}
        and (found := reaches_around(path.read_text()))
    }
    assert wrong == {}


SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\s")


def sql_in(source: str) -> list[str]:
    """The string constants of `source` that are SQL statements."""
    return [
        f"line {node.lineno}: {node.value.strip()[:60]}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and SQL.match(node.value)
    ]


def test_sql_lives_in_the_store() -> None:
    """Statements are written in dispatcher/store/ only (and the embedded server's own
    setup); the rest call the store's functions."""
    wrong = {
        module_name(path): found
        for path in SOURCES
        if not module_name(path).startswith(("dispatcher.store", "dispatcher.embedded"))
        and module_name(path) not in EXEMPT | {"dispatcher.simulate.service"}
        and (found := sql_in(path.read_text()))
    }
    assert wrong == {}


def test_sql_is_recognised() -> None:
    assert sql_in('conn.fetch("SELECT zone_id FROM zones")') != []
    assert sql_in('log.info("select a zone")') == []


@pytest.mark.parametrize(
    "source",
    [
        "request.app[DISPATCHER].drivers.get(driver_id)",
        "dispatcher.deliveries.get(order)",
        "self.dispatcher.zones.advance_dispatch(zone, order)",
    ],
)
def test_reaching_around_is_caught(source: str) -> None:
    assert reaches_around(source) != []


def test_the_dispatchers_methods_pass() -> None:
    assert reaches_around("await request.app[DISPATCHER].get_driver(driver_id)") == []


@pytest.mark.parametrize(
    ("here", "target"),
    [
        ("dispatcher.store.drivers", "dispatcher.api.pinggate"),
        ("dispatcher.store.deliveries", "dispatcher.actors.core"),
        ("dispatcher.store.deliveries", "dispatcher.webhooks.sender"),
        ("dispatcher.actors.core", "dispatcher.api.service"),
        ("dispatcher.api.service", "dispatcher.actors.core"),
        ("dispatcher.api.routes.ops", "dispatcher.store.pg"),
        ("dispatcher.api.auth", "dispatcher.store.drivers"),
        ("dispatcher.store.deliveries", "dispatcher.models"),
        ("dispatcher.webhooks.sender", "dispatcher.models"),
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
