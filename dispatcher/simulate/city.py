"""What a simulated city offers: demand per 15-minute slot, trips, speeds, where drivers start."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Sequence
from typing import Protocol

Point = tuple[float, float]  # (lat, lon)

SLOT_S = 900.0  # demand is given per 15-minute slot, as in the Manhattan source
SLOTS_PER_DAY = 96
DAY_S = 86400.0
KM_PER_DEG_LAT = 111.195


class City(Protocol):
    """A city model. Day 0 of simulated time is a Monday; time of day is `t % DAY_S`."""

    name: str
    # Trips are straight lines stretched by this factor (see DriverBehaviour.detour_factor).
    detour_factor: float

    def orders_in_slot(self, day: int, slot: int) -> float:
        """Expected orders in one 15-minute slot, before the run's demand scale."""
        ...

    def draw_trip(self, rng: random.Random, day: int, slot: int) -> tuple[Point, Point]:
        """A (pickup, drop) pair for an order ready in this slot."""
        ...

    def speed_kmh(self, t_s: float) -> float:
        """Straight-line driving speed at simulated time `t_s`."""
        ...

    def driver_start(self, rng: random.Random) -> Point:
        """Where a driver starts a shift."""
        ...


class Weighted:
    """Draws indexes by integer or float weights with one `random()` call each (bisect)."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.cumulative = list(itertools.accumulate(weights))
        self.total = self.cumulative[-1] if self.cumulative else 0.0

    def draw(self, rng: random.Random) -> int:
        return bisect.bisect_right(self.cumulative, rng.random() * self.total)


def offset(point: Point, north_km: float, east_km: float) -> Point:
    """A point `north_km` north and `east_km` east of `point` (small distances)."""
    lat, lon = point
    return lat + north_km / KM_PER_DEG_LAT, lon + east_km / (
        KM_PER_DEG_LAT * math.cos(math.radians(lat))
    )


def jitter(rng: random.Random, point: Point, radius_km: float) -> Point:
    """A uniform point in the disc of `radius_km` around `point`."""
    r = radius_km * math.sqrt(rng.random())
    a = rng.random() * 2 * math.pi
    return offset(point, r * math.cos(a), r * math.sin(a))


def day_and_slot(t_s: float) -> tuple[int, int]:
    day = int(t_s // DAY_S)
    return day, int((t_s - day * DAY_S) // SLOT_S)
