"""Offline engine: a discrete-event run in virtual time, deciding with a `Matcher`."""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from dispatcher.offers.policy import OfferRules
from dispatcher.simulate.city import SLOT_S, City
from dispatcher.simulate.demand import Order, OrderStream
from dispatcher.simulate.driver import (
    BehaviourOfferHandler,
    DriverAgent,
    OfferHandler,
    Phase,
    first_shift_s,
    make_fleet,
    shift_under_way,
)
from dispatcher.simulate.matching import (
    Book,
    Matcher,
    NearestDispatchable,
    Offer,
)
from dispatcher.simulate.offers import OfflineOfferDesk
from dispatcher.simulate.settings import RunSettings
from dispatcher.simulate.summary import OrderRecord, RunResult, Utilisation
from dispatcher.store.drivers import MirrorEntry

# Called about once a simulated hour: (share of the run done, orders so far, booked so far).
Progress = Callable[[float, int, int], None]

# Grid cells of the idle-driver index, in degrees: ~1 km, so a 5 km search reads ~100 cells.
CELL_DEG = 0.01

# Event kinds, in the order they run when they fall on the same instant.
(
    SLOT,
    SHIFT_START,
    SHIFT_END,
    ARRIVE_PICKUP,
    PICKED_UP,
    ARRIVE_DROP,
    DONE,
    CANCEL,
    READY,
    OFFER_END,
    OFFER_WAKE,
    OFFER_ANSWER,
) = range(12)


class IdleIndex:
    """AVAILABLE drivers by grid cell: what the matcher may look at (FleetView)."""

    def __init__(self, drivers: dict[str, DriverAgent], ping_period_s: float) -> None:
        self.drivers = drivers
        self.period = ping_period_s
        self.cells: dict[tuple[int, int], set[str]] = {}
        self.cell_of: dict[str, tuple[int, int]] = {}

    def add(self, driver: DriverAgent) -> None:
        lat, lon = driver.position
        cell = (math.floor(lat / CELL_DEG), math.floor(lon / CELL_DEG))
        self.cells.setdefault(cell, set()).add(driver.driver_id)
        self.cell_of[driver.driver_id] = cell

    def remove(self, driver_id: str) -> None:
        cell = self.cell_of.pop(driver_id, None)
        if cell is not None:
            members = self.cells[cell]
            members.discard(driver_id)
            if not members:
                del self.cells[cell]

    def entries_in_box(
        self,
        min_lat: float,
        max_lat: float,
        min_lon: float,
        max_lon: float,
        now_s: float,
    ) -> Iterator[MirrorEntry]:
        # The order drivers come out in does not matter: the matcher's tie-break is total.
        i0, i1 = math.floor(min_lat / CELL_DEG), math.floor(max_lat / CELL_DEG)
        j0, j1 = math.floor(min_lon / CELL_DEG), math.floor(max_lon / CELL_DEG)
        if (i1 - i0 + 1) * (j1 - j0 + 1) > len(self.cells):
            keys = [c for c in self.cells if i0 <= c[0] <= i1 and j0 <= c[1] <= j1]
        else:
            keys = [
                (i, j)
                for i in range(i0, i1 + 1)
                for j in range(j0, j1 + 1)
                if (i, j) in self.cells
            ]
        for key in keys:
            for driver_id in self.cells[key]:
                yield self._entry(self.drivers[driver_id], now_s)

    def _entry(self, driver: DriverAgent, now_s: float) -> MirrorEntry:
        # The phone's newest fix: one every ping period since the shift began. An idle
        # driver stands still, so that fix is where it is.
        last_fix = (
            driver.pings_since
            + math.floor((now_s - driver.pings_since) / self.period) * self.period
        )
        lat, lon = driver.position
        return MirrorEntry(driver.driver_id, None, lat, lon, last_fix, True)


# (time, kind, sequence, subject, version): a plain tuple, compared in C. The sequence
# makes the order total and repeatable; `version` voids a driver's stale arrivals.
_Event = tuple[float, int, int, Any, int]


class OfflineEngine:
    """Runs one seeded scenario to its horizon. Same settings and seed, same result."""

    def __init__(
        self,
        city: City,
        settings: RunSettings,
        matcher: Matcher | None = None,
        offer_handler: OfferHandler | None = None,
        offer_rules: OfferRules | None = None,
    ) -> None:
        self.city = city
        self.s = settings
        self.matcher = (
            matcher if matcher is not None else NearestDispatchable(settings.rule)
        )
        self.start_s = settings.start_hour * 3600.0
        self.end_s = self.start_s + settings.hours * 3600.0
        fleet = make_fleet(
            city, settings.drivers, settings.seed, settings.driver, whole_run=False
        )
        self.drivers = {d.driver_id: d for d in fleet}
        self.idle = IdleIndex(self.drivers, settings.driver.ping_period_s)
        self.orders = OrderStream(
            city,
            settings.seed,
            demand_scale=settings.demand_scale,
            driver=settings.driver,
            vendure=settings.vendure,
        )
        self.records: dict[int, OrderRecord] = {}
        self.order_of: dict[int, Order] = {}
        self.util = Utilisation()
        self._heap: list[_Event] = []
        self._seq = 0
        self.now = self.start_s
        self.booked = 0
        self.offer_handler = offer_handler or BehaviourOfferHandler(settings.driver)
        # Drivers who declined or let an offer lapse, per order: not asked again.
        self.passed: dict[int, set[str]] = {}
        # cascade and wave: the zone actor's dispatch loop on the policy's decisions.
        self.desk = (
            OfflineOfferDesk(self, offer_rules)
            if offer_rules is not None and offer_rules.mode != "auto"
            else None
        )

    def push(self, t: float, kind: int, subject: object, version: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, subject, version))

    def run(self, progress: Progress | None = None) -> RunResult:
        began = time.perf_counter()
        for driver in self.drivers.values():
            ends = shift_under_way(driver, self.start_s, self.s.driver.shift_hours)
            if ends is not None:
                self.push(self.start_s, SHIFT_START, (driver, ends))
            else:
                start = first_shift_s(driver, self.start_s)
                self.push(
                    start,
                    SHIFT_START,
                    (driver, start + self.s.driver.shift_hours * 3600.0),
                )
        first_slot = math.floor(self.start_s / SLOT_S) * SLOT_S
        self.push(first_slot, SLOT, first_slot)
        handlers: dict[int, Callable[[_Event], None]] = {
            SLOT: self._slot,
            SHIFT_START: self._shift_start,
            SHIFT_END: self._shift_end,
            READY: self._ready,
            ARRIVE_PICKUP: self._arrive_pickup,
            PICKED_UP: self._picked_up,
            ARRIVE_DROP: self._arrive_drop,
            DONE: self._done,
            CANCEL: self._cancel,
            OFFER_END: self._offer_end,
            OFFER_WAKE: self._offer_wake,
            OFFER_ANSWER: self._offer_answer,
        }
        next_report = self.start_s
        while self._heap and self._heap[0][0] < self.end_s:
            event = heapq.heappop(self._heap)
            self.now = event[0]
            handlers[event[1]](event)
            if progress is not None and self.now >= next_report:
                progress(
                    (self.now - self.start_s) / (self.end_s - self.start_s),
                    len(self.records),
                    self.booked,
                )
                next_report = self.now + 3600.0
        self.now = self.end_s
        self._close_books()
        ordered = [self.records[k] for k in sorted(self.records)]
        return RunResult(
            "offline",
            self.city.name,
            self.desk.rules.mode if self.desk is not None else self.matcher.mode,
            self.s.seed,
            self.s.hours,
            self.s.drivers,
            ordered,
            self.util,
            wall_s=time.perf_counter() - began,
            notes=self.desk.notes() if self.desk is not None else {},
        )

    # ---- demand ----------------------------------------------------------------

    def _slot(self, event: _Event) -> None:
        start = float(event[3])
        for order in self.orders.slot(start):
            if self.start_s <= order.ready_s < self.end_s:
                self.records[order.number] = OrderRecord(order.number, order.ready_s)
                self.order_of[order.number] = order
                self.push(order.ready_s, READY, order)
                if order.cancel_after_s is not None:
                    self.push(order.ready_s + order.cancel_after_s, CANCEL, order)
        self.push(start + SLOT_S, SLOT, start + SLOT_S)

    def _ready(self, event: _Event) -> None:
        order: Order = event[3]
        record = self.records[order.number]
        if record.outcome != "open" or record.assigned_s is not None:
            return  # cancelled meanwhile
        record.attempts += 1
        if self.desk is not None:
            if not self.desk.ready(order):
                self.retry_or_give_up(order)
            return
        self._dispatch(order, record)

    def _dispatch(self, order: Order, record: OrderRecord) -> None:
        passed = frozenset(self.passed.get(order.number, ()))
        decision = self.matcher.decide(order.pickup, self.idle, self.now, passed)
        if isinstance(decision, Book):
            self._book(order, record, decision)
        elif isinstance(decision, Offer):
            self._offer(order, record, decision)
        else:
            self.retry_or_give_up(order)

    def retry_or_give_up(self, order: Order) -> None:
        """Nobody was booked: the shop sends the order again later, up to its limit."""
        retry = self.now + self.s.vendure.retry_s
        if retry - order.ready_s <= self.s.vendure.give_up_s:
            self.push(retry, READY, order)
        else:
            self.records[order.number].outcome = "unassigned"

    # ---- offer modes: OfflineOfferDesk decides with the service's policy --------------

    def _offer_wake(self, event: _Event) -> None:
        assert self.desk is not None
        self.desk.wake(event[3], event[4])

    def _offer_answer(self, event: _Event) -> None:
        assert self.desk is not None
        offer_id, accept = event[3]
        self.desk.answer(offer_id, accept)

    def book_offered(self, order: Order, driver_id: str, distance_km: float) -> None:
        self._book(order, self.records[order.number], Book(driver_id, distance_km))

    def release(self, driver: DriverAgent) -> None:
        self._release(driver)

    def off_shift(self, driver: DriverAgent) -> None:
        self._go_off(driver)

    # ---- offers (a matcher that returns Offer; auto mode never does) -----------------

    def _offer(self, order: Order, record: OrderRecord, offer: Offer) -> None:
        """Hold the offered drivers and ask each one; the round ends at the first accept,
        or once everyone answered or the offer lapsed."""
        record.offers += len(offer.driver_ids)
        # Keyed by order and offer count: answers do not depend on other orders' events.
        rng = random.Random(f"answers:{self.s.seed}:{order.number}:{record.offers}")
        answers: list[tuple[float, str, bool, float]] = []
        for driver_id, km in zip(offer.driver_ids, offer.distances_km, strict=True):
            driver = self.drivers[driver_id]
            self.idle.remove(driver_id)
            driver.phase = Phase.OFFERED
            answer = self.offer_handler.answer(driver, km, rng)
            in_time = answer.accept is not None and answer.after_s <= offer.timeout_s
            at = self.now + (answer.after_s if in_time else offer.timeout_s)
            answers.append((at, driver_id, in_time and bool(answer.accept), km))
        accepted = [a for a in answers if a[2]]
        ends = min(accepted)[0] if accepted else max(a[0] for a in answers)
        self.push(ends, OFFER_END, (order, tuple(answers)))

    def _offer_end(self, event: _Event) -> None:
        order, answers = event[3]
        record = self.records[order.number]
        accepted = sorted(a for a in answers if a[2] and a[0] <= self.now)
        winner = accepted[0] if accepted and record.outcome == "open" else None
        for _, driver_id, said_yes, _ in answers:
            if winner is not None and driver_id == winner[1]:
                continue
            if not said_yes:
                self.passed.setdefault(order.number, set()).add(driver_id)
            self._release(self.drivers[driver_id])
        if winner is not None:
            self._book(order, record, Book(winner[1], winner[3]))
        elif record.outcome == "open":
            self._dispatch(order, record)

    def _release(self, driver: DriverAgent) -> None:
        if driver.ending:
            self._go_off(driver)
        else:
            driver.phase = Phase.IDLE
            self.idle.add(driver)

    def _book(self, order: Order, record: OrderRecord, decision: Book) -> None:
        driver = self.drivers[decision.driver_id]
        self.idle.remove(driver.driver_id)
        record.assigned_s = self.now
        self.booked += 1
        record.driver_id = driver.driver_id
        record.distance_km = decision.distance_km
        driver.phase = Phase.TO_PICKUP
        driver.order_number = order.number
        driver.busy_since = self.now
        driver.version += 1
        arrive = driver.move(self.city, self.s.driver, order.pickup, self.now)
        self.push(arrive, ARRIVE_PICKUP, driver, driver.version)

    # ---- the delivery ------------------------------------------------------------

    def _current(self, event: _Event) -> DriverAgent | None:
        driver: DriverAgent = event[3]
        return driver if event[4] == driver.version else None

    def _arrive_pickup(self, event: _Event) -> None:
        if (driver := self._current(event)) is None:
            return
        driver.stop(self.now)
        driver.phase = Phase.AT_PICKUP
        self.push(
            self.now + self.s.driver.pickup_wait_s, PICKED_UP, driver, driver.version
        )

    def _picked_up(self, event: _Event) -> None:
        if (driver := self._current(event)) is None:
            return
        assert driver.order_number is not None
        order = self.order_of[driver.order_number]
        self.records[order.number].picked_up_s = self.now
        driver.phase = Phase.TO_DROP
        arrive = driver.move(self.city, self.s.driver, order.drop, self.now)
        self.push(arrive, ARRIVE_DROP, driver, driver.version)

    def _arrive_drop(self, event: _Event) -> None:
        if (driver := self._current(event)) is None:
            return
        driver.stop(self.now)
        driver.phase = Phase.AT_DROP
        self.push(self.now + self.s.driver.dropoff_s, DONE, driver, driver.version)

    def _done(self, event: _Event) -> None:
        if (driver := self._current(event)) is None:
            return
        assert driver.order_number is not None
        order = self.order_of[driver.order_number]
        record = self.records[order.number]
        record.done_s = self.now
        record.outcome = "failed" if order.fails else "delivered"
        self._free(driver)

    def _cancel(self, event: _Event) -> None:
        order: Order = event[3]
        record = self.records[order.number]
        if record.outcome != "open" or record.picked_up_s is not None:
            return  # only an order not yet picked up can be cancelled
        if self.desk is not None:
            self.desk.cancel(order)
        record.outcome = "cancelled"
        record.done_s = self.now
        if record.driver_id is not None:
            driver = self.drivers[record.driver_id]
            driver.version += 1  # its pending arrival is void
            driver.stop(self.now)
            self._free(driver)

    def _free(self, driver: DriverAgent) -> None:
        """Delivered, failed or cancelled: the service sets the driver AVAILABLE again."""
        self.util.add(self.util.busy_s, driver.busy_since, self.now)
        driver.order_number = None
        self._release(driver)

    # ---- shifts ------------------------------------------------------------------

    def _shift_start(self, event: _Event) -> None:
        driver: DriverAgent
        driver, ends = event[3]
        driver.position = self.city.driver_start(self._driver_rng(driver))
        driver.leg = None
        driver.phase = Phase.IDLE
        driver.ending = False
        driver.on_shift_since = driver.pings_since = self.now
        self.idle.add(driver)
        self.push(ends, SHIFT_END, driver)

    def _shift_end(self, event: _Event) -> None:
        driver: DriverAgent = event[3]
        if driver.phase is Phase.IDLE:
            self._go_off(driver)
        else:
            driver.ending = True

    def _go_off(self, driver: DriverAgent) -> None:
        self.idle.remove(driver.driver_id)
        self.util.add(self.util.shift_s, driver.on_shift_since, self.now)
        driver.phase = Phase.OFF
        driver.ending = False
        start = first_shift_s(driver, self.now + 1.0)
        self.push(
            start, SHIFT_START, (driver, start + self.s.driver.shift_hours * 3600.0)
        )

    def _driver_rng(self, driver: DriverAgent) -> random.Random:
        # Keyed by driver and time, not drawn from a shared stream: where a shift starts
        # does not depend on how many events ran before it.
        return random.Random(f"start:{self.s.seed}:{driver.driver_id}:{self.now!r}")

    def _close_books(self) -> None:
        """At the horizon: count the time of drivers still on shift or busy."""
        for driver in self.drivers.values():
            if driver.phase is Phase.OFF:
                continue
            self.util.add(self.util.shift_s, driver.on_shift_since, self.now)
            if driver.order_number is not None:
                self.util.add(self.util.busy_s, driver.busy_since, self.now)


def run_offline(
    city: City,
    settings: RunSettings,
    matcher: Matcher | None = None,
    progress: Progress | None = None,
    offer_rules: OfferRules | None = None,
) -> RunResult:
    """One offline run; `offer_rules` in cascade or wave mode dispatches with offers."""
    return OfflineEngine(city, settings, matcher, offer_rules=offer_rules).run(progress)
