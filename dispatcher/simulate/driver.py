"""Driver agents: shifts, straight-line moves at city speed, and how they answer an offer."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Protocol

from dispatcher.geo import haversine_km
from dispatcher.simulate.city import DAY_S, SLOT_S, SLOTS_PER_DAY, City, Point
from dispatcher.simulate.settings import DriverBehaviour


class Phase(enum.Enum):
    OFF = "off"  # not on shift: OFFLINE in the service
    IDLE = "idle"  # on shift, AVAILABLE, waiting where the last delivery ended
    OFFERED = "offered"  # holds an open offer: booked for no other order meanwhile
    TO_PICKUP = "to_pickup"  # booked: ASSIGNED
    AT_PICKUP = "at_pickup"  # waiting at the shop: still ASSIGNED
    TO_DROP = "to_drop"  # PICKED_UP
    AT_DROP = "at_drop"  # handing over: still PICKED_UP


@dataclass(slots=True)
class Leg:
    """A straight move from `start` at `t0` to `end` at `t1`."""

    start: Point
    end: Point
    t0: float
    t1: float

    def at(self, t: float) -> Point:
        if t >= self.t1 or self.t1 <= self.t0:
            return self.end
        if t <= self.t0:
            return self.start
        f = (t - self.t0) / (self.t1 - self.t0)
        return self.start[0] + f * (self.end[0] - self.start[0]), self.start[1] + f * (
            self.end[1] - self.start[1]
        )


@dataclass(slots=True)
class DriverAgent:
    """One simulated driver: its shift, where it is, what it is doing, and its time."""

    driver_id: str
    shift_start_s: float  # time of day the daily shift starts
    never_answers: bool
    phase: Phase = Phase.OFF
    leg: Leg | None = None
    position: Point = (0.0, 0.0)
    on_shift_since: float = 0.0
    pings_since: float = (
        0.0  # the phone's first fix of this shift (fixes every ping period)
    )
    busy_since: float = 0.0
    ending: bool = False  # shift over, finishing the current delivery first
    order_number: int | None = None
    # Which pending event is current: a cancel bumps it so the old leg's arrival is ignored.
    version: int = 0
    busy_s: float = 0.0
    shift_s: float = 0.0

    def where(self, t: float) -> Point:
        return self.leg.at(t) if self.leg is not None else self.position

    def move(
        self, city: City, behaviour: DriverBehaviour, target: Point, t: float
    ) -> float:
        """Start a straight move to `target` now; returns the arrival time."""
        here = self.where(t)
        self.position = here
        self.leg = Leg(here, target, t, t + travel_s(city, behaviour, here, target, t))
        return self.leg.t1

    def stop(self, t: float) -> None:
        self.position = self.where(t)
        self.leg = None


def travel_s(
    city: City, behaviour: DriverBehaviour, a: Point, b: Point, t: float
) -> float:
    """Seconds to drive from a to b starting at t: the line, stretched by the detour factor,
    at the city's speed for that time of day."""
    detour = (
        behaviour.detour_factor
        if behaviour.detour_factor is not None
        else city.detour_factor
    )
    speed = city.speed_kmh(t) * behaviour.speed_factor
    return 3600.0 * haversine_km(*a, *b) * detour / speed


def make_fleet(
    city: City, count: int, seed: int, behaviour: DriverBehaviour, *, whole_run: bool
) -> list[DriverAgent]:
    """`count` drivers with seeded traits. With `whole_run`, everyone is on shift from the
    start (live runs of a few minutes); otherwise each driver's daily shift starts at an
    hour drawn in proportion to the orders the shift would cover, so supply follows demand."""
    rng = random.Random(f"fleet:{seed}")
    weights = _shift_weights(city, behaviour.shift_hours)
    fleet = []
    for n in range(count):
        start = 0.0 if whole_run else (_draw(rng, weights) + rng.random()) * 3600.0
        never = rng.random() < behaviour.never_answer_share
        fleet.append(DriverAgent(f"d{n:05d}", start, never))
    return fleet


def _shift_weights(city: City, shift_hours: float) -> list[float]:
    """For each start hour, the orders a shift starting then covers on day 0."""
    hourly = [0.0] * 24
    for slot in range(SLOTS_PER_DAY):
        hourly[int(slot * SLOT_S // 3600)] += city.orders_in_slot(0, slot)
    span = max(1, round(shift_hours))
    return [sum(hourly[(h + k) % 24] for k in range(span)) for h in range(24)]


def _draw(rng: random.Random, weights: list[float]) -> int:
    x = rng.random() * sum(weights)
    for index, w in enumerate(weights):
        x -= w
        if x < 0:
            return index
    return len(weights) - 1


def first_shift_s(driver: DriverAgent, start_s: float) -> float:
    """The first shift start at or after `start_s` (shifts repeat daily)."""
    day = start_s // DAY_S
    t = day * DAY_S + driver.shift_start_s
    return t if t >= start_s else t + DAY_S


def shift_under_way(
    driver: DriverAgent, start_s: float, shift_hours: float
) -> float | None:
    """When the shift that is under way at `start_s` ends (None: no shift is): a run that
    begins mid-morning finds the early shifts already on the road."""
    latest = first_shift_s(driver, start_s - DAY_S + 1e-6)
    while first_shift_s(driver, latest + 1.0) <= start_s:
        latest = first_shift_s(driver, latest + 1.0)
    end = latest + shift_hours * 3600.0
    return end if latest < start_s < end else None


# ---- offers: the plug-in point for offer modes (auto mode asks nobody) -----------------


@dataclass(frozen=True, slots=True)
class OfferAnswer:
    """A driver's answer to an offer: accept or decline after `after_s`, or None: never."""

    accept: bool | None
    after_s: float


class OfferHandler(Protocol):
    """How a driver answers an offer; live runs will call it from the event stream."""

    def answer(
        self, driver: DriverAgent, distance_km: float, rng: random.Random
    ) -> OfferAnswer: ...


class BehaviourOfferHandler:
    """Answers with DriverBehaviour's odds: acceptance halves every `accept_half_km` of
    pickup distance, answers take an exponential time, some drivers never answer."""

    def __init__(self, behaviour: DriverBehaviour) -> None:
        self.behaviour = behaviour

    def acceptance(self, distance_km: float) -> float:
        b = self.behaviour
        return float(b.accept_at_zero_km * 0.5 ** (distance_km / b.accept_half_km))

    def answer(
        self, driver: DriverAgent, distance_km: float, rng: random.Random
    ) -> OfferAnswer:
        if driver.never_answers:
            return OfferAnswer(None, float("inf"))
        after = rng.expovariate(1.0 / self.behaviour.response_mean_s)
        return OfferAnswer(rng.random() < self.acceptance(distance_km), after)
