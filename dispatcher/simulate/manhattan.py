"""Manhattan: 2018 taxi demand per weekday and 15-minute slot, from the shipped table (data/README.md)."""

from __future__ import annotations

import functools
import gzip
import json
import random
from importlib import resources
from typing import Any

from dispatcher.simulate.city import DAY_S, SLOT_S, Point, Weighted, jitter

TABLE = "manhattan.json.gz"
TOTALS = "manhattan.totals.json"
# The shipped points are uniform inside each zone; a little jitter keeps repeated draws
# of one point from stacking drivers and shops on the very same spot.
POINT_JITTER_KM = 0.03
# The source's speeds turn grid (L1) distances into times; a straight line times 4/π
# is the mean L1 length over all directions, so this keeps the source's trip times.
GRID_DETOUR = 4 / 3.141592653589793
WEEKDAYS = 5


def load_table() -> dict[str, Any]:
    """The shipped table, parsed (about 1 MB of JSON)."""
    raw = resources.files("dispatcher.simulate.data").joinpath(TABLE).read_bytes()
    table: dict[str, Any] = json.loads(gzip.decompress(raw))
    return table


def load_totals() -> dict[str, Any]:
    """The source's totals that the build script wrote beside the table."""
    text = resources.files("dispatcher.simulate.data").joinpath(TOTALS).read_text()
    totals: dict[str, Any] = json.loads(text)
    return totals


@functools.cache
def _shared_table() -> dict[str, Any]:
    return load_table()


class ManhattanCity:
    """Orders follow the source's trips: origin zone per weekday and slot, destination per
    origin and 4-hour block, points inside the zones. Every simulated day is a business
    day (the source holds Monday to Friday only): day d plays weekday d mod 5."""

    name = "manhattan"
    detour_factor = GRID_DETOUR

    def __init__(self, table: dict[str, Any] | None = None) -> None:
        self.table = table if table is not None else _shared_table()
        self.zones: list[dict[str, Any]] = self.table["zones"]
        self.points: list[list[Point]] = [
            [(p[0], p[1]) for p in z["points"]] for z in self.zones
        ]
        self._days = self.table["daysIn2018"]
        self._block_slots = self.table["blockHours"] * 3600 // int(SLOT_S)
        self._speeds: list[float] = self.table["speedKmh"]
        self._origins: dict[tuple[int, int], Weighted] = {}
        self._destinations: dict[tuple[int, int], Weighted] = {}
        # Drivers start where orders start, over the whole week.
        per_zone = [0] * len(self.zones)
        for day in self.table["originTrips"]:
            for slot in day:
                per_zone = [a + b for a, b in zip(per_zone, slot, strict=True)]
        self._anywhere = Weighted(per_zone)

    def orders_in_slot(self, day: int, slot: int) -> float:
        weekday = day % WEEKDAYS
        return float(sum(self.table["originTrips"][weekday][slot])) / float(
            self._days[weekday]
        )

    def draw_trip(self, rng: random.Random, day: int, slot: int) -> tuple[Point, Point]:
        weekday = day % WEEKDAYS
        origins = self._origins.get((weekday, slot))
        if origins is None:
            origins = self._origins[(weekday, slot)] = Weighted(
                self.table["originTrips"][weekday][slot]
            )
        o = origins.draw(rng)
        block = slot // self._block_slots
        destinations = self._destinations.get((block, o))
        if destinations is None:
            destinations = self._destinations[(block, o)] = Weighted(
                self.table["pairTrips"][block][o]
            )
        d = destinations.draw(rng)
        return self._point(rng, o), self._point(rng, d)

    def speed_kmh(self, t_s: float) -> float:
        return float(self._speeds[int((t_s % DAY_S) // SLOT_S)])

    def driver_start(self, rng: random.Random) -> Point:
        return self._point(rng, self._anywhere.draw(rng))

    def _point(self, rng: random.Random, zone: int) -> Point:
        points = self.points[zone]
        return jitter(rng, points[int(rng.random() * len(points))], POINT_JITTER_KM)
