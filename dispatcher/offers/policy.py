"""The offer decision core: given a dispatch, the clock and the candidates, what happens next.

No I/O and no clock of its own: the zone actor feeds it PostgreSQL's `now()` and the
candidates PostgreSQL locked, a test or a simulator feeds it virtual time. Every
decision the zone actor takes about a dispatch comes from `next_step` and `choose`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["auto", "cascade", "wave"]
DispatchStatus = Literal["PENDING", "OFFERED", "ASSIGNED", "UNASSIGNED", "CANCELLED"]
OfferStatus = Literal["OPEN", "ACCEPTED", "DECLINED", "EXPIRED", "WITHDRAWN"]
GiveUpReason = Literal["NO_DRIVER_ACCEPTED", "NO_DRIVER_AVAILABLE"]

OPEN_DISPATCH: tuple[DispatchStatus, ...] = ("PENDING", "OFFERED")
# An accept still counts this long after expiresAt (a driver's tap in flight), and an
# offer expires only after it: accept and expiry can never both succeed.
OFFER_GRACE_S = 2.0
# A driver who lets this many offers in a row expire is set OFFLINE.
MISSED_OFFERS_OFFLINE = 3
# Between rounds, when nobody could be offered, look again this often (until the deadline).
PENDING_RETRY_S = 5.0

# Defaults per mode where the two differ (timeout, rounds); one home for each.
DEFAULT_TIMEOUT_S: dict[Mode, float] = {"auto": 0.0, "cascade": 20.0, "wave": 25.0}
DEFAULT_MAX_ROUNDS: dict[Mode, int] = {"auto": 0, "cascade": 5, "wave": 3}
DEFAULT_WAVE_SIZE = 5
DEFAULT_DEADLINE_S = 120.0


@dataclass(frozen=True, slots=True)
class OfferRules:
    """How a zone dispatches in an offer mode (settings with the mode's defaults applied)."""

    mode: Mode
    timeout_s: float
    wave_size: int
    max_rounds: int
    deadline_s: float
    grace_s: float = OFFER_GRACE_S

    @classmethod
    def of(
        cls,
        mode: Mode,
        *,
        timeout_s: float | None = None,
        wave_size: int = DEFAULT_WAVE_SIZE,
        max_rounds: int | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> OfferRules:
        return cls(
            mode,
            DEFAULT_TIMEOUT_S[mode] if timeout_s is None else timeout_s,
            wave_size,
            DEFAULT_MAX_ROUNDS[mode] if max_rounds is None else max_rounds,
            deadline_s,
        )

    @property
    def offers_per_round(self) -> int:
        return 1 if self.mode == "cascade" else self.wave_size


@dataclass(frozen=True, slots=True)
class OfferView:
    offer_id: str
    driver_id: str
    status: OfferStatus
    expires_at: float
    accept_by: float


@dataclass(frozen=True, slots=True)
class DispatchView:
    """A dispatch as stored; `offers` are those of its current attempt. Times are
    seconds on the deciding clock (PostgreSQL's, in the zone actor)."""

    seller_order_id: str
    status: DispatchStatus
    round: int
    deadline_at: float
    offers: tuple[OfferView, ...] = ()

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_DISPATCH

    def open_offers(self) -> list[OfferView]:
        return [o for o in self.offers if o.status == "OPEN"]


@dataclass(frozen=True, slots=True)
class Candidate:
    driver_id: str
    distance_km: float
    auto_accept: bool = False


# ---- steps: what a dispatch needs now ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done:
    """Nothing to do, ever: the dispatch ended."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do until `until` (an answer may come sooner and wake it)."""

    until: float


@dataclass(frozen=True, slots=True)
class Expire:
    """These open offers are past accept_by: expire them."""

    offer_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GiveUp:
    reason: GiveUpReason


@dataclass(frozen=True, slots=True)
class MakeRound:
    """Offer round `round` to up to `count` drivers not yet offered this attempt."""

    round: int
    count: int
    expires_at: float
    exclude: tuple[str, ...]


Step = Done | Wait | Expire | GiveUp | MakeRound


def next_step(rules: OfferRules, dispatch: DispatchView, now: float) -> Step:
    """The one thing the dispatch needs at `now`; run again after carrying it out."""
    if not dispatch.is_open:
        return Done()
    open_offers = dispatch.open_offers()
    overdue = tuple(o.offer_id for o in open_offers if now > o.accept_by)
    if overdue:
        return Expire(overdue)
    if open_offers:
        # Answers wake the dispatch earlier; otherwise the first expiry does.
        return Wait(min(o.accept_by for o in open_offers))
    if now >= dispatch.deadline_at or dispatch.round >= rules.max_rounds:
        return GiveUp(
            "NO_DRIVER_ACCEPTED" if dispatch.offers else "NO_DRIVER_AVAILABLE"
        )
    # An offer never outlives the dispatch: at the deadline every offer has expired.
    expires_at = min(now + rules.timeout_s, dispatch.deadline_at)
    offered = tuple(sorted({o.driver_id for o in dispatch.offers}))
    return MakeRound(dispatch.round + 1, rules.offers_per_round, expires_at, offered)


# ---- choices: what to do with the candidates a round found ----------------------------


@dataclass(frozen=True, slots=True)
class Book:
    """Book this driver at once (autoAccept)."""

    driver_id: str


@dataclass(frozen=True, slots=True)
class OfferTo:
    driver_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Nobody:
    """No candidate: the dispatch waits (PENDING) and looks again at `retry_at`."""

    retry_at: float


Choice = Book | OfferTo | Nobody


def choose(
    step: MakeRound, candidates: Sequence[Candidate], now: float, deadline_at: float
) -> Choice:
    """The nearest `step.count` candidates not excluded get the offer, unless one of
    them accepts automatically: then the nearest such one is booked instead."""
    excluded = set(step.exclude)
    ranked = sorted(
        (c for c in candidates if c.driver_id not in excluded),
        key=lambda c: (c.distance_km, c.driver_id),
    )
    chosen = ranked[: step.count]
    for candidate in chosen:
        if candidate.auto_accept:
            return Book(candidate.driver_id)
    if not chosen:
        return Nobody(min(now + PENDING_RETRY_S, deadline_at))
    return OfferTo(tuple(c.driver_id for c in chosen))


def accept_counts(offer: OfferView, now: float) -> bool:
    """Whether an accept at `now` still counts (PostgreSQL applies the same rule)."""
    return now <= offer.accept_by
