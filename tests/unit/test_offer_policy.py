"""The offer policy as a state machine: random orders, answers, clock jumps, cancels,
drivers going offline, force-assigns and zone restarts; invariants 9-11 after each step."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dispatcher.offers.policy import (
    Book,
    Candidate,
    DispatchView,
    Expire,
    GiveUp,
    MakeRound,
    Nobody,
    OfferRules,
    OfferTo,
    OfferView,
    Wait,
    choose,
    next_step,
)
from tests.support.offers_world import (
    BACKSTOP_INTERVAL_S,
    BACKSTOP_SLACK_S,
    TIMER_SLACK_S,
    WDriver,
    World,
)

DRIVERS = [f"d{n}" for n in range(6)]
OPEN = ("PENDING", "OFFERED")
ORDERS = [f"o{n}" for n in range(5)]


class OfferMachine(RuleBasedStateMachine):
    world: World

    @initialize(
        mode=st.sampled_from(["cascade", "wave"]),
        timeout=st.sampled_from([1.0, 5.0, 20.0]),
        wave=st.integers(1, 4),
        rounds=st.integers(1, 4),
        deadline=st.sampled_from([3.0, 30.0, 120.0]),
        auto=st.sets(st.sampled_from(DRIVERS), max_size=1),
    )
    def start(
        self,
        mode: str,
        timeout: float,
        wave: int,
        rounds: int,
        deadline: float,
        auto: set[str],
    ) -> None:
        rules = OfferRules.of(
            mode,  # type: ignore[arg-type]
            timeout_s=timeout,
            wave_size=wave,
            max_rounds=rounds,
            deadline_s=deadline,
        )
        drivers = {d: WDriver(d, auto_accept=d in auto) for d in DRIVERS}
        self.world = World(rules, drivers)

    @rule(
        order=st.sampled_from(ORDERS),
        reach=st.dictionaries(st.sampled_from(DRIVERS), st.floats(0, 5), max_size=6),
    )
    def order(self, order: str, reach: dict[str, float]) -> None:
        if self.world.zone_up:
            self.world.order(order, reach)

    @precondition(lambda self: bool(self.world.offers))
    @rule(pick=st.integers(0, 10_000), accept=st.booleans(), owner=st.booleans())
    def answer(self, pick: int, accept: bool, owner: bool) -> None:
        offers = sorted(self.world.offers)
        offer = self.world.offers[offers[pick % len(offers)]]
        driver = offer.driver_id if owner else DRIVERS[pick % len(DRIVERS)]
        before = offer.status
        verdict = (
            self.world.accept(driver, offer.offer_id)
            if accept
            else self.world.decline(driver, offer.offer_id)
        )
        if accept and verdict == "OK" and before == "OPEN":
            assert (
                offer.answered_at is not None and offer.answered_at <= offer.accept_by
            )

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5, 5.0, 19.0, 25.0, 60.0, 130.0]))
    def clock(self, dt: float) -> None:
        self.world.run_until(self.world.now + dt)

    @precondition(lambda self: bool(self.world.dispatches))
    @rule(pick=st.integers(0, 100))
    def cancel(self, pick: int) -> None:
        orders = sorted(self.world.dispatches)
        self.world.cancel(orders[pick % len(orders)])

    @rule(
        driver=st.sampled_from(DRIVERS),
        status=st.sampled_from(["AVAILABLE", "OFFLINE"]),
    )
    def status(self, driver: str, status: str) -> None:
        self.world.set_status(driver, status)

    @rule(driver=st.sampled_from(DRIVERS))
    def finish(self, driver: str) -> None:
        self.world.finish(driver)

    @precondition(lambda self: bool(self.world.dispatches))
    @rule(pick=st.integers(0, 100), driver=st.sampled_from(DRIVERS))
    def force_assign(self, pick: int, driver: str) -> None:
        orders = sorted(self.world.dispatches)
        self.world.force_assign(orders[pick % len(orders)], driver)

    @precondition(lambda self: bool(self.world.dispatches))
    @rule(pick=st.integers(0, 100))
    def redispatch(self, pick: int) -> None:
        orders = sorted(self.world.dispatches)
        self.world.redispatch(orders[pick % len(orders)])

    @precondition(lambda self: self.world.zone_up and bool(self.world.dispatches))
    @rule(
        pick=st.integers(0, 100),
        first=st.sampled_from(["decline", "accept", "nothing"]),
        meanwhile=st.sampled_from(
            ["redispatch", "accept", "decline", "cancel", "force", "retry", "clock"]
        ),
    )
    def stale_zone_write(self, pick: int, first: str, meanwhile: str) -> None:
        """An answer wakes the zone, which decides on its read; something else commits
        before the zone's write (the give-up that ended a redispatched attempt)."""
        w = self.world
        # Mostly a dispatch still open: that is where a zone decides.
        live = sorted(o for o, d in w.dispatches.items() if d.status in OPEN)
        orders = live if live and pick % 4 else sorted(w.dispatches)
        order = orders[pick % len(orders)]
        driver = DRIVERS[pick % len(DRIVERS)]

        def answer(verb: str) -> None:
            offers = [
                o for o in w.offers.values() if o.order == order and o.status == "OPEN"
            ]
            if offers:
                offer = offers[pick % len(offers)]
                if verb == "accept":
                    w.accept(offer.driver_id, offer.offer_id)
                elif verb == "decline":
                    w.decline(offer.driver_id, offer.offer_id)

        def interleaved() -> None:
            if meanwhile == "redispatch":
                w.redispatch(order)
            elif meanwhile == "cancel":
                w.cancel(order)
            elif meanwhile == "force":
                w.force_assign(order, driver)
            elif meanwhile == "retry":
                w.order(order, w.reach.get(order, {}))
            elif meanwhile == "clock":
                # Time passes between the read and the write (a slow transaction).
                w.now += 3.0
            else:
                answer(meanwhile)

        w.stale_zone_write(order, lambda: answer(first), interleaved)

    @precondition(lambda self: self.world.zone_up)
    @rule()
    def crash(self) -> None:
        self.world.crash_zone()

    @precondition(lambda self: not self.world.zone_up)
    @rule()
    def restart(self) -> None:
        self.world.restart_zone()

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def one_open_offer_per_driver_and_never_while_booked(self) -> None:
        open_by_driver: dict[str, int] = {}
        for offer in self.world.offers.values():
            if offer.status == "OPEN":
                open_by_driver[offer.driver_id] = (
                    open_by_driver.get(offer.driver_id, 0) + 1
                )
                assert self.world.drivers[offer.driver_id].open_offer == offer.offer_id
                # Invariant 9: an offered driver is booked for no other order.
                assert offer.driver_id not in self.world.active
        assert all(n == 1 for n in open_by_driver.values())

    @invariant()
    def one_accept_per_order_never_late_expiry_never_early(self) -> None:
        accepted: dict[str, int] = {}
        for offer in self.world.offers.values():
            if offer.status == "ACCEPTED":
                accepted[offer.order] = accepted.get(offer.order, 0) + 1
                assert (
                    offer.answered_at is not None
                    and offer.answered_at <= offer.accept_by
                )
            if offer.status == "EXPIRED":
                assert (
                    offer.answered_at is not None
                    and offer.answered_at > offer.accept_by
                )
        assert all(n == 1 for n in accepted.values())

    @invariant()
    def every_assigned_webhook_follows_one_booking(self) -> None:
        assigned = [o for o, kind in self.world.webhooks if kind == "delivery.assigned"]
        assert len(assigned) == len(self.world.bookings)
        accepts = {
            (o.order, o.driver_id)
            for o in self.world.offers.values()
            if o.status == "ACCEPTED"
        }
        for order, driver, how in self.world.bookings:
            assert how != "accept" or (order, driver) in accepts

    @invariant()
    def dispatches_end_by_deadline_plus_grace(self) -> None:
        """Invariant 11: with the zone up its timers end a dispatch by deadline + grace
        (+ timer slack); with it down the backstop does within its slack and period."""
        w = self.world
        rules = w.rules
        for d in w.dispatches.values():
            if d.status not in ("PENDING", "OFFERED"):
                continue
            bound = d.deadline_at + rules.grace_s + TIMER_SLACK_S
            if not w.zone_up:
                bound = (
                    d.deadline_at
                    + rules.grace_s
                    + BACKSTOP_SLACK_S
                    + BACKSTOP_INTERVAL_S
                )
            assert w.now <= bound, (d, w.now, bound)

    @invariant()
    def every_give_up_was_called_for(self) -> None:
        """Nothing open, and the rounds or the time spent, on the row as it stood when
        the give-up was written (not on an earlier read)."""
        for order, round_, open_offers, now, deadline in self.world.give_ups:
            assert open_offers == 0, order
            assert round_ >= self.world.rules.max_rounds or now >= deadline, order

    @invariant()
    def rounds_and_offers_within_the_rules(self) -> None:
        w = self.world
        for d in w.dispatches.values():
            assert d.round <= w.rules.max_rounds
            per_round: dict[tuple[int, int], int] = {}
            for o in w.offers.values():
                if o.order == d.order:
                    per_round[(o.attempt, o.round)] = (
                        per_round.get((o.attempt, o.round), 0) + 1
                    )
                    assert o.expires_at <= d.deadline_at or o.attempt < d.attempt
                    # No offer is made at or after the deadline.
                    assert o.created_at < d.deadline_at or o.attempt < d.attempt
            assert all(n <= w.rules.offers_per_round for n in per_round.values())


OfferMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestOfferMachine = OfferMachine.TestCase


# ---- the policy's single decisions ------------------------------------------------------------

RULES = OfferRules.of("wave", wave_size=2, max_rounds=2, deadline_s=60)


def offer(
    offer_id: str, driver: str, status: str = "OPEN", expires: float = 25.0
) -> OfferView:
    return OfferView(offer_id, driver, status, expires, expires + RULES.grace_s)  # type: ignore[arg-type]


def test_open_offers_wait_for_the_first_accept_by_then_expire_after_it() -> None:
    view = DispatchView(
        "o", "OFFERED", 1, 60.0, (offer("a", "d1"), offer("b", "d2", expires=30.0))
    )
    assert next_step(RULES, view, 10.0) == Wait(27.0)
    assert next_step(RULES, view, 27.0) == Wait(27.0)  # accept_by itself still counts
    assert next_step(RULES, view, 27.01) == Expire(("a",))


def test_a_round_excludes_drivers_already_offered_and_never_outlives_the_deadline() -> (
    None
):
    view = DispatchView(
        "o",
        "OFFERED",
        1,
        60.0,
        (offer("a", "d1", "DECLINED"), offer("b", "d2", "EXPIRED")),
    )
    step = next_step(RULES, view, 50.0)
    assert step == MakeRound(2, 2, 60.0, ("d1", "d2"))
    assert isinstance(step, MakeRound)
    cands = [
        Candidate("d1", 0.1),
        Candidate("d3", 0.5),
        Candidate("d4", 0.3),
        Candidate("d5", 0.9),
    ]
    assert choose(step, cands, 50.0, 60.0) == OfferTo(("d4", "d3"))


def test_rounds_or_deadline_exhausted_give_up_with_the_right_reason() -> None:
    spent = DispatchView("o", "OFFERED", 2, 60.0, (offer("a", "d1", "EXPIRED"),))
    assert next_step(RULES, spent, 30.0) == GiveUp("NO_DRIVER_ACCEPTED")
    nobody = DispatchView("o", "PENDING", 0, 60.0, ())
    assert next_step(RULES, nobody, 60.0) == GiveUp("NO_DRIVER_AVAILABLE")


def test_auto_accept_books_the_nearest_such_driver_of_the_round_and_nobody_waits() -> (
    None
):
    step = MakeRound(1, 2, 25.0, ())
    cands = [
        Candidate("d1", 0.1),
        Candidate("d2", 0.2, auto_accept=True),
        Candidate("d3", 0.3, auto_accept=True),
    ]
    assert choose(step, cands, 0.0, 60.0) == Book("d2")
    assert choose(step, [], 58.0, 60.0) == Nobody(60.0)


@pytest.mark.parametrize(
    "mode,timeout,rounds", [("cascade", 20.0, 5), ("wave", 25.0, 3)]
)
def test_mode_defaults(mode: str, timeout: float, rounds: int) -> None:
    rules = OfferRules.of(mode)  # type: ignore[arg-type]
    assert (rules.timeout_s, rules.max_rounds, rules.deadline_s, rules.grace_s) == (
        timeout,
        rounds,
        120.0,
        2.0,
    )
    assert rules.offers_per_round == (1 if mode == "cascade" else 5)


def test_a_give_up_read_before_a_redispatch_leaves_the_new_attempt_be() -> None:
    """The interleaving the state machine reaches only now and then: the last offer is
    declined, the zone reads "give up", an operator redispatches, the zone writes."""
    world = World(
        OfferRules.of("cascade", timeout_s=20, max_rounds=1, deadline_s=120),
        {"d0": WDriver("d0")},
    )
    assert world.order("o0", {"d0": 1.0}) == "awaiting"
    (offer,) = world.offers.values()
    world.stale_zone_write(
        "o0",
        lambda: world.decline("d0", offer.offer_id),
        lambda: world.redispatch("o0"),
    )
    d = world.dispatches["o0"]
    assert (d.attempt, d.status) == (2, "OFFERED")
    assert world.give_ups == []
    assert [kind for _, kind in world.webhooks] == []
