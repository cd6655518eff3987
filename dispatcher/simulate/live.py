"""Live runs: simulated drivers and a Vendure stand-in against a running service's public API."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from dispatcher.simulate.city import City
from dispatcher.simulate.demand import Order, OrderStream
from dispatcher.simulate.driver import (
    BehaviourOfferHandler,
    DriverAgent,
    OfferHandler,
    Phase,
    make_fleet,
)
from dispatcher.simulate.offerplay import OfferPlayer
from dispatcher.simulate.settings import RunSettings
from dispatcher.simulate.summary import OrderRecord, RunResult, Utilisation
from dispatcher.simulate.vendure import VendureStandIn

# At most this many requests of one kind in flight: a laptop's service, not a load test.
PARALLEL_REQUESTS = 16
# Sleeps are re-checked this often (wall seconds), so a change of clock speed takes hold.
CLOCK_POLL_S = 0.25
# Once no new orders come, deliveries still under way finish on a clock this much faster
# (pings stop then, so no fix can look too fast)...
DRAIN_SPEED = 60.0
# ...for at most this long (wall seconds); what is left is cancelled by the shop, and counted.
DRAIN_LIMIT_S = 120.0
HTTP_TIMEOUT_S = 30.0
# A 503 (a zone restarting, PostgreSQL away) is retried like a phone would retry it.
RETRY_ATTEMPTS = 5
RETRY_WAIT_S = 1.0
# The outbox sends within about a second of a change; wait at most this for it to empty.
WEBHOOK_SETTLE_S = 15.0


@dataclass(frozen=True, slots=True)
class LiveTarget:
    """Where the service is and the secrets a shop and an operator hold."""

    url: str
    admin_token: str
    inbound_secret: str
    # Known only when the simulator started the service: then webhooks are verified.
    webhook_secret: str | None = None


class LiveClock:
    """Simulated time running `speed` times faster than the wall clock."""

    def __init__(self, start_s: float, speed: float) -> None:
        self.base_sim = start_s
        self.base_wall = time.monotonic()
        self.speed = speed

    def now(self) -> float:
        return self.base_sim + (time.monotonic() - self.base_wall) * self.speed

    def set_speed(self, speed: float) -> None:
        self.base_sim, self.base_wall, self.speed = self.now(), time.monotonic(), speed

    async def sleep_until(self, t: float) -> None:
        # Polled, not one long sleep: the drain speeds the clock up mid-sleep.
        while (left := t - self.now()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(min(left / self.speed, CLOCK_POLL_S))


@dataclass(slots=True)
class _Account:
    """A registered driver: the service's id and token for one simulated driver."""

    agent: DriverAgent
    service_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class _Counts(dict[str, int]):
    def add(self, key: str) -> None:
        self[key] = self.get(key, 0) + 1


@dataclass(slots=True)
class _Tally:
    http_errors: _Counts = field(default_factory=_Counts)
    pings: int = 0
    pings_refused: int = 0
    retried: int = 0  # 503 answers to lifecycle calls and cancels, tried again
    cancelled_at_end: int = 0
    # Offer modes: the service's answers to the drivers' accepts and declines.
    offer_answers: _Counts = field(default_factory=_Counts)
    withdrawn_at_end: int = 0


class LiveRunner:
    """Plays one seeded scenario against `target` for `minutes` of wall time.

    The same seed gives the same drivers (start points) and the same orders as in any
    other live run; which driver gets which order is the service's decision. In auto
    mode drivers are booked at once; with `offer_mode` cascade or wave (the service's
    DISPATCHER_OFFER_MODE) every driver listens on its event stream and answers offers
    with `offer_handler` (offerplay.OfferPlayer).
    """

    def __init__(
        self,
        city: City,
        settings: RunSettings,
        target: LiveTarget,
        *,
        minutes: float,
        speed: float = 1.0,
        receiver_port: int | None = None,
        receiver_host: str = "127.0.0.1",
        progress: Callable[[float, int, int], None] | None = None,
        offer_mode: str = "auto",
        offer_handler: OfferHandler | None = None,
    ) -> None:
        self.city = city
        self.offer_mode = offer_mode
        self.offer_handler = offer_handler or BehaviourOfferHandler(settings.driver)
        self.player: OfferPlayer | None = None
        # Offer modes: orders sent to the service, whose dispatch may be open (offers
        # out, or between rounds), so a cancel must reach the service even unbooked.
        self.awaiting: set[int] = set()
        self.withdrawn: set[int] = set()
        self.number_of: dict[str, int] = {}
        self.s = settings
        self.target = target
        self.minutes = minutes
        self.speed = speed
        self.receiver_host = receiver_host
        self.receiver_port = receiver_port
        self.progress = progress
        self.start_s = settings.start_hour * 3600.0
        self.window_s = minutes * 60.0 * speed
        # Order ids must be new to the service on every run, whatever --seed says: a repeated
        # id would be answered from its first run (sellerOrderId is idempotent).
        self.run_tag = uuid.uuid4().hex[:8]
        self.records: dict[int, OrderRecord] = {}
        self.orders: dict[int, Order] = {}
        self.accounts: dict[str, _Account] = {}
        self.by_service_id: dict[str, _Account] = {}
        self.locks: dict[int, asyncio.Lock] = {}
        # Orders whose last seller-order-ready got no definite answer: when it was sent.
        self.uncertain: dict[int, float] = {}
        self.util = Utilisation()
        self.tally = _Tally()
        self.order_tasks: set[asyncio.Task[None]] = set()
        self.clock = LiveClock(self.start_s, speed)
        self._limit = asyncio.Semaphore(PARALLEL_REQUESTS)
        self._stop_retrying = False
        self.end_s = self.start_s

    def seller_order_id(self, order: Order) -> str:
        return f"sim-{self.run_tag}-{order.name}"

    async def run(self) -> RunResult:
        began = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        # No connection cap: every driver's event stream holds one connection for the
        # whole run, and aiohttp's default of 100 would leave the rest (and every request)
        # waiting for a free one. PARALLEL_REQUESTS bounds the requests instead.
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            base_url=self.target.url, timeout=timeout, connector=connector
        ) as session:
            self.session = session
            self.vendure = VendureStandIn(
                session, self.target.inbound_secret, self.target.webhook_secret
            )
            if self.receiver_port is not None:
                await self.vendure.start_receiver(
                    self.receiver_host, self.receiver_port
                )
            try:
                await self._play()
            finally:
                await self.vendure.stop_receiver()
        return self._result(began)

    async def _play(self) -> None:
        if self.offer_mode != "auto":
            self.player = OfferPlayer(
                self.session,
                self.offer_handler,
                self.s.seed,
                sleep_until=lambda t: self.clock.sleep_until(t),
                now=lambda: self.clock.now(),
                answer=self._answer_offer,
                offered=self._offered,
            )
        try:
            await self._play_fleet()
        finally:
            if self.player is not None:
                await self.player.stop()

    async def _play_fleet(self) -> None:
        await self._register_fleet()
        self.clock = LiveClock(self.start_s, self.speed)
        pinger = asyncio.create_task(self._ping_loop())
        try:
            await self._play_orders()
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
        await self._drain()
        await self._sign_off()
        self.end_s = self.clock.now()
        if self.receiver_port is not None:
            await self._await_webhooks()

    async def _await_webhooks(self) -> None:
        """Give the outbox a moment to deliver, so the summary counts what was sent."""
        deadline = time.monotonic() + WEBHOOK_SETTLE_S
        while time.monotonic() < deadline:
            async with self.session.get("/ready") as resp:
                body = await resp.json(content_type=None)
            if not body.get("outboxPending"):
                return
            await asyncio.sleep(CLOCK_POLL_S)

    def _result(self, began: float) -> RunResult:
        end_s = self.end_s
        # Live drivers are on shift for the whole run.
        for _ in self.accounts:
            self.util.add(self.util.shift_s, self.start_s, end_s)
        records = [self.records[k] for k in sorted(self.records)]
        notes: dict[str, Any] = {
            "service": self.target.url,
            "webhooks received": ", ".join(
                f"{k} {v}" for k, v in sorted(self.vendure.received.items())
            )
            or "none",
            "pings sent / refused": f"{self.tally.pings} / {self.tally.pings_refused}",
        }
        if self.vendure.rejected:
            notes["webhooks with bad signatures"] = self.vendure.rejected
        if self.tally.http_errors:
            notes["unexpected answers"] = ", ".join(
                f"{k} x{v}" for k, v in sorted(self.tally.http_errors.items())
            )
        if self.tally.retried:
            notes["503 answers, tried again"] = self.tally.retried
        if self.tally.cancelled_at_end:
            notes["cancelled at the end of the run"] = self.tally.cancelled_at_end
        if self.player is not None:
            notes["driver events received"] = (
                ", ".join(f"{k} {v}" for k, v in sorted(self.player.received.items()))
                or "none"
            )
            notes["offer answers"] = (
                ", ".join(
                    f"{k} {v}" for k, v in sorted(self.tally.offer_answers.items())
                )
                + f", never answered {self.player.unanswered}"
            )
            if self.tally.withdrawn_at_end:
                notes["dispatches withdrawn at the end"] = self.tally.withdrawn_at_end
            if self.player.stream_errors:
                notes["event streams reopened"] = self.player.stream_errors
        notes["order ids"] = f"sim-{self.run_tag}-o…"
        notes["deliveries under way finished by"] = (
            f"{(end_s - self.start_s) / 3600.0:.2f} h simulated (x{DRAIN_SPEED:g} after the orders stop)"
        )
        return RunResult(
            "live",
            self.city.name,
            self.offer_mode,
            self.s.seed,
            self.window_s / 3600.0,
            self.s.drivers,
            records,
            self.util,
            wall_s=time.perf_counter() - began,
            notes=notes,
        )

    # ---- drivers -------------------------------------------------------------------

    async def _register_fleet(self) -> None:
        fleet = make_fleet(
            self.city, self.s.drivers, self.s.seed, self.s.driver, whole_run=True
        )
        admin = {"Authorization": f"Bearer {self.target.admin_token}"}

        async def register(agent: DriverAgent) -> None:
            agent.position = self.city.driver_start(
                random.Random(f"start:{self.s.seed}:{agent.driver_id}")
            )
            agent.phase = Phase.IDLE
            body = {
                "name": f"sim {self.run_tag} {agent.driver_id}",
                "vehicleType": "simulated",
            }
            created = await self._call("POST", "/drivers", body, admin, 201)
            account = _Account(agent, created["driverId"], created["token"])
            await self._call(
                "PATCH",
                f"/drivers/{account.service_id}/status",
                {"status": "AVAILABLE"},
                account.auth,
                200,
            )
            self.accounts[agent.driver_id] = account
            self.by_service_id[account.service_id] = account
            if self.player is not None:
                self.player.listen(account)
            await self._ping(account)

        await asyncio.gather(*(register(agent) for agent in fleet))

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        expect: int,
    ) -> dict[str, Any]:
        """A set-up call that must succeed: 503 is retried (a 503 wrote nothing), anything
        else ends the run with the service's answer."""
        for attempt in range(RETRY_ATTEMPTS):
            async with (
                self._limit,
                self.session.request(method, path, json=body, headers=headers) as resp,
            ):
                if resp.status == expect:
                    answer: dict[str, Any] = await resp.json()
                    return answer
                text = await resp.text()
                if resp.status != 503 or attempt == RETRY_ATTEMPTS - 1:
                    raise RuntimeError(
                        f"{method} {path} answered {resp.status}: {text[:300]}"
                    )
            self.tally.retried += 1
            await asyncio.sleep(RETRY_WAIT_S)
        raise AssertionError("unreachable: the last attempt raises")

    async def _ping(self, account: _Account) -> None:
        lat, lon = account.agent.where(self.clock.now())
        self.tally.pings += 1
        try:
            async with (
                self._limit,
                self.session.patch(
                    f"/drivers/{account.service_id}/location",
                    json={"lat": lat, "lon": lon},
                    headers=account.auth,
                ) as resp,
            ):
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.tally.pings_refused += 1
            self.tally.http_errors.add(f"ping {type(exc).__name__}")
            return
        if status != 204:
            self.tally.pings_refused += 1
            # 503: the service is briefly unable (a zone starting); the next fix follows
            # within a ping period anyway. Anything else is a finding.
            if status != 503:
                self.tally.http_errors.add(f"ping {status}")

    async def _ping_loop(self) -> None:
        period = self.s.driver.ping_period_s
        while True:
            await asyncio.sleep(period / self.clock.speed)
            await asyncio.gather(*(self._ping(a) for a in self.accounts.values()))

    async def _sign_off(self) -> None:
        """Every driver goes OFFLINE: nobody is left dispatchable once the run is over."""

        async def off(account: _Account) -> None:
            async with (
                self._limit,
                self.session.patch(
                    f"/drivers/{account.service_id}/status",
                    json={"status": "OFFLINE"},
                    headers=account.auth,
                ) as resp,
            ):
                if resp.status != 200:
                    self.tally.http_errors.add(f"offline {resp.status}")

        await asyncio.gather(*(off(a) for a in self.accounts.values()))

    # ---- orders -----------------------------------------------------------------------

    async def _play_orders(self) -> None:
        stream = OrderStream(
            self.city,
            self.s.seed,
            demand_scale=self.s.demand_scale,
            driver=self.s.driver,
            vendure=self.s.vendure,
        )
        end = self.start_s + self.window_s
        slot_start = self.start_s - self.start_s % 900.0
        for order in stream.between(slot_start, end):
            if order.ready_s < self.start_s:
                continue
            await self.clock.sleep_until(order.ready_s)
            self.records[order.number] = OrderRecord(order.number, order.ready_s)
            self.orders[order.number] = order
            self.number_of[self.seller_order_id(order)] = order.number
            self.locks[order.number] = asyncio.Lock()
            task = asyncio.create_task(self._order(order))
            self.order_tasks.add(task)
            task.add_done_callback(self.order_tasks.discard)
            if order.cancel_after_s is not None:
                cancel = asyncio.create_task(self._customer_cancels(order))
                self.order_tasks.add(cancel)
                cancel.add_done_callback(self.order_tasks.discard)
            self._report()
        await self.clock.sleep_until(end)
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            assigned = sum(1 for r in self.records.values() if r.assigned_s is not None)
            self.progress(
                min(1.0, (self.clock.now() - self.start_s) / self.window_s),
                len(self.records),
                assigned,
            )

    async def _order(self, order: Order) -> None:
        record = self.records[order.number]
        while record.outcome == "open":
            record.attempts += 1
            # Under the order's lock: a customer's cancel waits for the answer, so it
            # never misses a booking that was in flight.
            async with self.locks[order.number]:
                account = await self._ready(order, record)
            if account is not None:
                await self._deliver(order, record, account)
                return
            if record.assigned_s is not None:
                return  # a driver accepted an offer: the accept delivers it
            retry = self.clock.now() + self.s.vendure.retry_s
            if self._over():
                return  # the run is over: still open
            if retry - order.ready_s > self.s.vendure.give_up_s:
                record.outcome = "unassigned"
                return
            while self.clock.now() < retry:
                if self._over() or record.assigned_s is not None:
                    return
                await asyncio.sleep(CLOCK_POLL_S)

    def _over(self) -> bool:
        """No new orders any more: the shop stops retrying (read after every await)."""
        return self._stop_retrying

    async def _ready(self, order: Order, record: OrderRecord) -> _Account | None:
        """seller-order-ready until the service gives a definite answer; the booked
        driver's account, or None. A 503 or a lost answer may hide a booking, so the
        shop sends the same event again (a replay answers what was decided)."""
        if record.outcome != "open" or record.assigned_s is not None:
            return None
        if self._over() and order.number in self.awaiting:
            return None  # withdrawn at the end of the run: not sent again
        seller_order_id = self.seller_order_id(order)
        if self.player is not None:
            # From the moment it is sent, a dispatch with offers out may exist.
            self.awaiting.add(order.number)
        for _ in range(RETRY_ATTEMPTS):
            # Measured on the clock's pace at sending: the drain must not stretch it.
            sent_s, pace, sent_wall = (
                self.clock.now(),
                self.clock.speed,
                time.monotonic(),
            )
            try:
                status, body = await self.vendure.order_ready(
                    seller_order_id, order.pickup, order.drop
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.tally.http_errors.add(f"seller-order-ready {type(exc).__name__}")
                self.uncertain[order.number] = sent_s
            else:
                if status != 503:
                    break
                self.tally.retried += 1
                self.uncertain[order.number] = sent_s
            await asyncio.sleep(RETRY_WAIT_S)
        else:
            return (
                None  # still unknown: the end of the run settles it (_settle_uncertain)
            )
        self.uncertain.pop(order.number, None)
        if status != 200:
            self.tally.http_errors.add(f"seller-order-ready {status}")
            return None
        if body.get("assigned") is not True:
            if body.get("reason") == "AWAITING_ACCEPTANCE" and self.player is None:
                # Offers are out, but nobody here listens: the service runs in an
                # offer mode the simulator was not told about.
                self.tally.http_errors.add(
                    "AWAITING_ACCEPTANCE without --offer-mode (nobody answers offers)"
                )
            return None
        account = self.by_service_id.get(str(body["driverId"]))
        if account is None:
            # A driver of another run or of a person: the service may book anyone.
            self.tally.http_errors.add("booked a driver this run does not play")
            await self.vendure.order_cancelled(
                seller_order_id, "simulator does not play this driver"
            )
            record.outcome = "cancelled"
            return None
        self._booked(
            order, record, account, body, sent_s + (time.monotonic() - sent_wall) * pace
        )
        return account

    def _booked(
        self,
        order: Order,
        record: OrderRecord,
        account: _Account,
        body: dict[str, Any],
        at_s: float,
    ) -> None:
        record.assigned_s = at_s
        record.driver_id = account.agent.driver_id
        record.distance_km = float(body["distanceKm"])
        agent = account.agent
        agent.phase = Phase.TO_PICKUP
        agent.busy_since = at_s
        agent.order_number = order.number

    def _offered(self, offer: dict[str, Any]) -> None:
        number = self.number_of.get(str(offer["sellerOrderId"]))
        if number is not None:
            self.records[number].offers += 1

    async def _answer_offer(
        self, account: _Account, offer: dict[str, Any], accept: bool
    ) -> None:
        """A driver taps accept or decline; an accepted offer is delivered like a booking."""
        number = self.number_of.get(str(offer["sellerOrderId"]))
        path = f"/drivers/{account.service_id}/offers/{offer['offerId']}"
        if number is None or not accept:
            async with (
                self._limit,
                self.session.post(
                    f"{path}/decline",
                    json={"reason": "not for me"},
                    headers=account.auth,
                ) as resp,
            ):
                answer = await resp.json(content_type=None)
                self._offer_answer("decline", resp.status, answer)
            return
        order, record = self.orders[number], self.records[number]
        async with self.locks[number]:
            if (
                record.outcome != "open"
                or record.assigned_s is not None
                or number in self.withdrawn
            ):
                return  # the shop cancelled it meanwhile: the service withdrew the offer
            sent_s, pace, sent_wall = (
                self.clock.now(),
                self.clock.speed,
                time.monotonic(),
            )
            async with (
                self._limit,
                self.session.post(
                    f"{path}/accept", json={}, headers=account.auth
                ) as resp,
            ):
                answer = await resp.json(content_type=None)
                status = resp.status
            self._offer_answer("accept", status, answer)
            if status != 200:
                return
            self._booked(
                order,
                record,
                account,
                answer,
                sent_s + (time.monotonic() - sent_wall) * pace,
            )
        task = asyncio.create_task(self._deliver(order, record, account))
        self.order_tasks.add(task)
        task.add_done_callback(self.order_tasks.discard)

    def _offer_answer(self, what: str, status: int, body: Any) -> None:
        """Refusals with a named reason (expired, superseded, ...) are the offer modes'
        ordinary outcomes; anything else is unexpected."""
        if status == 200:
            self.tally.offer_answers.add(
                f"{what}ed" if what == "accept" else "declined"
            )
        elif status == 409 and isinstance(body, dict) and body.get("reason"):
            self.tally.offer_answers.add(f"{what} refused {body['reason']}")
        else:
            self.tally.http_errors.add(f"offer {what} {status}")

    async def _deliver(
        self, order: Order, record: OrderRecord, account: _Account
    ) -> None:
        agent = account.agent
        seller_order_id = self.seller_order_id(order)
        try:
            await self.clock.sleep_until(
                agent.move(self.city, self.s.driver, order.pickup, self.clock.now())
            )
            if record.outcome != "open":
                return
            agent.stop(self.clock.now())
            agent.phase = Phase.AT_PICKUP
            await self.clock.sleep_until(self.clock.now() + self.s.driver.pickup_wait_s)
            async with self.locks[order.number]:
                if record.outcome != "open":
                    return
                if not await self._step(account, seller_order_id, "picked-up"):
                    return  # still ASSIGNED in the service: the end of the run cancels it
                record.picked_up_s = self.clock.now()
            agent.phase = Phase.TO_DROP
            await self.clock.sleep_until(
                agent.move(self.city, self.s.driver, order.drop, self.clock.now())
            )
            if record.outcome != "open":
                return
            agent.stop(self.clock.now())
            agent.phase = Phase.AT_DROP
            await self.clock.sleep_until(self.clock.now() + self.s.driver.dropoff_s)
            async with self.locks[order.number]:
                if record.outcome != "open":
                    return
                step, body = (
                    ("failed", {"reason": "nobody at the door"})
                    if order.fails
                    else ("delivered", None)
                )
                if not await self._step(account, seller_order_id, step, body):
                    return  # still PICKED_UP in the service: the end of the run cancels it
                record.outcome = step
                record.done_s = self.clock.now()
        finally:
            self._release(agent, order)

    def _release(self, agent: DriverAgent, order: Order) -> None:
        """Delivered, failed or cancelled: the service sets the driver AVAILABLE again.
        Only once per booking: after a cancel the driver may already carry the next order."""
        if agent.order_number != order.number:
            return
        agent.stop(self.clock.now())
        agent.phase = Phase.IDLE
        agent.order_number = None
        self.util.add(self.util.busy_s, agent.busy_since, self.clock.now())

    async def _step(
        self,
        account: _Account,
        seller_order_id: str,
        step: str,
        body: dict[str, Any] | None = None,
    ) -> bool:
        """One lifecycle call, retried while the service says 503; True once it took."""

        async def call() -> int:
            async with (
                self._limit,
                self.session.post(
                    f"/deliveries/{seller_order_id}/{step}",
                    json=body or {},
                    headers=account.auth,
                ) as resp,
            ):
                return resp.status

        return await self._retrying(step, call) == 200

    async def _retrying(
        self, what: str, call: Callable[[], Awaitable[int]]
    ) -> int | None:
        """`call()`'s status, retried on 503 and network errors as a driver app would;
        None when every attempt failed. Other failures are counted as unexpected."""
        for _ in range(RETRY_ATTEMPTS):
            try:
                status = await call()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.tally.http_errors.add(f"{what} {type(exc).__name__}")
            else:
                if status != 503:
                    if status >= 300:
                        self.tally.http_errors.add(f"{what} {status}")
                    return status
                self.tally.retried += 1
            await asyncio.sleep(RETRY_WAIT_S)
        return None

    async def _customer_cancels(self, order: Order) -> None:
        assert order.cancel_after_s is not None
        await self.clock.sleep_until(order.ready_s + order.cancel_after_s)
        await self._cancel(order, "customer cancelled")

    async def _cancel(self, order: Order, reason: str) -> bool:
        """Cancel an order not yet picked up (or any, at the end); True if it was."""
        record = self.records[order.number]
        async with self.locks[order.number]:
            if record.outcome != "open" or (
                record.picked_up_s is not None and reason == "customer cancelled"
            ):
                return False
            if record.assigned_s is None:
                if order.number in self.awaiting and not await self._withdraw(order):
                    return False
                record.outcome = (
                    "cancelled"  # never booked: the shop just stops retrying
                )
                return True
            seller_order_id = self.seller_order_id(order)

            async def call() -> int:
                status, _ = await self.vendure.order_cancelled(seller_order_id, reason)
                return status

            if await self._retrying("seller-order-cancelled", call) != 200:
                return False
            record.outcome = "cancelled"
            record.done_s = self.clock.now()
            assert record.driver_id is not None
            self._release(self.accounts[record.driver_id].agent, order)
            return True

    async def _withdraw(self, order: Order) -> bool:
        """Cancel an order whose dispatch may still have offers out (or was given up)."""

        for _ in range(RETRY_ATTEMPTS):
            try:
                status, _ = await self.vendure.order_cancelled(
                    self.seller_order_id(order), "customer cancelled"
                )
            except (aiohttp.ClientError, TimeoutError):
                status = None
            if status in (200, 404):
                return True  # withdrawn, or the service never opened a dispatch
            if status not in (None, 503):
                self.tally.http_errors.add(f"seller-order-cancelled {status}")
                return False
            await asyncio.sleep(RETRY_WAIT_S)
        return False

    async def _withdraw_waiting(self) -> None:
        """The run is over: dispatches still waiting for an accept are withdrawn (the
        shop cancels them), so nothing is left open in the service. The orders stay
        'still open at the end' in the summary."""
        for number in sorted(self.awaiting - self.withdrawn):
            record = self.records[number]
            async with self.locks[number]:
                if record.outcome != "open" or record.assigned_s is not None:
                    continue
                if await self._withdraw(self.orders[number]):
                    self.withdrawn.add(number)
                    self.tally.withdrawn_at_end += 1

    async def _drain(self) -> None:
        """No new orders: unassigned ones stop retrying, deliveries under way finish fast;
        whatever is still under way after DRAIN_LIMIT_S is cancelled by the shop."""
        self._stop_retrying = True
        await self._withdraw_waiting()
        self.clock.set_speed(self.clock.speed * DRAIN_SPEED)
        pending = [t for t in self.order_tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_LIMIT_S)
        for task in list(self.order_tasks):
            task.cancel()
        await asyncio.gather(*self.order_tasks, return_exceptions=True)
        # An answer in flight at the drain's start may have opened a dispatch since.
        await self._withdraw_waiting()
        for number in sorted(self.records):
            record = self.records[number]
            booked = record.outcome == "open" and record.assigned_s is not None
            if booked and await self._cancel(self.orders[number], "simulation ended"):
                self.tally.cancelled_at_end += 1
        await self._settle_uncertain()

    async def _settle_uncertain(self) -> None:
        """Orders whose seller-order-ready never got a definite answer may have been
        booked: the shop cancels each one. 200 means it had been (accounted as cancelled
        at the end, booked when it was sent), 404 that it never was."""
        for number, sent_s in sorted(self.uncertain.items()):
            record = self.records[number]
            if record.assigned_s is not None:
                continue
            seller_order_id = self.seller_order_id(self.orders[number])
            status: int | None = None
            body: dict[str, Any] = {}
            for _ in range(RETRY_ATTEMPTS):
                try:
                    status, body = await self.vendure.order_cancelled(
                        seller_order_id, "simulation ended"
                    )
                except (aiohttp.ClientError, TimeoutError):
                    status = None
                if status not in (None, 503):
                    break
                await asyncio.sleep(RETRY_WAIT_S)
            if status == 200:
                account = self.by_service_id.get(str(body.get("driverId")))
                record.assigned_s = sent_s
                record.driver_id = (
                    account.agent.driver_id if account is not None else None
                )
                record.distance_km = (
                    float(body["distanceKm"])
                    if body.get("distanceKm") is not None
                    else None
                )
                record.outcome = "cancelled"
                record.done_s = self.clock.now()
                self.tally.cancelled_at_end += 1
            elif status != 404:
                self.tally.http_errors.add(f"seller-order-cancelled {status}")
