"""Maps a point to its zone (an H3 cell) and a search circle to the zones it may touch."""

from __future__ import annotations

import math
from functools import lru_cache

import h3

from dispatcher.geo import haversine_km

# H3 cells are not perfect hexagons: edge lengths vary by up to about 2x over the
# globe. Treating a cell as this much larger than average keeps border searches safe.
CELL_SLACK = 1.6


class Zoning:
    """Zone = the H3 cell of resolution `resolution` that holds a point."""

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution
        self._edge_km = float(h3.average_hexagon_edge_length(resolution, "km"))

    def zone_of(self, lat: float, lon: float) -> str:
        return str(h3.latlng_to_cell(lat, lon, self.resolution))

    def zones_near(self, lat: float, lon: float, radius_km: float) -> list[str]:
        """Every zone that may hold a point within `radius_km`: home first, then by distance.

        Over-inclusion only costs an empty lookup; missing a zone would miss a driver,
        so the ring count and the distance filter both err wide.
        """
        return list(_zones_near(self.resolution, self._edge_km, lat, lon, radius_km))

    def is_zone(self, zone_id: str) -> bool:
        return (
            bool(h3.is_valid_cell(zone_id))
            and h3.get_resolution(zone_id) == self.resolution
        )

    def centre_of(self, zone_id: str) -> tuple[float, float]:
        lat, lon = h3.cell_to_latlng(zone_id)
        return float(lat), float(lon)


@lru_cache(maxsize=65536)
def _zones_near(
    resolution: int, edge_km: float, lat: float, lon: float, radius_km: float
) -> tuple[str, ...]:
    home = str(h3.latlng_to_cell(lat, lon, resolution))
    # Each ring adds at least about one edge length of distance from any point inside
    # the home cell to the outside of the disk.
    rings = max(1, math.ceil(radius_km * CELL_SLACK / edge_km))
    reach_km = radius_km + edge_km * CELL_SLACK
    near: list[tuple[float, str]] = []
    for cell in h3.grid_disk(home, rings):
        cell = str(cell)
        if cell == home:
            continue
        clat, clon = h3.cell_to_latlng(cell)
        distance = haversine_km(lat, lon, clat, clon)
        if distance <= reach_km:
            near.append((distance, cell))
    near.sort()
    return (home, *(cell for _, cell in near))
