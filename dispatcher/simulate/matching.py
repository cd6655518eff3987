"""The offline matcher: the service's auto-mode rule behind a small interface, with its own code.

What is shared with the zone actors (imported, not copied): `is_dispatchable` (the mirror's
rule: AVAILABLE and active, located, heartbeat fresh), `haversine_km` (the distance Redis and
PostgreSQL agree on), `bounding_box` (the SQL pre-filter), `search_steps` (the zone core's
widening radii) and `round_km`. What is not: the candidate index (a grid here, Redis GEO and
PostgreSQL there) and the tie-break, which repeats PostgreSQL's `ORDER BY distance_km, d.id`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dispatcher.geo import bounding_box, haversine_km, round_km
from dispatcher.offers.policy import Candidate
from dispatcher.rules import is_dispatchable, search_steps
from dispatcher.simulate.city import Point
from dispatcher.simulate.settings import DispatchRule
from dispatcher.store.drivers import MirrorEntry


@dataclass(frozen=True, slots=True)
class Book:
    """Book this driver at once (auto mode, or an auto-accepting driver)."""

    driver_id: str
    distance_km: float


@dataclass(frozen=True, slots=True)
class Offer:
    """Offer the order to these drivers (nearest first) until `timeout_s`: for offer modes."""

    driver_ids: tuple[str, ...]
    distances_km: tuple[float, ...]
    timeout_s: float


@dataclass(frozen=True, slots=True)
class NoDriver:
    reason: str = "NO_DRIVER_AVAILABLE"


Decision = Book | Offer | NoDriver


class FleetView(Protocol):
    """The drivers a matcher may look at, as the mirror sees them."""

    def entries_in_box(
        self,
        min_lat: float,
        max_lat: float,
        min_lon: float,
        max_lon: float,
        now_s: float,
    ) -> Iterable[MirrorEntry]:
        """AVAILABLE drivers whose last fix lies in the box (a superset is fine)."""
        ...


class Matcher(Protocol):
    """Decides what to do with one order. An offer core plugs in here and returns `Offer`."""

    mode: str

    def decide(
        self, pickup: Point, fleet: FleetView, now_s: float, exclude: frozenset[str]
    ) -> Decision: ...


class NearestDispatchable:
    """Auto mode: the nearest dispatchable driver within the search radius, smaller id on a
    tie, searched in the zone core's widening steps (the first step with anyone holds the
    nearest, since every driver inside that step's circle was looked at)."""

    mode = "auto"

    def __init__(self, rule: DispatchRule) -> None:
        self.rule = rule
        self.steps = search_steps(rule.search_radius_km)

    def decide(
        self, pickup: Point, fleet: FleetView, now_s: float, exclude: frozenset[str]
    ) -> Decision:
        lat, lon = pickup
        ttl = self.rule.heartbeat_ttl_s
        # Each step's box holds the previous one's: measure each driver once.
        seen: dict[str, float | None] = {}
        for radius in self.steps:
            best: tuple[float, str] | None = None
            for entry in fleet.entries_in_box(*bounding_box(lat, lon, radius), now_s):
                if entry.driver_id in seen:
                    distance = seen[entry.driver_id]
                elif entry.driver_id in exclude or not is_dispatchable(
                    entry, now_s, ttl
                ):
                    distance = seen[entry.driver_id] = None
                else:
                    assert (
                        entry.lat is not None and entry.lon is not None
                    )  # is_dispatchable checked
                    distance = seen[entry.driver_id] = haversine_km(
                        lat, lon, entry.lat, entry.lon
                    )
                if (
                    distance is not None
                    and distance <= radius
                    and (best is None or (distance, entry.driver_id) < best)
                ):
                    best = (distance, entry.driver_id)
            if best is not None:
                return Book(best[1], round_km(best[0]))
        return NoDriver()


def nearest_candidates(
    rule: DispatchRule,
    steps: Sequence[float],
    pickup: Point,
    fleet: FleetView,
    now_s: float,
    exclude: Iterable[str],
    count: int,
) -> list[Candidate]:
    """Offer modes: the dispatchable drivers a round may choose from, for the policy's
    `choose` to rank (it keeps the nearest `count`, smaller id on a tie). Searched in the
    same widening steps: the first step holding `count` drivers holds the `count` nearest;
    otherwise everyone within the full radius."""
    lat, lon = pickup
    excluded = set(exclude)
    seen: dict[str, float | None] = {}
    within: list[Candidate] = []
    for radius in steps:
        within = []
        for entry in fleet.entries_in_box(*bounding_box(lat, lon, radius), now_s):
            if entry.driver_id not in seen:
                if entry.driver_id in excluded or not is_dispatchable(
                    entry, now_s, rule.heartbeat_ttl_s
                ):
                    seen[entry.driver_id] = None
                else:
                    assert entry.lat is not None and entry.lon is not None
                    seen[entry.driver_id] = haversine_km(lat, lon, entry.lat, entry.lon)
            distance = seen[entry.driver_id]
            if distance is not None and distance <= radius:
                within.append(Candidate(entry.driver_id, distance))
        if len(within) >= count:
            return within
    return within
