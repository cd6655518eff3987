"""Offline offer modes: the zone actor's policy in virtual time, seeded and repeatable."""

from __future__ import annotations

from collections import Counter

import pytest

import dispatcher.actors.offerdesk as offerdesk
import dispatcher.offers.policy as policy
import dispatcher.simulate.offers as simoffers
import dispatcher.store.offers as storeoffers
from dispatcher.offers.policy import OfferRules
from dispatcher.simulate.driver import make_fleet
from dispatcher.simulate.engine import OfflineEngine, run_offline
from dispatcher.simulate.settings import DriverBehaviour, RunSettings
from dispatcher.simulate.summary import RunResult, summarize
from dispatcher.simulate.synthetic import SyntheticCity, SyntheticSpec

SMALL = SyntheticSpec(size_km=6.0, orders_per_hour=40.0)


def run(
    seed: int = 7, *, driver: DriverBehaviour | None = None, drivers: int = 150
) -> RunSettings:
    return RunSettings(
        seed=seed,
        hours=6.0,
        drivers=drivers,
        start_hour=10.0,
        driver=driver or DriverBehaviour(),
    )


def test_the_simulator_decides_with_the_zone_actors_own_policy() -> None:
    # Not a copy: the very functions the store and the zone actor's desk call.
    for name in ("next_step", "choose", "accept_counts"):
        assert getattr(simoffers, name) is getattr(policy, name)
    for name in ("next_step", "choose"):
        assert getattr(simoffers, name) is getattr(storeoffers, name)
    # The actor's timer slack and step limit, repeated (the simulator may not import actors).
    assert simoffers.TIMER_SLACK_S == offerdesk.TIMER_SLACK_S
    assert simoffers.MAX_STEPS == offerdesk.MAX_STEPS


@pytest.mark.parametrize("mode", ["cascade", "wave"])
def test_the_same_seed_gives_the_same_offer_run_bit_for_bit(mode: str) -> None:
    rules = OfferRules.of(mode)  # type: ignore[arg-type]
    first = run_offline(SyntheticCity(SMALL), run(7), offer_rules=rules)
    second = run_offline(SyntheticCity(SMALL), run(7), offer_rules=rules)
    assert len(first.records) > 100
    assert first.matcher == mode
    assert first.records == second.records
    assert first.notes == second.notes
    assert first.fingerprint() == second.fingerprint()
    other = run_offline(SyntheticCity(SMALL), run(8), offer_rules=rules)
    assert other.fingerprint() != first.fingerprint()


def _engine(
    mode: str, driver: DriverBehaviour | None = None
) -> tuple[OfflineEngine, RunResult]:
    engine = OfflineEngine(
        SyntheticCity(SMALL),
        run(3, driver=driver),
        offer_rules=OfferRules.of(mode),  # type: ignore[arg-type]
    )
    return engine, engine.run()


@pytest.mark.parametrize("mode", ["cascade", "wave"])
def test_offers_keep_the_services_invariants(mode: str) -> None:
    engine, result = _engine(mode)
    assert engine.desk is not None
    offers = [offer for _, offer in engine.desk.offer_index.values()]
    assert offers
    # At most one accepted offer per order, and every booked order was accepted by its driver.
    accepted = Counter(
        o.offer_id.split("-")[0] for o in offers if o.status == "ACCEPTED"
    )
    assert max(accepted.values()) == 1
    for record in engine.records.values():
        if record.assigned_s is not None:
            assert record.offers >= 1
            assert accepted[f"o{record.number}"] == 1
    # A driver holds at most one open offer (those left open at the horizon).
    still_open = Counter(o.driver_id for o in offers if o.status == "OPEN")
    assert not still_open or max(still_open.values()) == 1
    # An offer is never accepted after its accept_by: the answer is scheduled at its time.
    summary = summarize(result)
    assert summary["assigned"] > 0.8 * summary["orders"]
    assert summary["assign_s_mean"] > 0


def test_cascade_offers_one_driver_at_a_time_and_wave_several() -> None:
    eager = DriverBehaviour(
        accept_at_zero_km=1.0,
        accept_half_km=1e9,
        response_mean_s=1.0,
        never_answer_share=0.0,
    )
    cascade = summarize(
        run_offline(
            SyntheticCity(SMALL),
            run(4, driver=eager),
            offer_rules=OfferRules.of("cascade"),
        )
    )
    wave = summarize(
        run_offline(
            SyntheticCity(SMALL),
            run(4, driver=eager),
            offer_rules=OfferRules.of("wave"),
        )
    )
    # Everyone accepts: cascade needs one offer per booked order; a wave asks up to 5.
    assert cascade["offers_per_order"] == pytest.approx(
        cascade["assigned"] / cascade["orders"], abs=0.01
    )
    assert wave["offers_per_order"] > 2 * cascade["offers_per_order"]
    # The first of a wave's answers wins: a wave assigns sooner.
    assert wave["assign_s_mean"] < cascade["assign_s_mean"]


def test_an_answer_after_the_grace_never_counts() -> None:
    slow = DriverBehaviour(
        accept_at_zero_km=1.0,
        accept_half_km=1e9,
        response_mean_s=1e6,
        never_answer_share=0.0,
    )
    result = run_offline(
        SyntheticCity(SMALL), run(5, driver=slow), offer_rules=OfferRules.of("cascade")
    )
    summary = summarize(result)
    assert summary["orders"] > 100
    # With an exponential mean of 10^6 s, a few answers still fall within 20 s: each one
    # that does is booked, the others expire.
    assert summary["assigned"] < 0.05 * summary["orders"]
    made = sum(r.offers for r in result.records)
    assert result.notes["offers expired"] > 0.9 * made > 100


def test_drivers_who_never_answer_are_set_offline_after_three_misses() -> None:
    silent = DriverBehaviour(never_answer_share=1.0)
    engine, result = _engine("cascade", silent)
    assert not any(r.assigned_s is not None for r in result.records)
    assert result.notes["offers expired"] > 0
    # Nobody is offered a fourth time in one shift: three misses set the driver OFFLINE.
    assert engine.desk is not None
    per_driver = Counter(o.driver_id for _, o in engine.desk.offer_index.values())
    fleet = make_fleet(SyntheticCity(SMALL), 150, 3, silent, whole_run=False)
    assert len(fleet) == 150
    assert max(per_driver.values()) <= 3 * 2  # at most two shifts fall in 6 h


def test_auto_mode_through_the_offer_rules_is_the_plain_engine() -> None:
    plain = run_offline(SyntheticCity(SMALL), run(9))
    auto = run_offline(SyntheticCity(SMALL), run(9), offer_rules=OfferRules.of("auto"))
    assert plain.fingerprint() == auto.fingerprint()


def test_the_command_line_takes_the_offer_mode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dispatcher.simulate.cli import main

    argv = [
        "--offline",
        "--scenario",
        "synthetic",
        "--hours",
        "2",
        "--start-hour",
        "11",
    ]
    assert main([*argv, "--offer-mode", "wave"]) == 0
    out = capsys.readouterr().out
    assert "synthetic (offline, wave mode, seed 1)" in out
    assert "offers declined" in out
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--offer-mode", "bogus"])
    assert exc.value.code == 2


def test_the_service_the_simulator_starts_judges_offers_in_simulated_time() -> None:
    from dispatcher.simulate.cli import _offer_clock

    assert _offer_clock(OfferRules.of("auto"), 5.0) == {}
    assert _offer_clock(OfferRules.of("cascade"), 5.0) == {
        "offer_mode": "cascade",
        "offer_timeout_s": 4.0,
        "dispatch_deadline_s": 24.0,
    }
