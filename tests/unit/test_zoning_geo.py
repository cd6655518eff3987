"""Zoning and geo maths: border searches never miss a zone, distances agree."""

from __future__ import annotations

import math
import random

import h3
import pytest

from dispatcher.geo import bounding_box, haversine_km, round_km
from dispatcher.zoning import Zoning
from tests.support import destination


def test_haversine_known_distance_and_symmetry() -> None:
    # Berlin Alexanderplatz -> Brandenburg Gate is about 2.4 km.
    d = haversine_km(52.5219, 13.4132, 52.5163, 13.3777)
    assert 2.3 < d < 2.5
    assert haversine_km(52.5163, 13.3777, 52.5219, 13.4132) == pytest.approx(d)
    assert haversine_km(10.0, 20.0, 10.0, 20.0) == 0.0


@pytest.mark.parametrize("km", [0.1, 1.0, 5.0, 25.0])
def test_destination_round_trips_through_haversine(km: float) -> None:
    lat, lon = destination(52.52, 13.405, 73.0, km)
    assert haversine_km(52.52, 13.405, lat, lon) == pytest.approx(km, rel=1e-9)


def test_round_km_is_metre_precision() -> None:
    assert round_km(0.84449) == 0.844
    assert round_km(1.2345678) == 1.235


@pytest.mark.parametrize(
    ("lat", "lon"), [(52.52, 13.405), (-33.86, 151.21), (64.1, -21.9), (0.0, 0.0)]
)
def test_bounding_box_contains_the_circle(lat: float, lon: float) -> None:
    min_lat, max_lat, min_lon, max_lon = bounding_box(lat, lon, 5.0)
    for bearing in range(0, 360, 5):
        plat, plon = destination(lat, lon, bearing, 5.0)
        assert min_lat <= plat <= max_lat
        assert min_lon <= plon <= max_lon


@pytest.mark.parametrize("resolution", [5, 6, 7])
def test_zones_near_covers_every_point_in_the_circle(resolution: int) -> None:
    """Property: a driver within the radius always sits in one of the searched zones."""
    zoning = Zoning(resolution)
    rng = random.Random(resolution)
    for _ in range(60):
        lat, lon = 52.3 + rng.random() * 0.4, 13.1 + rng.random() * 0.6
        near = set(zoning.zones_near(lat, lon, 5.0))
        for _ in range(40):
            plat, plon = destination(
                lat, lon, rng.random() * 360, 5.0 * math.sqrt(rng.random())
            )
            assert zoning.zone_of(plat, plon) in near


def test_zones_near_starts_home_and_orders_by_distance() -> None:
    zoning = Zoning(6)
    near = zoning.zones_near(52.52, 13.405, 5.0)
    assert near[0] == zoning.zone_of(52.52, 13.405)
    distances = [haversine_km(52.52, 13.405, *zoning.centre_of(z)) for z in near[1:]]
    assert distances == sorted(distances)
    assert len(near) == len(set(near))


def test_zone_ids_are_h3_cells_of_the_resolution() -> None:
    zoning = Zoning(5)
    zone = zoning.zone_of(52.52, 13.405)
    assert h3.is_valid_cell(zone)
    assert h3.get_resolution(zone) == 5
    assert h3.get_resolution(Zoning(6).zone_of(52.52, 13.405)) == 6
