"""Offline offer modes: the zone actor's dispatch loop in virtual time.

Every decision comes from `dispatcher/offers/policy.py`, the module the zone actor's
OfferDesk and the ingress's backstop call: `next_step` says what a dispatch needs now,
`choose` which candidates a round takes, `accept_counts` whether an answer is in time.
What this module adds is only what PostgreSQL and the timers do around them: it keeps the
dispatches and offers in memory, holds offered drivers out of dispatch, and wakes a
dispatch when its timer would fire (plus the actor's slack) or when an answer comes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.geo import round_km
from dispatcher.offers.policy import (
    MISSED_OFFERS_OFFLINE,
    Book,
    DispatchStatus,
    DispatchView,
    Done,
    Expire,
    GiveUp,
    MakeRound,
    Nobody,
    OfferRules,
    OfferStatus,
    OfferTo,
    OfferView,
    Wait,
    accept_counts,
    choose,
    next_step,
)
from dispatcher.rules import search_steps
from dispatcher.simulate import matching
from dispatcher.simulate.driver import Phase

if TYPE_CHECKING:
    from dispatcher.simulate.demand import Order
    from dispatcher.simulate.engine import OfflineEngine

# The zone actor's timer slack and step limit (dispatcher/actors/offerdesk.py; the layering
# keeps the simulator from importing actors, a unit test keeps the values equal).
TIMER_SLACK_S = 0.05
MAX_STEPS = 8


@dataclass(slots=True)
class _Offer:
    offer_id: str
    driver_id: str
    distance_km: float
    expires_at: float
    accept_by: float
    status: OfferStatus = "OPEN"

    def view(self) -> OfferView:
        return OfferView(
            self.offer_id, self.driver_id, self.status, self.expires_at, self.accept_by
        )


@dataclass(slots=True)
class _Dispatch:
    """One attempt of an order's dispatch (a shop's retry after a give-up starts another)."""

    order: Order
    attempt: int
    deadline_at: float
    status: DispatchStatus = "PENDING"
    round: int = 0
    offers: list[_Offer] = field(default_factory=list)
    # Voids timers set before the last wake-up, as the actor cancels its old timer.
    timer: int = 0

    def view(self) -> DispatchView:
        return DispatchView(
            f"o{self.order.number}",
            self.status,
            self.round,
            self.deadline_at,
            tuple(o.view() for o in self.offers),
        )


class OfflineOfferDesk:
    """The dispatches of one offline run in `cascade` or `wave` mode."""

    def __init__(self, engine: OfflineEngine, rules: OfferRules) -> None:
        self.engine = engine
        self.rules = rules
        self.steps = search_steps(engine.s.rule.search_radius_km)
        self.dispatches: dict[int, _Dispatch] = {}
        self.attempts: dict[int, int] = {}
        self.offer_index: dict[str, tuple[_Dispatch, _Offer]] = {}
        self.missed: dict[str, int] = {}
        self.gave_up = 0
        self.expired = 0
        self.declined = 0

    # ---- what Vendure and the drivers do -------------------------------------------

    def ready(self, order: Order) -> bool:
        """seller-order-ready: start a dispatch. False: nobody could be offered, and
        nothing is kept (NO_DRIVER_AVAILABLE, as in `auto`); the shop retries."""
        attempt = self.attempts.get(order.number, 0) + 1
        now = self.engine.now
        dispatch = _Dispatch(order, attempt, now + self.rules.deadline_s)
        step = next_step(self.rules, dispatch.view(), now)
        assert isinstance(step, MakeRound)
        choice = self._round(dispatch, step)
        if isinstance(choice, Nobody):
            return False
        self.attempts[order.number] = attempt
        if isinstance(choice, Book):
            return True  # an autoAccept driver was booked at once
        self.dispatches[order.number] = dispatch
        self._advance(dispatch)
        return True

    def answer(self, offer_id: str, accept: bool) -> None:
        """A driver's accept or decline reaches the service."""
        found = self.offer_index.get(offer_id)
        if found is None:
            return
        dispatch, offer = found
        if offer.status != "OPEN" or dispatch.status not in ("PENDING", "OFFERED"):
            return  # withdrawn or expired meanwhile: the app is told, nothing changes
        now = self.engine.now
        if accept and accept_counts(offer.view(), now):
            self._accept(dispatch, offer)
            return
        if accept:
            # Too late: the accept expires the offer itself (409 OFFER_EXPIRED).
            self._expire(dispatch, offer)
        else:
            offer.status = "DECLINED"
            self.declined += 1
            self.missed[offer.driver_id] = 0
            self._free(offer.driver_id)
        self._advance(dispatch)

    def wake(self, order_number: int, timer: int) -> None:
        dispatch = self.dispatches.get(order_number)
        if dispatch is not None and dispatch.timer == timer:
            self._advance(dispatch)

    def cancel(self, order: Order) -> None:
        """seller-order-cancelled while the dispatch is open: its offers are withdrawn."""
        dispatch = self.dispatches.get(order.number)
        if dispatch is None or dispatch.status not in ("PENDING", "OFFERED"):
            return
        dispatch.status = "CANCELLED"
        self._withdraw(dispatch)
        del self.dispatches[order.number]

    # ---- the zone actor's loop ---------------------------------------------------

    def _advance(self, dispatch: _Dispatch) -> None:
        """OfferDesk.advance: carry out steps until the policy says wait."""
        dispatch.timer += 1
        for _ in range(MAX_STEPS):
            now = self.engine.now
            step = next_step(self.rules, dispatch.view(), now)
            if isinstance(step, Done):
                return
            if isinstance(step, Wait):
                self._timer(dispatch, step.until)
                return
            if isinstance(step, Expire):
                ids = set(step.offer_ids)
                for offer in dispatch.offers:
                    if offer.offer_id in ids:
                        self._expire(dispatch, offer)
            elif isinstance(step, GiveUp):
                self._give_up(dispatch)
                return
            else:
                choice = self._round(dispatch, step)
                if isinstance(choice, Nobody):
                    dispatch.status = "PENDING"
                    self._timer(dispatch, choice.retry_at)
                    return
        raise AssertionError(f"dispatch o{dispatch.order.number}: no rest")

    def _timer(self, dispatch: _Dispatch, until: float) -> None:
        from dispatcher.simulate.engine import OFFER_WAKE

        at = max(until, self.engine.now) + TIMER_SLACK_S
        self.engine.push(at, OFFER_WAKE, dispatch.order.number, dispatch.timer)

    def _round(self, dispatch: _Dispatch, step: MakeRound) -> Book | OfferTo | Nobody:
        engine = self.engine
        candidates = matching.nearest_candidates(
            engine.s.rule,
            self.steps,
            dispatch.order.pickup,
            engine.idle,
            engine.now,
            step.exclude,
            step.count,
        )
        choice = choose(step, candidates, engine.now, dispatch.deadline_at)
        distances = {c.driver_id: c.distance_km for c in candidates}
        if isinstance(choice, Book):
            dispatch.status = "ASSIGNED"
            engine.book_offered(
                dispatch.order, choice.driver_id, round_km(distances[choice.driver_id])
            )
        elif isinstance(choice, OfferTo):
            self._offer(dispatch, step, choice.driver_ids, distances)
        return choice

    def _offer(
        self,
        dispatch: _Dispatch,
        step: MakeRound,
        driver_ids: tuple[str, ...],
        distances: dict[str, float],
    ) -> None:
        engine = self.engine
        dispatch.status = "OFFERED"
        dispatch.round = step.round
        record = engine.records[dispatch.order.number]
        record.offers += len(driver_ids)
        for driver_id in driver_ids:
            offer = _Offer(
                f"o{dispatch.order.number}-a{dispatch.attempt}-r{step.round}-{driver_id}",
                driver_id,
                round_km(distances[driver_id]),
                step.expires_at,
                step.expires_at + self.rules.grace_s,
            )
            dispatch.offers.append(offer)
            self.offer_index[offer.offer_id] = (dispatch, offer)
            driver = engine.drivers[driver_id]
            engine.idle.remove(driver_id)
            driver.phase = Phase.OFFERED
            # Keyed by the offer: an answer does not depend on other orders' events.
            rng = random.Random(f"answers:{engine.s.seed}:{offer.offer_id}")
            answer = engine.offer_handler.answer(driver, offer.distance_km, rng)
            if answer.accept is not None:
                from dispatcher.simulate.engine import OFFER_ANSWER

                engine.push(
                    engine.now + answer.after_s,
                    OFFER_ANSWER,
                    (offer.offer_id, answer.accept),
                )

    def _accept(self, dispatch: _Dispatch, offer: _Offer) -> None:
        offer.status = "ACCEPTED"
        self.missed[offer.driver_id] = 0
        dispatch.status = "ASSIGNED"
        dispatch.timer += 1
        self._withdraw(dispatch)
        del self.dispatches[dispatch.order.number]
        self.engine.book_offered(dispatch.order, offer.driver_id, offer.distance_km)

    def _expire(self, dispatch: _Dispatch, offer: _Offer) -> None:
        offer.status = "EXPIRED"
        self.expired += 1
        missed = self.missed.get(offer.driver_id, 0) + 1
        self.missed[offer.driver_id] = missed
        if missed >= MISSED_OFFERS_OFFLINE:
            # The service sets the driver OFFLINE: off for the rest of the shift.
            self.missed[offer.driver_id] = 0
            self.engine.off_shift(self.engine.drivers[offer.driver_id])
        else:
            self._free(offer.driver_id)

    def _withdraw(self, dispatch: _Dispatch) -> None:
        for offer in dispatch.offers:
            if offer.status == "OPEN":
                offer.status = "WITHDRAWN"
                self._free(offer.driver_id)

    def _give_up(self, dispatch: _Dispatch) -> None:
        """delivery.unassigned: the shop may send the order again (a new attempt)."""
        dispatch.status = "UNASSIGNED"
        dispatch.timer += 1
        self.gave_up += 1
        del self.dispatches[dispatch.order.number]
        self.engine.retry_or_give_up(dispatch.order)

    def _free(self, driver_id: str) -> None:
        driver = self.engine.drivers[driver_id]
        if driver.phase is Phase.OFFERED:
            self.engine.release(driver)

    def notes(self) -> dict[str, int]:
        return {
            "offers declined": self.declined,
            "offers expired": self.expired,
            "dispatches given up": self.gave_up,
        }
