"""Every Redis key the service uses, under one `dispatcher:` prefix."""

from __future__ import annotations

PREFIX = "dispatcher:"

# Per-driver bookkeeping of the mirror itself, so writes from different zone actors
# converge whatever order they arrive in (see store/geo.py UPSERT_LUA).
DRIVER_FIX = f"{PREFIX}driver:fix"  # hash: driver id -> recordedAt (µs) mirrored
DRIVER_ZONE = f"{PREFIX}driver:zone"  # hash: driver id -> zone whose keys hold it
ZONE_KEY_PREFIX = f"{PREFIX}zone:"


def zone_geo(zone_id: str) -> str:
    """GEO set of the zone's dispatchable drivers (member = driver id)."""
    return f"{ZONE_KEY_PREFIX}{zone_id}:geo"


def zone_seen(zone_id: str) -> str:
    """Sorted set driver id -> last heartbeat (Unix s); GEO members cannot expire alone."""
    return f"{ZONE_KEY_PREFIX}{zone_id}:seen"


def zone_built(zone_id: str) -> str:
    """Present once the zone's mirror was rebuilt; missing means Redis lost it."""
    return f"{ZONE_KEY_PREFIX}{zone_id}:built"
