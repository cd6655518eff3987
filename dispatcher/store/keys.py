"""Every Redis key the service uses, under one `dispatcher:` prefix."""

from __future__ import annotations

PREFIX = "dispatcher:"


def zone_geo(zone_id: str) -> str:
    """GEO set of the zone's dispatchable drivers (member = driver id)."""
    return f"{PREFIX}zone:{zone_id}:geo"


def zone_seen(zone_id: str) -> str:
    """Sorted set driver id -> last heartbeat (Unix s); GEO members cannot expire alone."""
    return f"{PREFIX}zone:{zone_id}:seen"


def zone_built(zone_id: str) -> str:
    """Present once the zone's mirror was rebuilt; missing means Redis lost it."""
    return f"{PREFIX}zone:{zone_id}:built"
