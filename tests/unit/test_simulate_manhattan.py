"""The shipped Manhattan table keeps the source's totals, and the city draws from it."""

from __future__ import annotations

import random
from typing import Any

import pytest

from dispatcher.geo import haversine_km
from dispatcher.simulate.city import SLOTS_PER_DAY
from dispatcher.simulate.manhattan import ManhattanCity, load_table, load_totals

# Manhattan's land, generously: every shipped point must fall inside.
LAT_RANGE = (40.68, 40.89)
LON_RANGE = (-74.03, -73.90)


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    return load_table()


@pytest.fixture(scope="module")
def totals() -> dict[str, Any]:
    return load_totals()


def test_the_table_names_the_wheel_the_totals_came_from(
    table: dict[str, Any], totals: dict[str, Any]
) -> None:
    assert table["source"]["wheelSha256"] == totals["wheelSha256"]
    assert totals["rows"] == 1_600_497


def test_trips_per_weekday_and_in_all_match_the_source(
    table: dict[str, Any], totals: dict[str, Any]
) -> None:
    by_weekday = [sum(sum(slot) for slot in day) for day in table["originTrips"]]
    assert by_weekday == totals["byWeekday"]
    assert sum(by_weekday) == totals["trips"]
    pairs = sum(sum(sum(row) for row in block) for block in table["pairTrips"])
    assert pairs == totals["trips"]


def test_trips_per_slot_match_the_source(
    table: dict[str, Any], totals: dict[str, Any]
) -> None:
    by_slot = [
        sum(sum(table["originTrips"][d][s]) for d in range(5))
        for s in range(SLOTS_PER_DAY)
    ]
    assert by_slot == totals["bySlot"]


def test_trips_per_origin_and_destination_match_the_source(
    table: dict[str, Any], totals: dict[str, Any]
) -> None:
    ids = [str(z["id"]) for z in table["zones"]]
    origins = dict.fromkeys(ids, 0)
    for day in table["originTrips"]:
        for slot in day:
            for zone, n in zip(ids, slot, strict=True):
                origins[zone] += n
    assert origins == totals["byOrigin"]
    from_pairs = dict.fromkeys(ids, 0)
    to_pairs = dict.fromkeys(ids, 0)
    for block in table["pairTrips"]:
        for o, row in zip(ids, block, strict=True):
            for d, n in zip(ids, row, strict=True):
                from_pairs[o] += n
                to_pairs[d] += n
    assert from_pairs == totals["byOrigin"]
    assert to_pairs == totals["byDestination"]


def test_zones_sit_in_manhattan(table: dict[str, Any]) -> None:
    assert len(table["zones"]) == 61
    for zone in table["zones"]:
        assert len(zone["points"]) == 64
        for lat, lon in [(zone["lat"], zone["lon"]), *zone["points"]]:
            assert (
                LAT_RANGE[0] < lat < LAT_RANGE[1] and LON_RANGE[0] < lon < LON_RANGE[1]
            ), zone["name"]
    by_name = {z["name"]: z for z in table["zones"]}
    # Alphabet City's middle (Avenue B at East 7th Street), from any map: the UTM
    # conversion is right to within a few hundred metres.
    alphabet = by_name["Alphabet City"]
    assert haversine_km(alphabet["lat"], alphabet["lon"], 40.7251, -73.9818) < 0.6


def test_speeds_are_plausible(table: dict[str, Any]) -> None:
    assert len(table["speedKmh"]) == SLOTS_PER_DAY
    assert all(5.0 < v < 60.0 for v in table["speedKmh"])


def test_the_city_expects_the_sources_average_day() -> None:
    city = ManhattanCity()
    totals = load_totals()
    monday = sum(city.orders_in_slot(0, slot) for slot in range(SLOTS_PER_DAY))
    assert monday == pytest.approx(totals["byWeekday"][0] / 53)
    # Day 5 plays Monday again: the source has business days only.
    assert city.orders_in_slot(5, 40) == city.orders_in_slot(0, 40)


def test_drawn_trips_start_where_the_source_says() -> None:
    """Origins drawn for one slot follow that slot's zone counts (each pickup is credited
    to the zone of its nearest shipped point, which lies inside that zone)."""
    city = ManhattanCity()
    rng = random.Random(3)
    draws = 2000
    spots = [
        (lat, lon, zone)
        for zone, points in enumerate(city.points)
        for lat, lon in points
    ]
    counts = [0] * len(city.zones)
    for _ in range(draws):
        (lat, lon), _ = city.draw_trip(rng, 2, 72)  # Wednesday 18:00
        nearest = min(
            spots, key=lambda p: (p[0] - lat) ** 2 + ((p[1] - lon) * 0.76) ** 2
        )
        counts[nearest[2]] += 1
    weights = city.table["originTrips"][2][72]
    busiest = max(range(len(weights)), key=weights.__getitem__)
    expected = draws * weights[busiest] / sum(weights)
    assert abs(counts[busiest] - expected) < 0.3 * expected, (counts[busiest], expected)
    for zone, weight in enumerate(weights):
        if weight == 0:
            assert counts[zone] < 0.01 * draws, city.zones[zone]["name"]
