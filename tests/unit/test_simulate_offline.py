"""Offline runs: the same seed gives the same result bit for bit; the matcher is the service's rule."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest

from dispatcher.geo import haversine_km, round_km
from dispatcher.simulate.city import SLOT_S, Point
from dispatcher.simulate.demand import OrderStream
from dispatcher.simulate.driver import BehaviourOfferHandler, DriverAgent, make_fleet
from dispatcher.simulate.engine import run_offline
from dispatcher.simulate.manhattan import ManhattanCity
from dispatcher.simulate.matching import (
    Book,
    Decision,
    FleetView,
    NearestDispatchable,
    NoDriver,
    Offer,
)
from dispatcher.simulate.settings import (
    DispatchRule,
    DriverBehaviour,
    RunSettings,
    VendureBehaviour,
)
from dispatcher.simulate.summary import Utilisation, percentile, summarize
from dispatcher.simulate.synthetic import SyntheticCity, SyntheticSpec
from dispatcher.store.drivers import MirrorEntry
from tests.support import BERLIN, offset

SMALL = SyntheticSpec(size_km=6.0, orders_per_hour=40.0)


def small_run(
    seed: int, *, drivers: int = 150, driver: DriverBehaviour | None = None
) -> RunSettings:
    return RunSettings(
        seed=seed,
        hours=12.0,
        drivers=drivers,
        start_hour=8.0,
        driver=driver or DriverBehaviour(),
    )


# ---- the same seed, the same result -------------------------------------------------


def test_the_same_seed_gives_the_same_result_bit_for_bit() -> None:
    first = run_offline(SyntheticCity(SMALL), small_run(7))
    second = run_offline(SyntheticCity(SMALL), small_run(7))
    assert len(first.records) > 100
    assert first.records == second.records
    assert first.utilisation == second.utilisation
    assert first.fingerprint() == second.fingerprint()
    assert summarize(first) == summarize(second)


def test_a_different_seed_gives_a_different_result() -> None:
    first = run_offline(SyntheticCity(SMALL), small_run(7))
    other = run_offline(SyntheticCity(SMALL), small_run(8))
    assert first.fingerprint() != other.fingerprint()
    assert [r.ready_s for r in first.records] != [r.ready_s for r in other.records]


def test_manhattan_runs_are_repeatable_too() -> None:
    settings = RunSettings(
        seed=3, hours=3.0, drivers=80, start_hour=17.0, demand_scale=0.003
    )
    first = run_offline(ManhattanCity(), settings)
    second = run_offline(ManhattanCity(), settings)
    assert len(first.records) > 50
    assert first.fingerprint() == second.fingerprint()


def test_a_run_serves_its_orders_and_keeps_its_books() -> None:
    result = run_offline(SyntheticCity(SMALL), small_run(5))
    summary = summarize(result)
    assert summary["orders"] == len(result.records)
    assert (
        sum(
            summary[o]
            for o in ("delivered", "failed", "cancelled", "unassigned", "open")
        )
        == summary["orders"]
    )
    assert summary["delivered"] > 0.8 * summary["orders"]
    assert 0 < summary["utilisation"] < 1
    radius = RunSettings().rule.search_radius_km
    for record in result.records:
        if record.assigned_s is not None:
            assert record.distance_km is not None and 0 <= record.distance_km <= radius
            assert record.assigned_s >= record.ready_s
        if record.outcome == "delivered":
            assert record.picked_up_s is not None and record.done_s is not None
            assert (
                record.assigned_s is not None
                and record.assigned_s <= record.picked_up_s <= record.done_s
            )


def test_nobody_on_shift_means_nobody_assigned() -> None:
    result = run_offline(SyntheticCity(SMALL), small_run(5, drivers=0))
    assert result.records and all(r.assigned_s is None for r in result.records)
    assert {r.outcome for r in result.records} <= {"unassigned", "cancelled", "open"}


def test_pings_slower_than_the_heartbeat_ttl_leave_drivers_undispatchable() -> None:
    """The freshness rule is applied: a phone pinging every 5 min is fresh (60 s TTL) a
    fifth of the time, so orders wait for the shop's retries to catch a fresh driver."""
    fresh = summarize(run_offline(SyntheticCity(SMALL), small_run(5)))
    slow = summarize(
        run_offline(
            SyntheticCity(SMALL),
            small_run(5, driver=DriverBehaviour(ping_period_s=300.0)),
        )
    )
    assert fresh["attempts_per_order"] < 1.05
    assert slow["attempts_per_order"] > 1.3
    assert slow["assign_s_mean"] > fresh["assign_s_mean"] + 10.0


# ---- the matcher is the service's rule ------------------------------------------------


class Fleet:
    """A FleetView over fixed entries (the matcher must filter them itself)."""

    def __init__(self, entries: list[MirrorEntry]) -> None:
        self.entries = entries

    def entries_in_box(
        self,
        min_lat: float,
        max_lat: float,
        min_lon: float,
        max_lon: float,
        now_s: float,
    ) -> Iterator[MirrorEntry]:
        return iter(self.entries)


def entry(
    driver_id: str,
    north_km: float,
    east_km: float,
    *,
    seen: float = 1000.0,
    available: bool = True,
) -> MirrorEntry:
    lat, lon = offset(*BERLIN, north_km, east_km)
    return MirrorEntry(driver_id, None, lat, lon, seen, available)


NOW = 1000.0
MATCHER = NearestDispatchable(DispatchRule(search_radius_km=5.0, heartbeat_ttl_s=60.0))


def test_the_nearest_dispatchable_driver_is_booked() -> None:
    fleet = Fleet([entry("d3", 0, 2.0), entry("d1", 0, 0.8), entry("d2", 0, 1.5)])
    decision = MATCHER.decide(BERLIN, fleet, NOW, frozenset())
    assert isinstance(decision, Book) and decision.driver_id == "d1"
    assert decision.distance_km == round_km(
        haversine_km(*BERLIN, *offset(*BERLIN, 0, 0.8))
    )


def test_stale_busy_far_and_excluded_drivers_are_skipped() -> None:
    fleet = Fleet(
        [
            entry("stale", 0, 0.1, seen=NOW - 61),
            entry("busy", 0, 0.2, available=False),
            entry("far", 0, 5.2),
            entry("gone", 0, 0.3),
            entry("ok", 0, 4.5),
        ]
    )
    decision = MATCHER.decide(BERLIN, fleet, NOW, frozenset({"gone"}))
    assert isinstance(decision, Book) and decision.driver_id == "ok"
    assert isinstance(
        MATCHER.decide(BERLIN, Fleet(fleet.entries[:3]), NOW, frozenset()), NoDriver
    )


def test_a_tie_goes_to_the_smaller_driver_id() -> None:
    fleet = Fleet([entry("d9", 1.0, 0), entry("d4", 1.0, 0), entry("d7", 1.0, 0)])
    decision = MATCHER.decide(BERLIN, fleet, NOW, frozenset())
    assert isinstance(decision, Book) and decision.driver_id == "d4"


def test_the_widening_search_finds_what_a_full_scan_finds() -> None:
    rng = random.Random(11)
    for _ in range(200):
        entries = [
            entry(
                f"d{n:03d}",
                rng.uniform(-7, 7),
                rng.uniform(-7, 7),
                seen=NOW - rng.uniform(0, 90),
                available=rng.random() < 0.8,
            )
            for n in range(rng.randint(0, 30))
        ]
        candidates = [
            (haversine_km(*BERLIN, e.lat, e.lon), e.driver_id)
            for e in entries
            if e.dispatchable_status
            and e.seen_epoch_s is not None
            and e.seen_epoch_s > NOW - 60
            and e.lat is not None
            and e.lon is not None
        ]
        within = [c for c in candidates if c[0] <= 5.0]
        decision = MATCHER.decide(BERLIN, Fleet(entries), NOW, frozenset())
        if within:
            assert isinstance(decision, Book) and decision.driver_id == min(within)[1]
        else:
            assert isinstance(decision, NoDriver)


# ---- demand and drivers ------------------------------------------------------------------


def test_orders_follow_the_slot_rate() -> None:
    city = SyntheticCity(SyntheticSpec(orders_per_hour=400.0))
    stream = OrderStream(
        city, 1, demand_scale=1.0, driver=DriverBehaviour(), vendure=VendureBehaviour()
    )
    orders = list(stream.between(0.0, 7 * 86400.0))
    expected = sum(city.orders_in_slot(0, s) for s in range(96)) * 7
    assert abs(len(orders) - expected) < 0.02 * expected
    assert all(a.ready_s < b.ready_s for a, b in itertools.pairwise(orders))
    again = OrderStream(
        city, 1, demand_scale=1.0, driver=DriverBehaviour(), vendure=VendureBehaviour()
    )
    assert list(again.between(0.0, SLOT_S * 8)) == [
        o for o in orders if o.ready_s < SLOT_S * 8
    ]


def test_rush_hours_bring_more_orders_and_slower_traffic() -> None:
    city = SyntheticCity()
    assert city.orders_in_slot(0, 19 * 4) > 4 * city.orders_in_slot(0, 4 * 4)
    assert city.speed_kmh(19 * 3600.0) < city.speed_kmh(4 * 3600.0)


def test_acceptance_falls_with_distance_and_some_never_answer() -> None:
    behaviour = DriverBehaviour(
        accept_at_zero_km=0.9, accept_half_km=2.0, never_answer_share=0.25
    )
    handler = BehaviourOfferHandler(behaviour)
    assert handler.acceptance(0.0) == pytest.approx(0.9)
    assert handler.acceptance(2.0) == pytest.approx(0.45)
    fleet = make_fleet(SyntheticCity(), 2000, 1, behaviour, whole_run=True)
    silent = [d for d in fleet if d.never_answers]
    assert 0.2 < len(silent) / len(fleet) < 0.3
    rng = random.Random(2)
    assert handler.answer(silent[0], 0.5, rng).accept is None
    talker = DriverAgent("d", 0.0, never_answers=False)
    answers = [handler.answer(talker, 1.0, rng) for _ in range(2000)]
    accepted = sum(1 for a in answers if a.accept) / len(answers)
    assert accepted == pytest.approx(handler.acceptance(1.0), abs=0.04)
    assert sum(a.after_s for a in answers) / len(answers) == pytest.approx(
        behaviour.response_mean_s, rel=0.1
    )


def test_shifts_follow_demand() -> None:
    fleet = make_fleet(SyntheticCity(), 3000, 1, DriverBehaviour(), whole_run=False)
    starts = [int(d.shift_start_s // 3600) for d in fleet]
    # An 8-hour shift from 11:00 covers lunch and the evening; one from 01:00 covers the night.
    assert starts.count(11) > 3 * starts.count(1)


def test_utilisation_spreads_intervals_over_hours() -> None:
    util = Utilisation()
    util.add(util.shift_s, 3600.0 * 23.5, 3600.0 * 25.0)  # 23:30 to 01:00 next day
    util.add(util.busy_s, 3600.0 * 23.75, 3600.0 * 24.25)
    assert util.shift_s[23] == 1800.0 and util.shift_s[0] == 3600.0
    assert util.by_hour()[23] == pytest.approx(0.5) and util.by_hour()[
        0
    ] == pytest.approx(0.25)
    assert util.by_hour()[5] is None
    assert percentile([3.0, 1.0, 2.0], 95) == 3.0 and percentile([], 50) is None


# ---- the offer plug-in point ------------------------------------------------------------


class OfferNearest:
    """A stand-in offer core: offers the order to the nearest driver not yet asked."""

    mode = "cascade-test"

    def __init__(self) -> None:
        self.nearest = NearestDispatchable(DispatchRule())

    def decide(
        self, pickup: Point, fleet: FleetView, now_s: float, exclude: frozenset[str]
    ) -> Decision:
        found = self.nearest.decide(pickup, fleet, now_s, exclude)
        if isinstance(found, Book):
            return Offer((found.driver_id,), (found.distance_km,), 20.0)
        return found


def test_an_offer_matcher_plugs_into_the_engine() -> None:
    behaviour = DriverBehaviour(accept_at_zero_km=0.6, never_answer_share=0.2)
    settings = small_run(5, driver=behaviour)
    first = run_offline(SyntheticCity(SMALL), settings, OfferNearest())
    again = run_offline(SyntheticCity(SMALL), settings, OfferNearest())
    assert first.fingerprint() == again.fingerprint()
    assert first.matcher == "cascade-test"
    summary = summarize(first)
    # Declines and silent drivers make several offers per order, and waiting for answers
    # takes time that auto mode does not spend.
    assert summary["offers_per_order"] > 1.3
    assert (
        summary["assign_s_mean"]
        > summarize(run_offline(SyntheticCity(SMALL), settings))["assign_s_mean"] + 5
    )
    assert summary["assigned"] > 0.9 * summary["orders"]
    silent = {
        d.driver_id
        for d in make_fleet(
            SyntheticCity(SMALL),
            settings.drivers,
            settings.seed,
            behaviour,
            whole_run=False,
        )
        if d.never_answers
    }
    assert silent and not any(r.driver_id in silent for r in first.records)
