"""The operator page's pure parts: its policy, its asset list, the vendored Leaflet's pin."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dispatcher.api.opsview import driver_state
from dispatcher.api.routes.opspage import (
    ASSETS,
    STATIC,
    content_security_policy,
    tile_origin,
)
from dispatcher.store.opsview import OpsDriverRow

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 1, tzinfo=UTC)
TTL = timedelta(seconds=60)


def test_tile_origins_become_csp_sources() -> None:
    assert tile_origin(None) is None
    assert tile_origin("https://tiles.example.net/{z}/{x}/{y}.png") == (
        "https://tiles.example.net"
    )
    assert tile_origin("http://{s}.tile.example.org:8080/{z}/{x}/{y}.png") == (
        "http://*.tile.example.org:8080"
    )
    policy = content_security_policy(None)
    assert "img-src 'self' data:;" in policy
    assert "connect-src 'self'" in policy and "form-action 'none'" in policy


def test_the_page_loads_only_files_that_ship_with_the_package() -> None:
    html = (ASSETS / "index.html").read_text()
    for name in ("ops.js", "ops.css", "vendor/leaflet/leaflet.js"):
        assert f"/ops/static/{name}" in html
        assert name in STATIC
    assert "index.html" not in STATIC


def test_the_vendored_leaflet_is_the_version_the_lockfile_pins() -> None:
    lock = json.loads((ROOT / "web/ops/package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/leaflet"]
    stamp = (ASSETS / "vendor/leaflet/VERSION.txt").read_text().split()
    assert stamp == ["leaflet", pinned["version"], pinned["license"]]
    assert pinned["license"] == "BSD-2-Clause"
    assert (
        f't.version="{pinned["version"]}"'
        in STATIC["vendor/leaflet/leaflet.js"].read_text()
    )
    assert (ASSETS / "vendor/leaflet/LICENSE.txt").exists()


def row(status: str, seen: datetime | None, offer: str | None = None) -> OpsDriverRow:
    return OpsDriverRow("d", "n", status, 52.5, 13.4, "z", seen, offer)


def test_a_silent_driver_is_stale_whatever_his_status() -> None:
    old = NOW - TTL - timedelta(seconds=1)
    assert driver_state(row("BUSY", old), NOW, TTL) == "stale"
    assert driver_state(row("AVAILABLE", None), NOW, TTL) == "stale"
    assert driver_state(row("BUSY", NOW), NOW, TTL) == "busy"
    assert driver_state(row("AVAILABLE", NOW, "off_1"), NOW, TTL) == "offered"
    assert driver_state(row("AVAILABLE", NOW - TTL), NOW, TTL) == "available"
