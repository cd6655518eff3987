"""OfferDesk: a zone's dispatches in the cascade and wave modes; decisions and timers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from dispatcher.errors import StaleEpochError
from dispatcher.messages import AssignRequest, AssignResult
from dispatcher.offers.policy import (
    Done,
    Expire,
    GiveUp,
    MakeRound,
    OfferRules,
    Wait,
    next_step,
)
from dispatcher.offers.wire import awaiting_body
from dispatcher.store.offers import (
    Changes,
    Fence,
    Loaded,
    OfferStore,
    PickRule,
    RoundMovedError,
)

log = logging.getLogger(__name__)

# A timer fires this much after the instant it waits for, so PostgreSQL's clock (the
# judge) is past it too, despite the transaction start time and clock reading jitter.
TIMER_SLACK_S = 0.05
# Steps one wake-up may take (expire, then a new round, ...); more means a bug, and
# the next timer tries again.
MAX_STEPS = 8
# A wake-up that failed (PostgreSQL away) is tried again this much later.
RETRY_AFTER_FAILURE_S = 1.0


class OfferDesk:
    """Runs a zone's open dispatches: each wake-up reads the dispatch from PostgreSQL,
    asks the policy what it needs, does that in one fenced transaction, and sets the
    next timer. Timers are only wake-ups: a lost one is rebuilt from PostgreSQL when
    the zone restarts, and the ingress's backstop ends what no zone finishes.

    Every method runs under the zone lock (the caller takes it).
    """

    def __init__(
        self,
        rules: OfferRules,
        store: OfferStore,
        pick: PickRule,
        *,
        fence: Callable[[], Fence],
        follow: Callable[[Changes], Awaitable[None]],
        wake: Callable[[str], None],
    ) -> None:
        self.rules = rules
        self.store = store
        self.pick = pick
        self._fence = fence
        self._follow = follow
        self._wake = wake
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def timers(self) -> int:
        return len(self._timers)

    async def open(self, req: AssignRequest) -> AssignResult | None:
        """Start (or answer) the order's dispatch. None: nobody could be offered, or
        the order is assigned already; the caller answers as `auto` does (the stored
        answer if there is a delivery, else NO_DRIVER_AVAILABLE)."""
        loaded, changes = await self.store.open_dispatch(
            req, fence=self._fence(), rules=self.rules, pick=self.pick
        )
        await self._follow(changes)
        if loaded is None:
            return None
        if changes.booked_body is not None:
            return AssignResult(
                "assigned", changes.booked_body, "postgres", changes.booked_driver
            )
        row = loaded.row
        if (row["pickup_lat"], row["pickup_lon"]) != (req.pickup_lat, req.pickup_lon):
            return AssignResult("conflict", "", "none")
        if loaded.view.status == "ASSIGNED":
            return None
        self._schedule_from(loaded)
        return AssignResult("awaiting", awaiting_body(loaded.view), "postgres")

    async def advance(self, seller_order_id: str) -> None:
        """Bring one dispatch up to date and set its next timer."""
        self._cancel(seller_order_id)
        for _ in range(MAX_STEPS):
            loaded = await self.store.load(seller_order_id)
            if loaded is None:
                return
            step = next_step(self.rules, loaded.view, loaded.now)
            if isinstance(step, Done):
                return
            if isinstance(step, Wait):
                self._schedule(seller_order_id, step.until - loaded.now)
                return
            if isinstance(step, Expire):
                await self._follow(
                    await self.store.expire(
                        seller_order_id, step.offer_ids, fence=self._fence()
                    )
                )
            elif isinstance(step, GiveUp):
                # Decided again on the locked row: an answer or a redispatch since
                # this read wins, and the next pass sees it.
                await self.store.give_up(
                    seller_order_id, rules=self.rules, fence=self._fence()
                )
            elif isinstance(step, MakeRound):
                try:
                    changes = await self.store.make_round(
                        seller_order_id,
                        fence=self._fence(),
                        rules=self.rules,
                        pick=self.pick,
                    )
                except RoundMovedError:
                    continue
                await self._follow(changes)
                if changes.retry_at is not None:
                    self._schedule(seller_order_id, changes.retry_at - loaded.now)
                    return
        log.warning(
            "dispatch %s still busy after %d steps; next timer retries",
            seller_order_id,
            MAX_STEPS,
        )
        self._schedule(seller_order_id, RETRY_AFTER_FAILURE_S)

    async def rebuild(self, zone_id: str) -> int:
        """After a (re)start: every open dispatch of the zone, advanced and timed again."""
        orders = await self.store.open_dispatches(zone_id)
        for order in orders:
            try:
                await self.advance(order)
            except StaleEpochError:
                raise
            except Exception as exc:
                # One dispatch must not keep the zone from starting: try it again soon.
                log.warning("dispatch %s not resumed: %s", order, exc)
                self.retry_later(order)
        return len(orders)

    def retry_later(self, seller_order_id: str) -> None:
        """A wake-up failed (PostgreSQL away): try again in a moment."""
        self._schedule(seller_order_id, RETRY_AFTER_FAILURE_S)

    def stop(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    def _schedule_from(self, loaded: Loaded) -> None:
        step = next_step(self.rules, loaded.view, loaded.now)
        if isinstance(step, Wait):
            self._schedule(loaded.view.seller_order_id, step.until - loaded.now)
        elif not isinstance(step, Done):
            self._schedule(loaded.view.seller_order_id, 0.0)

    def _schedule(self, seller_order_id: str, delay_s: float) -> None:
        self._cancel(seller_order_id)
        loop = asyncio.get_running_loop()
        self._timers[seller_order_id] = loop.call_later(
            max(0.0, delay_s) + TIMER_SLACK_S, self._fire, seller_order_id
        )

    def _fire(self, seller_order_id: str) -> None:
        self._timers.pop(seller_order_id, None)
        self._wake(seller_order_id)

    def _cancel(self, seller_order_id: str) -> None:
        handle = self._timers.pop(seller_order_id, None)
        if handle is not None:
            handle.cancel()
