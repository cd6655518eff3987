"""Seeded orders: a Poisson process per 15-minute slot, each order with its own fate drawn up front."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from dispatcher.simulate.city import SLOT_S, City, Point, day_and_slot
from dispatcher.simulate.settings import DriverBehaviour, VendureBehaviour


@dataclass(frozen=True, slots=True)
class Order:
    """One seller order. Its fate (fails at the door, cancelled when) is drawn with it, so
    it does not depend on the order in which a run happens to process events."""

    number: int
    ready_s: float
    pickup: Point
    drop: Point
    fails: bool
    cancel_after_s: float | None

    @property
    def name(self) -> str:
        return f"o{self.number:07d}"


class OrderStream:
    """Orders of one seed, slot by slot; the same seed gives the same orders."""

    def __init__(
        self,
        city: City,
        seed: int,
        *,
        demand_scale: float,
        driver: DriverBehaviour,
        vendure: VendureBehaviour,
    ) -> None:
        self.city = city
        # A string seed is hashed the same way on every run and platform.
        self.rng = random.Random(f"orders:{seed}")
        self.scale = demand_scale
        self.driver = driver
        self.vendure = vendure
        self.count = 0

    def slot(self, start_s: float) -> list[Order]:
        """The orders ready in [start_s, start_s + SLOT_S): a homogeneous Poisson process at
        the slot's rate (exact, since the process is memoryless at the slot's edges)."""
        day, slot = day_and_slot(start_s)
        rate_per_s = self.city.orders_in_slot(day, slot) * self.scale / SLOT_S
        orders: list[Order] = []
        if rate_per_s <= 0:
            return orders
        t = start_s
        while True:
            t += self.rng.expovariate(rate_per_s)
            if t >= start_s + SLOT_S:
                return orders
            orders.append(self._order(t, day, slot))

    def between(self, start_s: float, end_s: float) -> Iterator[Order]:
        """Every order ready in [start_s, end_s), slot by slot (start_s on a slot edge)."""
        t = start_s
        while t < end_s:
            for order in self.slot(t):
                if order.ready_s < end_s:
                    yield order
            t += SLOT_S

    def _order(self, t: float, day: int, slot: int) -> Order:
        rng = self.rng
        pickup, drop = self.city.draw_trip(rng, day, slot)
        fails = rng.random() < self.driver.fail_share
        cancel = rng.random() < self.vendure.cancel_share
        cancel_after = rng.uniform(0, self.vendure.cancel_within_s) if cancel else None
        self.count += 1
        return Order(self.count, t, pickup, drop, fails, cancel_after)
