"""An in-memory world for the offer policy in virtual time: drivers, dispatches, offers.

It applies each decision of `dispatcher.offers.policy` with the semantics the
PostgreSQL store gives it (who may be offered, when an accept counts, what a
decline, a cancel, a force-assign or a redispatch does), and plays the zone's timers
and the ingress backstop on a virtual clock. The state-machine test drives it; an
offline simulator can drive the same world with the same decision code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from dispatcher.offers.policy import (
    Book,
    Candidate,
    DispatchView,
    Done,
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

# The same slack the zone's timers and the ingress backstop use (virtual seconds).
TIMER_SLACK_S = 0.05
BACKSTOP_SLACK_S = 2.0
BACKSTOP_INTERVAL_S = 5.0
MISSED_OFFLINE = 3
# Wake-ups in one clock jump beyond this mean timers that fire without end.
MAX_WAKEUPS = 10_000


@dataclass
class WDriver:
    driver_id: str
    status: str = "AVAILABLE"
    open_offer: str | None = None
    missed: int = 0
    auto_accept: bool = False


@dataclass
class WOffer:
    offer_id: str
    order: str
    attempt: int
    round: int
    driver_id: str
    expires_at: float
    accept_by: float
    status: str = "OPEN"
    answered_at: float | None = None
    reason: str | None = None
    created_at: float = 0.0


@dataclass
class WDispatch:
    order: str
    attempt: int
    deadline_at: float
    status: str = "PENDING"
    round: int = 0
    driver_id: str | None = None


@dataclass
class World:
    rules: OfferRules
    drivers: dict[str, WDriver]
    # distance of each driver to each order's pickup; absent: out of reach
    reach: dict[str, dict[str, float]] = field(default_factory=dict)
    now: float = 0.0
    dispatches: dict[str, WDispatch] = field(default_factory=dict)
    offers: dict[str, WOffer] = field(default_factory=dict)
    timers: dict[str, float] = field(default_factory=dict)
    zone_up: bool = True
    # Set while a test interleaves commits between a zone's read and its write.
    hold_wakeups: bool = False
    # (order, driver, how): how = accept | auto | forced
    bookings: list[tuple[str, str, str]] = field(default_factory=list)
    webhooks: list[tuple[str, str]] = field(default_factory=list)
    # Each give-up as the row stood when it was written: (order, round, open offers,
    # now, deadline), so a test can check that the policy called for it.
    give_ups: list[tuple[str, int, int, float, float]] = field(default_factory=list)
    # driver -> order of its active delivery
    active: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    # ---- the views the policy decides on ------------------------------------------------

    def view(self, order: str) -> DispatchView:
        d = self.dispatches[order]
        offers = tuple(
            OfferView(o.offer_id, o.driver_id, o.status, o.expires_at, o.accept_by)  # type: ignore[arg-type]
            for o in self.offers.values()
            if o.order == order and o.attempt == d.attempt
        )
        return DispatchView(order, d.status, d.round, d.deadline_at, offers)  # type: ignore[arg-type]

    def candidates(self, order: str, step: MakeRound) -> list[Candidate]:
        """CANDIDATES_SQL: AVAILABLE, no open offer, within reach, not excluded, nearest first."""
        found = [
            Candidate(driver_id, km, self.drivers[driver_id].auto_accept)
            for driver_id, km in self.reach[order].items()
            if self.drivers[driver_id].status == "AVAILABLE"
            and self.drivers[driver_id].open_offer is None
            and driver_id not in step.exclude
        ]
        return sorted(found, key=lambda c: (c.distance_km, c.driver_id))[: step.count]

    # ---- store semantics ------------------------------------------------------------------

    def _close(self, offer: WOffer, status: str, reason: str | None = None) -> None:
        assert offer.status == "OPEN"
        offer.status, offer.reason, offer.answered_at = status, reason, self.now
        driver = self.drivers[offer.driver_id]
        if driver.open_offer == offer.offer_id:
            driver.open_offer = None

    def _open_offers(self, order: str) -> list[WOffer]:
        return [
            o for o in self.offers.values() if o.order == order and o.status == "OPEN"
        ]

    def _book(self, order: str, driver_id: str, how: str) -> None:
        d = self.dispatches[order]
        for o in self._open_offers(order):
            self._close(o, "WITHDRAWN", "SUPERSEDED")
        d.status, d.driver_id = "ASSIGNED", driver_id
        driver = self.drivers[driver_id]
        driver.status, driver.missed = "BUSY", 0
        assert driver_id not in self.active, "a second active delivery"
        self.active[driver_id] = order
        self.bookings.append((order, driver_id, how))
        self.webhooks.append((order, "delivery.assigned"))

    def _round(self, order: str, step: MakeRound) -> Book | OfferTo | Nobody:
        d = self.dispatches[order]
        choice = choose(step, self.candidates(order, step), self.now, d.deadline_at)
        if isinstance(choice, Book):
            self._book(order, choice.driver_id, "auto")
        elif isinstance(choice, OfferTo):
            for driver_id in choice.driver_ids:
                offer_id = f"o{next(self._ids)}"
                self.offers[offer_id] = WOffer(
                    offer_id,
                    order,
                    d.attempt,
                    step.round,
                    driver_id,
                    step.expires_at,
                    step.expires_at + self.rules.grace_s,
                    created_at=self.now,
                )
                self.drivers[driver_id].open_offer = offer_id
            d.status, d.round = "OFFERED", step.round
        else:
            d.status = "PENDING"
        return choice

    def _expire(self, offer_ids: tuple[str, ...]) -> None:
        for offer_id in offer_ids:
            offer = self.offers[offer_id]
            if offer.status == "OPEN" and self.now > offer.accept_by:
                self._close(offer, "EXPIRED")
                driver = self.drivers[offer.driver_id]
                driver.missed += 1
                if driver.missed >= MISSED_OFFLINE and driver.status == "AVAILABLE":
                    driver.status = "OFFLINE"

    def _give_up(self, order: str) -> None:
        """OfferStore.give_up: decided again on the (locked) row, as it stands now."""
        step = next_step(self.rules, self.view(order), self.now)
        if not isinstance(step, GiveUp):
            return
        d = self.dispatches[order]
        self.give_ups.append(
            (order, d.round, len(self._open_offers(order)), self.now, d.deadline_at)
        )
        for o in self._open_offers(order):
            self._close(o, "WITHDRAWN", "DISPATCH_ENDED")
        d.status = "UNASSIGNED"
        self.webhooks.append((order, f"delivery.unassigned:{step.reason}"))

    def stale_zone_write(
        self,
        order: str,
        first: Callable[[], object],
        meanwhile: Callable[[], object],
    ) -> None:
        """`first` commits (an answer) and wakes the zone, which reads the dispatch and
        decides; `meanwhile` commits before the zone's write (an answer, a cancel, a
        redispatch); then the zone's write runs as the store runs it: an expiry closes
        only offers still open and late, a round and a give-up are decided again on
        the locked row. Wake-ups of `first` and `meanwhile` run after it."""
        self.hold_wakeups = True
        try:
            first()
            step = next_step(self.rules, self.view(order), self.now)
            meanwhile()
            if isinstance(step, Expire):
                self._expire(step.offer_ids)
            elif isinstance(step, GiveUp):
                self._give_up(order)
            elif isinstance(step, MakeRound):
                again = next_step(self.rules, self.view(order), self.now)
                if isinstance(again, MakeRound):
                    self._round(order, again)
        finally:
            self.hold_wakeups = False
        for other, d in list(self.dispatches.items()):
            if d.status in ("PENDING", "OFFERED"):
                self._wake_after(other)

    # ---- the zone: orders and wake-ups ------------------------------------------------------

    def order(self, order: str, reach: dict[str, float]) -> str:
        """seller-order-ready; returns the answer's kind."""
        existing = self.dispatches.get(order)
        if existing is not None and existing.status in ("PENDING", "OFFERED"):
            return "awaiting"
        if existing is not None and existing.status == "ASSIGNED":
            return "replayed"
        self.reach[order] = reach
        attempt = 1 if existing is None else existing.attempt + 1
        saved = existing
        self.dispatches[order] = WDispatch(
            order, attempt, self.now + self.rules.deadline_s
        )
        step = next_step(self.rules, self.view(order), self.now)
        assert isinstance(step, MakeRound)
        choice = self._round(order, step)
        if isinstance(choice, Nobody):
            # The transaction rolls back: nothing written.
            if saved is None:
                del self.dispatches[order]
            else:
                self.dispatches[order] = saved
            return "unassigned"
        if isinstance(choice, Book):
            return "assigned"
        self._wake_after(order)
        return "awaiting"

    def advance(self, order: str) -> None:
        """OfferDesk.advance: decide, act, until the dispatch waits or ends."""
        self.timers.pop(order, None)
        for _ in range(8):
            step = next_step(self.rules, self.view(order), self.now)
            if isinstance(step, Done):
                return
            if isinstance(step, Wait):
                self.timers[order] = step.until + TIMER_SLACK_S
                return
            if isinstance(step, Expire):
                self._expire(step.offer_ids)
            elif isinstance(step, GiveUp):
                self._give_up(order)
            else:
                choice = self._round(order, step)
                if isinstance(choice, Nobody):
                    self.timers[order] = choice.retry_at + TIMER_SLACK_S
                    return
        raise AssertionError(f"dispatch {order} did not settle in 8 steps")

    def _wake_after(self, order: str) -> None:
        if self.zone_up and not self.hold_wakeups:
            self.advance(order)

    def backstop(self) -> None:
        """The ingress: expiry and giving up only, past deadline + grace + slack."""
        for order, d in self.dispatches.items():
            if d.status not in ("PENDING", "OFFERED"):
                continue
            if self.now <= d.deadline_at + self.rules.grace_s + BACKSTOP_SLACK_S:
                continue
            for _ in range(4):
                step = next_step(self.rules, self.view(order), self.now)
                if isinstance(step, Expire):
                    self._expire(step.offer_ids)
                elif isinstance(step, GiveUp):
                    self._give_up(order)
                    break
                else:
                    break

    def run_until(self, t: float) -> None:
        """Virtual time passes: timers fire in order (if the zone is up), and the
        backstop runs on its period."""
        for _ in range(MAX_WAKEUPS):
            due = [(when, order) for order, when in self.timers.items() if when <= t]
            next_backstop = (self.now // BACKSTOP_INTERVAL_S + 1) * BACKSTOP_INTERVAL_S
            if due and self.zone_up and min(due)[0] <= next_backstop:
                when, order = min(due)
                self.now = max(self.now, when)
                self.advance(order)
            elif next_backstop <= t:
                self.now = next_backstop
                self.backstop()
            else:
                self.now = t
                return
        raise AssertionError(
            f"timers keep firing without time passing (now {self.now})"
        )

    def crash_zone(self) -> None:
        self.zone_up = False
        self.timers.clear()

    def restart_zone(self) -> None:
        self.zone_up = True
        for order, d in list(self.dispatches.items()):
            if d.status in ("PENDING", "OFFERED"):
                self.advance(order)

    # ---- drivers and operators ----------------------------------------------------------------

    def accept(self, driver_id: str, offer_id: str) -> str:
        offer = self.offers[offer_id]
        if offer.driver_id != driver_id:
            return "NOT_FOUND"
        d = self.dispatches[offer.order]
        driver = self.drivers[driver_id]
        if offer.status == "ACCEPTED":
            return "OK"
        late = self.now > offer.accept_by
        refusal = self._refusal(offer, d, late) or (
            "DRIVER_BUSY"
            if driver.status == "BUSY"
            else "OFFER_WITHDRAWN"
            if driver.status != "AVAILABLE"
            else None
        )
        if refusal is None:
            self._close(offer, "ACCEPTED")
            self._book(offer.order, driver_id, "accept")
            return "OK"
        if offer.status == "OPEN" and refusal == "OFFER_EXPIRED":
            self._expire((offer_id,))
        elif offer.status == "OPEN" and refusal == "OFFER_WITHDRAWN":
            self._close(offer, "WITHDRAWN", "DRIVER_UNAVAILABLE")
        self._wake_after(offer.order)
        return refusal

    def decline(self, driver_id: str, offer_id: str) -> str:
        offer = self.offers[offer_id]
        if offer.driver_id != driver_id:
            return "NOT_FOUND"
        if offer.status == "DECLINED":
            return "OK"
        d = self.dispatches[offer.order]
        refusal = self._refusal(offer, d, self.now > offer.accept_by)
        if refusal is None:
            self._close(offer, "DECLINED")
            self.drivers[driver_id].missed = 0
        elif offer.status == "OPEN" and refusal == "OFFER_EXPIRED":
            self._expire((offer_id,))
        self._wake_after(offer.order)
        return refusal or "OK"

    @staticmethod
    def _refusal(offer: WOffer, d: WDispatch, late: bool) -> str | None:
        if offer.status == "EXPIRED" or (offer.status == "OPEN" and late):
            return "OFFER_EXPIRED"
        if offer.status == "WITHDRAWN":
            return {
                "SUPERSEDED": "OFFER_SUPERSEDED",
                "ORDER_CANCELLED": "ORDER_CANCELLED",
            }.get(offer.reason or "", "OFFER_WITHDRAWN")
        if offer.status == "DECLINED":
            return "OFFER_DECLINED"
        if offer.status == "ACCEPTED" or d.status == "ASSIGNED":
            return "OFFER_SUPERSEDED"
        if d.status == "CANCELLED":
            return "ORDER_CANCELLED"
        return None

    def cancel(self, order: str) -> None:
        d = self.dispatches[order]
        if d.status == "ASSIGNED":
            # The delivery is cancelled and its driver freed; the dispatch stays ASSIGNED.
            assert d.driver_id is not None
            if self.active.get(d.driver_id) == order:
                del self.active[d.driver_id]
                self.drivers[d.driver_id].status = "AVAILABLE"
            return
        for o in self._open_offers(order):
            self._close(o, "WITHDRAWN", "ORDER_CANCELLED")
        d.status = "CANCELLED"

    def force_assign(self, order: str, driver_id: str) -> str:
        d = self.dispatches[order]
        driver = self.drivers[driver_id]
        if d.status in ("ASSIGNED", "CANCELLED"):
            return "REFUSED"
        if driver.status != "AVAILABLE":
            return "REFUSED"
        if driver.open_offer is not None:
            other = self.offers[driver.open_offer]
            self._close(other, "WITHDRAWN", "FORCE_ASSIGNED")
            if other.order != order:
                self._wake_after(other.order)
        self._book(order, driver_id, "forced")
        return "OK"

    def redispatch(self, order: str) -> str:
        d = self.dispatches[order]
        if d.status in ("ASSIGNED", "CANCELLED"):
            return "REFUSED"
        for o in self._open_offers(order):
            self._close(o, "WITHDRAWN", "REDISPATCHED")
        d.status, d.attempt, d.round = "PENDING", d.attempt + 1, 0
        d.deadline_at, d.driver_id = self.now + self.rules.deadline_s, None
        self._wake_after(order)
        return "OK"

    def set_status(self, driver_id: str, status: str) -> None:
        driver = self.drivers[driver_id]
        if driver.status != "BUSY":
            driver.status = status
            if status == "AVAILABLE":
                driver.missed = 0

    def finish(self, driver_id: str) -> None:
        driver = self.drivers[driver_id]
        if driver.status == "BUSY":
            driver.status = "AVAILABLE"
            del self.active[driver_id]
