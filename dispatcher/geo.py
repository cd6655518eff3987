"""Geo maths shared by every lookup path, so Redis and PostgreSQL agree on distances."""

from __future__ import annotations

import math

# Redis GEO uses this radius; using it everywhere keeps the two paths' distances equal.
EARTH_RADIUS_KM = 6372.797560856

# Web Mercator's limit: Redis GEO cannot store latitudes beyond it.
MAX_LATITUDE = 85.05112878


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km, the same formula as `HAVERSINE_SQL`."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlmb = math.radians(lon2 - lon1)
    a = (
        math.sin(dphi / 2) ** 2
        + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def bounding_box(
    lat: float, lon: float, radius_km: float
) -> tuple[float, float, float, float]:
    """(min_lat, max_lat, min_lon, max_lon) enclosing a circle; index pre-filter only.

    Longitudes are not wrapped: near ±180 the box extends past it, and callers match
    longitudes shifted by ±360 as well (see store/deliveries.py PICK_SQL).
    """
    # Padded by a hair so a point exactly on the circle is never lost to float rounding;
    # the exact distance check that follows decides.
    dlat = math.degrees(radius_km / EARTH_RADIUS_KM) * (1 + 1e-9) + 1e-9
    cos_lat = math.cos(math.radians(min(abs(lat) + dlat, 89.9)))
    dlon = min(
        180.0,
        math.degrees(radius_km / (EARTH_RADIUS_KM * max(cos_lat, 1e-9))) * (1 + 1e-9)
        + 1e-9,
    )
    return lat - dlat, lat + dlat, lon - dlon, lon + dlon


def round_km(distance_km: float) -> float:
    """Distances are answered to the metre."""
    return round(distance_km, 3)
