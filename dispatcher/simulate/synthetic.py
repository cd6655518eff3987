"""A synthetic city of adjustable size and demand: shop hot spots and lunch/dinner rush hours."""

from __future__ import annotations

import random
from dataclasses import dataclass

from dispatcher.simulate.city import DAY_S, SLOT_S, Point, offset

# Orders per hour relative to the day's mean, hour by hour from midnight: quiet nights,
# a lunch peak and a larger dinner peak, as food delivery sees them.
DEFAULT_PROFILE: tuple[float, ...] = (
    0.4,
    0.25,
    0.15,
    0.1,
    0.1,
    0.15,
    0.3,
    0.5,
    0.7,
    0.8,
    0.9,
    1.3,
    2.0,
    1.9,
    1.1,
    0.8,
    0.8,
    1.1,
    1.9,
    2.4,
    2.2,
    1.5,
    0.9,
    0.6,
)


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """The synthetic city's knobs; the defaults make a mid-size city centred on Berlin."""

    centre: Point = (52.52, 13.405)
    size_km: float = 12.0  # side of the square city
    orders_per_hour: float = 120.0  # the day's mean, before the run's demand scale
    hotspots: int = 8
    hotspot_sigma_km: float = 0.6
    hotspot_share: float = 0.7  # pickups at hot spots; the rest anywhere in the city
    drop_radius_km: float = 3.0  # drops fall within this distance of the pickup
    speed_kmh: float = 20.0
    rush_speed_factor: float = (
        0.75  # slower traffic in hours whose demand is at least 1.5 times the mean
    )
    detour_factor: float = 1.3
    profile: tuple[float, ...] = DEFAULT_PROFILE
    # The layout (hot spot places) has its own seed: one city, many runs.
    layout_seed: int = 7


class SyntheticCity:
    """Square city; pickups cluster at hot spots, demand and speed follow the hour of day."""

    name = "synthetic"

    def __init__(self, spec: SyntheticSpec | None = None) -> None:
        self.spec = spec = spec if spec is not None else SyntheticSpec()
        self.detour_factor = spec.detour_factor
        mean = sum(spec.profile) / len(spec.profile)
        self._hourly = [spec.orders_per_hour * v / mean for v in spec.profile]
        layout = random.Random(spec.layout_seed)
        inner = 0.8 * spec.size_km / 2
        self.hotspots: list[Point] = [
            offset(
                spec.centre,
                layout.uniform(-inner, inner),
                layout.uniform(-inner, inner),
            )
            for _ in range(spec.hotspots)
        ]

    def orders_in_slot(self, day: int, slot: int) -> float:
        return self._hourly[int(slot * SLOT_S // 3600) % 24] * SLOT_S / 3600

    def draw_trip(self, rng: random.Random, day: int, slot: int) -> tuple[Point, Point]:
        s = self.spec
        if self.hotspots and rng.random() < s.hotspot_share:
            spot = self.hotspots[int(rng.random() * len(self.hotspots))]
            pickup = self._clip(
                offset(
                    spot,
                    rng.gauss(0, s.hotspot_sigma_km),
                    rng.gauss(0, s.hotspot_sigma_km),
                )
            )
        else:
            pickup = self._anywhere(rng)
        drop = self._clip(
            offset(
                pickup,
                rng.uniform(-1, 1) * s.drop_radius_km,
                rng.uniform(-1, 1) * s.drop_radius_km,
            )
        )
        return pickup, drop

    def speed_kmh(self, t_s: float) -> float:
        hour = int((t_s % DAY_S) // 3600)
        mean = self.spec.orders_per_hour
        rush = mean > 0 and self._hourly[hour] >= 1.5 * mean
        return self.spec.speed_kmh * (self.spec.rush_speed_factor if rush else 1.0)

    def driver_start(self, rng: random.Random) -> Point:
        return self._anywhere(rng)

    def _anywhere(self, rng: random.Random) -> Point:
        half = self.spec.size_km / 2
        return offset(
            self.spec.centre, rng.uniform(-half, half), rng.uniform(-half, half)
        )

    def _clip(self, point: Point) -> Point:
        """Keep a point inside the city's square."""
        half = self.spec.size_km / 2
        south, west = offset(self.spec.centre, -half, -half)
        north, east = offset(self.spec.centre, half, half)
        return min(max(point[0], south), north), min(max(point[1], west), east)
