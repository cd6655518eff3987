"""Dispatches and offers in PostgreSQL: every write that opens, answers or closes an offer.

Lock order, in every transaction: the dispatch row, then driver rows (in id order),
then offer rows. Zone-made writes are fenced by the zone's epoch; driver and operator
answers (accept, decline, cancel, force-assign, redispatch) and the ingress backstop are
serialized with them by the dispatch row lock. Expiry and accept are judged by
PostgreSQL's `now()` against the offer's stored `accept_by`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from dispatcher.errors import NotFoundError, StaleEpochError
from dispatcher.geo import bounding_box, round_km
from dispatcher.messages import AssignRequest
from dispatcher.offers.policy import (
    MISSED_OFFERS_OFFLINE,
    OFFER_GRACE_S,
    Book,
    Candidate,
    Choice,
    DispatchView,
    GiveUp,
    MakeRound,
    Nobody,
    OfferRules,
    OfferTo,
    OfferView,
    choose,
    next_step,
)
from dispatcher.rules import Assignment, RenderAnswer, new_assignment_id
from dispatcher.store.offer_events import tell_driver
from dispatcher.store.outbox import enqueue
from dispatcher.store.pg import connection, haversine_sql

Conn = Any  # an asyncpg connection inside the caller's transaction

# Why an accept or a decline is refused (docs/OFFERS.md), plus OFFER_DECLINED for an
# offer its driver already declined.
Refusal = Literal[
    "OFFER_EXPIRED",
    "OFFER_SUPERSEDED",
    "OFFER_WITHDRAWN",
    "ORDER_CANCELLED",
    "DRIVER_BUSY",
    "OFFER_DECLINED",
    "ALREADY_ASSIGNED",
    "DRIVER_UNAVAILABLE",
]
# Withdrawal reasons stored on the offer -> the refusal an accept of it gets.
WITHDRAWN_REFUSALS: dict[str, Refusal] = {
    "SUPERSEDED": "OFFER_SUPERSEDED",
    "ORDER_CANCELLED": "ORDER_CANCELLED",
}

# The offer modes' candidates: the nearest dispatchable drivers, locked (others' locks
# skipped). The same rule as the booking's PICK_SQL, and `open_offer_id IS NULL`.
# $1/$2 pickup, $3 heartbeat TTL s, $4..$7 box, $8 excluded ids, $9 radius, $10 how many.
CANDIDATES_SQL = f"""
SELECT d.id, d.auto_accept, {haversine_sql("$1", "$2", "d.lat", "d.lon")} AS distance_km
FROM drivers d
WHERE d.status = 'AVAILABLE' AND d.is_active AND d.lat IS NOT NULL AND d.open_offer_id IS NULL
  AND d.last_seen_at > now() - make_interval(secs => $3)
  AND d.lat BETWEEN $4 AND $5
  AND (d.lon BETWEEN $6 AND $7 OR d.lon BETWEEN $6 + 360 AND $7 + 360 OR d.lon BETWEEN $6 - 360 AND $7 - 360)
  AND NOT (d.id = ANY($8::text[]))
  AND {haversine_sql("$1", "$2", "d.lat", "d.lon")} <= $9
ORDER BY distance_km, d.id
LIMIT $10
FOR UPDATE OF d SKIP LOCKED
"""

OPEN_OFFERS_SQL = """
WITH opened AS (
    INSERT INTO offers (offer_id, seller_order_id, attempt, round, driver_id, status,
                        distance_km, expires_at, accept_by)
    SELECT t.offer_id, $4, $5, $6, t.driver_id, 'OPEN', t.distance_km, $7, $8
    FROM unnest($1::text[], $2::text[], $3::float8[]) AS t(offer_id, driver_id, distance_km)
    RETURNING offer_id, driver_id
)
UPDATE drivers d SET open_offer_id = opened.offer_id, updated_at = now()
FROM opened WHERE d.id = opened.driver_id
"""

# Close open offers (only those still open), free their drivers' offer slot.
# $1 offer ids, $2 new status, $3 reason, $4 true: only those past accept_by (expiry).
CLOSE_SQL = """
WITH closed AS (
    UPDATE offers SET status = $2, reason = $3, answered_at = now()
    WHERE offer_id = ANY($1::text[]) AND status = 'OPEN' AND (NOT $4 OR now() > accept_by)
    RETURNING offer_id, driver_id
), freed AS (
    UPDATE drivers d SET open_offer_id = NULL, updated_at = now()
    FROM closed WHERE d.id = closed.driver_id AND d.open_offer_id = closed.offer_id
)
SELECT offer_id, driver_id FROM closed ORDER BY driver_id
"""

DISPATCH_SQL = "SELECT *, now() AS db_now FROM dispatches WHERE seller_order_id = $1"


@dataclass(frozen=True, slots=True)
class Fence:
    """A zone incarnation's right to write: its zone and epoch."""

    zone_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class PickRule:
    radius_km: float
    heartbeat_ttl_s: float


@dataclass(frozen=True, slots=True)
class Loaded:
    """A dispatch as the policy sees it, with the row and PostgreSQL's clock."""

    view: DispatchView
    row: asyncpg.Record
    now: float


@dataclass(slots=True)
class Changes:
    """What a transaction did that the zones and the mirror must follow."""

    # Drivers whose dispatchability changed (offered, freed, booked, set OFFLINE).
    drivers: set[str] = field(default_factory=set)
    # Orders whose zone should look at them again now, with their zones.
    wake: dict[str, str] = field(default_factory=dict)
    booked_body: str | None = None
    booked_driver: str | None = None
    offered: tuple[str, ...] = ()
    # The order an answer was about, and how long the accepted offer had been out.
    order: str | None = None
    accept_age_s: float | None = None
    # Nobody could be offered: the dispatch waits (PENDING) until then (policy time).
    retry_at: float | None = None


class OfferRefusedError(Exception):
    """An answer (accept, decline, force-assign, ...) refused with a named reason."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        # What the refusing transaction still committed (an expiry): zones follow it.
        self.changes = Changes()


class RoundMovedError(Exception):
    """The dispatch changed since it was read: read it again and decide again."""


def ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def seconds(value: datetime) -> float:
    return value.timestamp()


def new_offer_id() -> str:
    return "ofr_" + uuid.uuid4().hex[:20]


async def _fence(conn: Conn, fence: Fence | None) -> None:
    if fence is None:
        return
    epoch = await conn.fetchval(
        "SELECT epoch FROM zones WHERE zone_id = $1 FOR SHARE", fence.zone_id
    )
    if epoch != fence.epoch:
        raise StaleEpochError(
            f"zone {fence.zone_id}: epoch {fence.epoch} superseded by {epoch}"
        )


async def _lock_drivers(
    conn: Conn, driver_ids: Sequence[str]
) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        """SELECT id, status, is_active, open_offer_id, missed_offers, lat, lon
           FROM drivers WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE""",
        sorted(set(driver_ids)),
    )
    return {r["id"]: r for r in rows}


async def _open_offer_drivers(conn: Conn, seller_order_id: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT driver_id FROM offers WHERE seller_order_id = $1 AND status = 'OPEN'",
        seller_order_id,
    )
    return [r["driver_id"] for r in rows]


async def _close(
    conn: Conn,
    offer_ids: Sequence[str],
    status: str,
    reason: str | None,
    *,
    only_late: bool = False,
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        CLOSE_SQL, list(offer_ids), status, reason, only_late
    )
    return rows


async def _withdraw_open(
    conn: Conn, seller_order_id: str, reason: str, changes: Changes
) -> None:
    """Withdraw every open offer of the order and tell their drivers (rows already locked)."""
    ids = await conn.fetch(
        "SELECT offer_id FROM offers WHERE seller_order_id = $1 AND status = 'OPEN'",
        seller_order_id,
    )
    for row in await _close(conn, [r["offer_id"] for r in ids], "WITHDRAWN", reason):
        changes.drivers.add(row["driver_id"])
        await tell_driver(
            conn,
            row["driver_id"],
            "offer.withdrawn",
            {"offerId": row["offer_id"], "reason": reason},
        )


def _view(row: asyncpg.Record, offers: Sequence[asyncpg.Record]) -> DispatchView:
    return DispatchView(
        seller_order_id=row["seller_order_id"],
        status=row["status"],
        round=row["round"],
        deadline_at=seconds(row["deadline_at"]),
        offers=tuple(
            OfferView(
                o["offer_id"],
                o["driver_id"],
                o["status"],
                seconds(o["expires_at"]),
                seconds(o["accept_by"]),
            )
            for o in offers
            if o["attempt"] == row["attempt"]
        ),
    )


class OfferStore:
    """Every SQL statement about dispatches and offers."""

    def __init__(self, pool: asyncpg.Pool, *, render: RenderAnswer) -> None:
        self.pool = pool
        # Renders the first answer a booking stores (models.assigned_body).
        self.render = render

    # ---- reads ----------------------------------------------------------------------

    async def load(
        self, seller_order_id: str, conn: Conn | None = None, *, lock: bool = False
    ) -> Loaded | None:
        """The dispatch, its current attempt's offers and PostgreSQL's clock."""
        if conn is None:
            async with connection(self.pool) as own:
                return await self.load(seller_order_id, own)
        row = await conn.fetchrow(
            DISPATCH_SQL + (" FOR UPDATE" if lock else ""), seller_order_id
        )
        if row is None:
            return None
        offers = await conn.fetch(
            "SELECT * FROM offers WHERE seller_order_id = $1 ORDER BY created_at, driver_id",
            seller_order_id,
        )
        return Loaded(_view(row, offers), row, seconds(row["db_now"]))

    async def dispatch_with_offers(
        self, seller_order_id: str
    ) -> tuple[asyncpg.Record, list[asyncpg.Record]] | None:
        async with connection(self.pool) as conn:
            row = await conn.fetchrow(
                "SELECT * FROM dispatches WHERE seller_order_id = $1", seller_order_id
            )
            if row is None:
                return None
            offers = await conn.fetch(
                "SELECT * FROM offers WHERE seller_order_id = $1 ORDER BY created_at, driver_id",
                seller_order_id,
            )
        return row, list(offers)

    async def driver_offers(
        self, driver_id: str, status: str | None, limit: int = 100
    ) -> list[asyncpg.Record]:
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                """SELECT o.*, d.pickup_lat, d.pickup_lon, d.drop_lat, d.drop_lon
                   FROM offers o JOIN dispatches d USING (seller_order_id)
                   WHERE o.driver_id = $1 AND ($2::text IS NULL OR o.status = $2)
                   ORDER BY o.created_at DESC LIMIT $3""",
                driver_id,
                status,
                limit,
            )
        return list(rows)

    async def open_dispatches(self, zone_id: str) -> list[str]:
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT seller_order_id FROM dispatches WHERE zone_id = $1 AND status IN ('PENDING', 'OFFERED')",
                zone_id,
            )
        return [r["seller_order_id"] for r in rows]

    async def overdue(self, slack_s: float, grace_s: float) -> list[str]:
        """Open dispatches past deadline + grace + slack: their zone did not finish them."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                """SELECT seller_order_id FROM dispatches
                   WHERE status IN ('PENDING', 'OFFERED')
                     AND deadline_at + make_interval(secs => $1) < now()""",
                slack_s + grace_s,
            )
        return [r["seller_order_id"] for r in rows]

    async def stalled(
        self, slack_s: float, pending_retry_s: float
    ) -> list[tuple[str, str]]:
        """Open dispatches their zone should have looked at by now (an open offer past
        accept_by, or nothing open for longer than a retry): (order, zone) pairs. Their
        zone was restarting or gone when its timer or a wake-up was due."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                """SELECT d.seller_order_id, d.zone_id FROM dispatches d
                   WHERE d.status IN ('PENDING', 'OFFERED') AND CASE
                       WHEN EXISTS (SELECT 1 FROM offers o WHERE o.seller_order_id = d.seller_order_id
                                    AND o.status = 'OPEN')
                       THEN EXISTS (SELECT 1 FROM offers o WHERE o.seller_order_id = d.seller_order_id
                                    AND o.status = 'OPEN' AND o.accept_by + make_interval(secs => $1) < now())
                       ELSE d.updated_at + make_interval(secs => $1 + $2) < now()
                   END
                   ORDER BY d.deadline_at LIMIT 1000""",
                slack_s,
                pending_retry_s,
            )
        return [(r["seller_order_id"], r["zone_id"]) for r in rows]

    async def open_offer_counts(self) -> dict[str, int]:
        """Open offers per zone (the zone of their dispatch)."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                """SELECT d.zone_id, count(*) AS n FROM offers o JOIN dispatches d USING (seller_order_id)
                   WHERE o.status = 'OPEN' GROUP BY d.zone_id"""
            )
        return {r["zone_id"]: r["n"] for r in rows}

    # ---- zone writes (fenced) ---------------------------------------------------------

    async def open_dispatch(
        self, req: AssignRequest, *, fence: Fence, rules: OfferRules, pick: PickRule
    ) -> tuple[Loaded | None, Changes]:
        """Start a dispatch (or a new attempt of one that ended without a delivery) and
        make its first round, in ONE transaction. A first round that finds nobody
        writes nothing and returns None, as `auto` does.

        An order whose dispatch is open (or assigned) is returned untouched.
        """
        changes = Changes()
        try:
            async with connection(self.pool) as conn, conn.transaction():
                await _fence(conn, fence)
                existing = await conn.fetchrow(
                    "SELECT status FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                    req.seller_order_id,
                )
                if await _delivery_exists(conn, req.seller_order_id):
                    # Booked already (before offers were on, or by another path):
                    # the caller replays the stored answer.
                    return None, changes
                if existing is not None and existing["status"] in (
                    "PENDING",
                    "OFFERED",
                    "ASSIGNED",
                ):
                    return await self.load(req.seller_order_id, conn), changes
                await conn.execute(
                    """INSERT INTO dispatches (seller_order_id, zone_id, mode, status, pickup_lat, pickup_lon,
                           drop_lat, drop_lon, deadline_at)
                       VALUES ($1, $2, $3, 'PENDING', $4, $5, $6, $7, now() + make_interval(secs => $8))
                       ON CONFLICT (seller_order_id) DO UPDATE SET
                           zone_id = $2, mode = $3, status = 'PENDING', pickup_lat = $4, pickup_lon = $5,
                           drop_lat = $6, drop_lon = $7, deadline_at = now() + make_interval(secs => $8),
                           attempt = dispatches.attempt + 1, round = 0, reason = NULL, driver_id = NULL,
                           ended_at = NULL, updated_at = now()""",
                    req.seller_order_id,
                    fence.zone_id,
                    rules.mode,
                    req.pickup_lat,
                    req.pickup_lon,
                    req.drop_lat,
                    req.drop_lon,
                    rules.deadline_s,
                )
                loaded = await self.load(req.seller_order_id, conn)
                assert loaded is not None
                choice = await self._round_in(conn, loaded, rules, pick, changes)
                if isinstance(choice, Nobody):
                    # Nobody now: as in `auto`, nothing is written and the answer says so.
                    raise _NobodyError
                return await self.load(req.seller_order_id, conn), changes
        except _NobodyError:
            return None, Changes()

    async def make_round(
        self, seller_order_id: str, *, fence: Fence, rules: OfferRules, pick: PickRule
    ) -> Changes:
        """The next round of an open dispatch (offers, an automatic booking, or PENDING),
        decided on the locked rows. RoundMovedError: the dispatch needs something else."""
        changes = Changes()
        async with connection(self.pool) as conn, conn.transaction():
            await _fence(conn, fence)
            loaded = await self.load(seller_order_id, conn, lock=True)
            if loaded is None:
                raise RoundMovedError(seller_order_id)
            await self._round_in(conn, loaded, rules, pick, changes)
        return changes

    async def _round_in(
        self,
        conn: Conn,
        loaded: Loaded,
        rules: OfferRules,
        pick: PickRule,
        changes: Changes,
    ) -> Choice:
        step = next_step(rules, loaded.view, loaded.now)
        if not isinstance(step, MakeRound):
            raise RoundMovedError(loaded.view.seller_order_id)
        row = loaded.row
        lat, lon = row["pickup_lat"], row["pickup_lon"]
        box = bounding_box(lat, lon, pick.radius_km)
        found = await conn.fetch(
            CANDIDATES_SQL,
            lat,
            lon,
            pick.heartbeat_ttl_s,
            *box,
            list(step.exclude),
            pick.radius_km,
            step.count,
        )
        candidates = [
            Candidate(r["id"], r["distance_km"], r["auto_accept"]) for r in found
        ]
        choice = choose(step, candidates, loaded.now, loaded.view.deadline_at)
        distances = {c.driver_id: c.distance_km for c in candidates}
        if isinstance(choice, Book):
            changes.booked_body = await _book(
                conn,
                row,
                choice.driver_id,
                distances[choice.driver_id],
                changes,
                self.render,
            )
            changes.booked_driver = choice.driver_id
        elif isinstance(choice, OfferTo):
            await self._offer(conn, row, step, choice.driver_ids, distances, changes)
        else:
            await conn.execute(
                "UPDATE dispatches SET status = 'PENDING', updated_at = now() WHERE seller_order_id = $1",
                row["seller_order_id"],
            )
            changes.retry_at = choice.retry_at
        return choice

    async def _offer(
        self,
        conn: Conn,
        row: asyncpg.Record,
        step: MakeRound,
        driver_ids: Sequence[str],
        distances: dict[str, float],
        changes: Changes,
    ) -> None:
        offer_ids = [new_offer_id() for _ in driver_ids]
        expires_at = ts(step.expires_at)
        accept_by = ts(step.expires_at + OFFER_GRACE_S)
        await conn.execute(
            OPEN_OFFERS_SQL,
            offer_ids,
            list(driver_ids),
            [distances[d] for d in driver_ids],
            row["seller_order_id"],
            row["attempt"],
            step.round,
            expires_at,
            accept_by,
        )
        await conn.execute(
            "UPDATE dispatches SET status = 'OFFERED', round = $2, updated_at = now() WHERE seller_order_id = $1",
            row["seller_order_id"],
            step.round,
        )
        pickup = {"lat": row["pickup_lat"], "lon": row["pickup_lon"]}
        drop = (
            None
            if row["drop_lat"] is None
            else {"lat": row["drop_lat"], "lon": row["drop_lon"]}
        )
        for offer_id, driver_id in zip(offer_ids, driver_ids, strict=True):
            changes.drivers.add(driver_id)
            await tell_driver(
                conn,
                driver_id,
                "offer.created",
                {
                    "offerId": offer_id,
                    "sellerOrderId": row["seller_order_id"],
                    "pickup": pickup,
                    "drop": drop,
                    "distanceKm": round_km(distances[driver_id]),
                    "expiresAt": _z(expires_at),
                },
            )
        changes.offered = tuple(driver_ids)

    async def expire(
        self, seller_order_id: str, offer_ids: Sequence[str], *, fence: Fence | None
    ) -> Changes:
        """Expire the open offers past accept_by (PostgreSQL's clock decides); a driver
        who let MISSED_OFFERS_OFFLINE in a row expire goes OFFLINE."""
        changes = Changes()
        async with connection(self.pool) as conn, conn.transaction():
            await _fence(conn, fence)
            await conn.fetchrow(
                "SELECT 1 FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                seller_order_id,
            )
            rows = await conn.fetch(
                "SELECT driver_id FROM offers WHERE offer_id = ANY($1::text[]) AND status = 'OPEN'",
                list(offer_ids),
            )
            await _lock_drivers(conn, [r["driver_id"] for r in rows])
            for closed in await _close(
                conn, offer_ids, "EXPIRED", None, only_late=True
            ):
                await _missed(conn, closed["driver_id"], closed["offer_id"], changes)
        return changes

    async def give_up(
        self, seller_order_id: str, *, rules: OfferRules, fence: Fence | None
    ) -> bool:
        """End an open dispatch without a driver and tell Vendure (delivery.unassigned),
        if the policy still says so on the locked row. The caller decided on a read
        taken without the lock: a decline or a redispatch may have started a new round
        or a new attempt since, and that one must not be ended. False: nothing ended."""
        changes = Changes()
        async with connection(self.pool) as conn, conn.transaction():
            await _fence(conn, fence)
            loaded = await self.load(seller_order_id, conn, lock=True)
            if loaded is None:
                return False
            step = next_step(rules, loaded.view, loaded.now)
            if not isinstance(step, GiveUp):
                return False
            reason = step.reason
            await _lock_drivers(conn, await _open_offer_drivers(conn, seller_order_id))
            await _withdraw_open(conn, seller_order_id, "DISPATCH_ENDED", changes)
            sequence: int = await conn.fetchval(
                """UPDATE dispatches SET status = 'UNASSIGNED', reason = $2, sequence = sequence + 1,
                       ended_at = now(), updated_at = now()
                   WHERE seller_order_id = $1 RETURNING sequence""",
                seller_order_id,
                reason,
            )
            await enqueue(
                conn,
                event_type="delivery.unassigned",
                seller_order_id=seller_order_id,
                data={
                    "sellerOrderId": seller_order_id,
                    "reason": reason,
                    "sequence": sequence,
                },
            )
        return True

    # ---- answers from drivers and operators (the ingress) ---------------------------------

    async def accept(self, driver_id: str, offer_id: str) -> Changes:
        """The driver takes the job: one transaction locks the dispatch, the drivers of
        its open offers and the offers, books the driver (delivery, outbox
        `delivery.assigned`) and withdraws every other offer of the order.

        Raises OfferRefusedError (409 with its reason) or NotFoundError. A repeated
        successful accept answers the same (no second booking).
        """
        changes = Changes()
        refusal: OfferRefusedError | None = None
        async with connection(self.pool) as conn, conn.transaction():
            order = (await self._offer_of(conn, driver_id, offer_id))["seller_order_id"]
            dispatch = _one(
                await conn.fetchrow(
                    "SELECT * FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                    order,
                )
            )
            drivers = await _lock_drivers(
                conn, [driver_id, *await _open_offer_drivers(conn, order)]
            )
            offer = _one(
                await conn.fetchrow(
                    """SELECT *, now() > accept_by AS late, extract(epoch FROM now() - created_at)::float8 AS age
                   FROM offers WHERE offer_id = $1 FOR UPDATE""",
                    offer_id,
                )
            )
            changes.order = order
            if offer["status"] == "ACCEPTED":
                return changes
            refusal = _refusal_of(offer, dispatch, drivers[driver_id])
            if refusal is None and await _delivery_exists(conn, order):
                # Booked by another path (e.g. while `auto` was on): nobody else may be.
                await _withdraw_open(conn, order, "SUPERSEDED", changes)
                refusal = OfferRefusedError(
                    "OFFER_SUPERSEDED", "the order is assigned already"
                )
            if refusal is None:
                changes.wake[order] = dispatch["zone_id"]
                await _close(conn, [offer_id], "ACCEPTED", None)
                await _withdraw_open(conn, order, "SUPERSEDED", changes)
                changes.booked_body = await _book(
                    conn,
                    dispatch,
                    driver_id,
                    offer["distance_km"],
                    changes,
                    self.render,
                )
                changes.booked_driver = driver_id
                changes.accept_age_s = offer["age"]
            elif refusal.reason == "OFFER_EXPIRED" and offer["status"] == "OPEN":
                # Past accept_by: the accept itself expires it (the timer may be late).
                for closed in await _close(
                    conn, [offer_id], "EXPIRED", None, only_late=True
                ):
                    await _missed(
                        conn, closed["driver_id"], closed["offer_id"], changes
                    )
                changes.wake[order] = dispatch["zone_id"]
            elif refusal.reason == "OFFER_WITHDRAWN" and offer["status"] == "OPEN":
                # The driver went OFFLINE or was deactivated while the offer was out.
                await _close(conn, [offer_id], "WITHDRAWN", "DRIVER_UNAVAILABLE")
                changes.drivers.add(driver_id)
                changes.wake[order] = dispatch["zone_id"]
        if refusal is not None:
            refusal.changes = changes
            raise refusal
        return changes

    async def decline(
        self, driver_id: str, offer_id: str, reason: str | None
    ) -> Changes:
        changes = Changes()
        refusal: OfferRefusedError | None = None
        async with connection(self.pool) as conn, conn.transaction():
            order = (await self._offer_of(conn, driver_id, offer_id))["seller_order_id"]
            dispatch = _one(
                await conn.fetchrow(
                    "SELECT * FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                    order,
                )
            )
            drivers = await _lock_drivers(conn, [driver_id])
            offer = _one(
                await conn.fetchrow(
                    "SELECT *, now() > accept_by AS late FROM offers WHERE offer_id = $1 FOR UPDATE",
                    offer_id,
                )
            )
            if offer["status"] == "DECLINED":
                return changes
            refusal = _refusal_of(offer, dispatch, drivers[driver_id], declining=True)
            if refusal is None:
                await _close(conn, [offer_id], "DECLINED", reason)
                await conn.execute(
                    "UPDATE drivers SET missed_offers = 0 WHERE id = $1", driver_id
                )
                changes.drivers.add(driver_id)
                changes.wake[order] = dispatch["zone_id"]
            elif refusal.reason == "OFFER_EXPIRED" and offer["status"] == "OPEN":
                for closed in await _close(
                    conn, [offer_id], "EXPIRED", None, only_late=True
                ):
                    await _missed(
                        conn, closed["driver_id"], closed["offer_id"], changes
                    )
                changes.wake[order] = dispatch["zone_id"]
        if refusal is not None:
            refusal.changes = changes
            raise refusal
        return changes

    async def cancel(self, seller_order_id: str) -> Changes | None:
        """Vendure cancelled the order: an unfinished dispatch ends CANCELLED and its open
        offers are withdrawn. Returns None when there is no dispatch, or when it already
        booked a driver (the delivery is then cancelled as in `auto`)."""
        changes = Changes()
        async with connection(self.pool) as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT status FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                seller_order_id,
            )
            if row is None or row["status"] == "ASSIGNED":
                return None
            if row["status"] == "CANCELLED":
                return changes
            await _lock_drivers(conn, await _open_offer_drivers(conn, seller_order_id))
            await _withdraw_open(conn, seller_order_id, "ORDER_CANCELLED", changes)
            await conn.execute(
                """UPDATE dispatches SET status = 'CANCELLED', ended_at = coalesce(ended_at, now()),
                       updated_at = now() WHERE seller_order_id = $1""",
                seller_order_id,
            )
        return changes

    async def force_assign(self, seller_order_id: str, driver_id: str) -> Changes:
        """An operator books `driver_id` (AVAILABLE, active) for the order: its other open
        offer and every open offer of the order are withdrawn in the same transaction."""
        changes = Changes()
        async with connection(self.pool) as conn, conn.transaction():
            dispatch = await conn.fetchrow(
                "SELECT * FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                seller_order_id,
            )
            if dispatch is None:
                raise NotFoundError(
                    f"no dispatch for sellerOrderId {seller_order_id!r}"
                )
            if dispatch["status"] == "ASSIGNED" or await _delivery_exists(
                conn, seller_order_id
            ):
                raise OfferRefusedError(
                    "ALREADY_ASSIGNED", "the order is already assigned"
                )
            if dispatch["status"] == "CANCELLED":
                raise OfferRefusedError("ORDER_CANCELLED", "the order was cancelled")
            drivers = await _lock_drivers(
                conn, [driver_id, *await _open_offer_drivers(conn, seller_order_id)]
            )
            driver = drivers.get(driver_id)
            if driver is None:
                raise NotFoundError(f"driver {driver_id} not found")
            if driver["status"] == "BUSY":
                raise OfferRefusedError(
                    "DRIVER_BUSY", f"driver {driver_id} has an active delivery"
                )
            if driver["status"] != "AVAILABLE" or not driver["is_active"]:
                raise OfferRefusedError(
                    "DRIVER_UNAVAILABLE", f"driver {driver_id} is not AVAILABLE"
                )
            if driver["open_offer_id"] is not None:
                other = await conn.fetchrow(
                    "SELECT seller_order_id FROM offers WHERE offer_id = $1",
                    driver["open_offer_id"],
                )
                for closed in await _close(
                    conn, [driver["open_offer_id"]], "WITHDRAWN", "FORCE_ASSIGNED"
                ):
                    await tell_driver(
                        conn,
                        driver_id,
                        "offer.withdrawn",
                        {"offerId": closed["offer_id"], "reason": "FORCE_ASSIGNED"},
                    )
                if other is not None and other["seller_order_id"] != seller_order_id:
                    zone = await conn.fetchval(
                        "SELECT zone_id FROM dispatches WHERE seller_order_id = $1",
                        other["seller_order_id"],
                    )
                    changes.wake[other["seller_order_id"]] = zone
            await _withdraw_open(conn, seller_order_id, "SUPERSEDED", changes)
            distance = 0.0
            if driver["lat"] is not None:
                distance = await conn.fetchval(
                    f"SELECT {haversine_sql('$1::float8', '$2::float8', '$3::float8', '$4::float8')}",
                    dispatch["pickup_lat"],
                    dispatch["pickup_lon"],
                    driver["lat"],
                    driver["lon"],
                )
            changes.booked_body = await _book(
                conn, dispatch, driver_id, distance, changes, self.render
            )
            changes.booked_driver = driver_id
        return changes

    async def redispatch(self, seller_order_id: str, deadline_s: float) -> Changes:
        """Start a new attempt: open offers are withdrawn, the round count and the
        deadline start again. The zone then makes the first round."""
        changes = Changes()
        async with connection(self.pool) as conn, conn.transaction():
            dispatch = await conn.fetchrow(
                "SELECT * FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                seller_order_id,
            )
            if dispatch is None:
                raise NotFoundError(
                    f"no dispatch for sellerOrderId {seller_order_id!r}"
                )
            if dispatch["status"] == "ASSIGNED":
                raise OfferRefusedError(
                    "ALREADY_ASSIGNED", "the order is already assigned"
                )
            if dispatch["status"] == "CANCELLED":
                raise OfferRefusedError("ORDER_CANCELLED", "the order was cancelled")
            await _lock_drivers(conn, await _open_offer_drivers(conn, seller_order_id))
            await _withdraw_open(conn, seller_order_id, "REDISPATCHED", changes)
            await conn.execute(
                """UPDATE dispatches SET status = 'PENDING', attempt = attempt + 1, round = 0, reason = NULL,
                       deadline_at = now() + make_interval(secs => $2), ended_at = NULL, updated_at = now()
                   WHERE seller_order_id = $1""",
                seller_order_id,
                deadline_s,
            )
            changes.wake[seller_order_id] = dispatch["zone_id"]
        return changes

    async def release_driver(self, driver_id: str) -> Changes:
        """The driver went OFFLINE or was deactivated: his open offer is withdrawn now
        (DRIVER_UNAVAILABLE), so his dispatch moves on without waiting for the timeout."""
        changes = Changes()
        async with connection(self.pool) as conn, conn.transaction():
            offer = await conn.fetchrow(
                """SELECT o.offer_id, o.seller_order_id FROM drivers d
                   JOIN offers o ON o.offer_id = d.open_offer_id WHERE d.id = $1""",
                driver_id,
            )
            if offer is None:
                return changes
            order = offer["seller_order_id"]
            zone_id = await conn.fetchval(
                "SELECT zone_id FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                order,
            )
            driver = (await _lock_drivers(conn, [driver_id])).get(driver_id)
            if driver is None or (
                driver["status"] == "AVAILABLE" and driver["is_active"]
            ):
                return changes  # back already: the offer stands
            for closed in await _close(
                conn, [offer["offer_id"]], "WITHDRAWN", "DRIVER_UNAVAILABLE"
            ):
                changes.drivers.add(driver_id)
                changes.wake[order] = zone_id
                await tell_driver(
                    conn,
                    driver_id,
                    "offer.withdrawn",
                    {"offerId": closed["offer_id"], "reason": "DRIVER_UNAVAILABLE"},
                )
        return changes

    async def _offer_of(
        self, conn: Conn, driver_id: str, offer_id: str
    ) -> asyncpg.Record:
        offer = await conn.fetchrow(
            "SELECT seller_order_id, driver_id FROM offers WHERE offer_id = $1",
            offer_id,
        )
        if offer is None or offer["driver_id"] != driver_id:
            # Another driver's offer is none of this driver's business: 404, as unknown.
            raise NotFoundError(f"no offer {offer_id} for driver {driver_id}")
        return _one(offer)


async def _delivery_exists(conn: Conn, seller_order_id: str) -> bool:
    found = await conn.fetchval(
        "SELECT 1 FROM deliveries WHERE seller_order_id = $1", seller_order_id
    )
    return found is not None


def _one(row: asyncpg.Record | None) -> asyncpg.Record:
    """A row the caller's locks guarantee (offers and dispatches are never deleted)."""
    assert row is not None
    return row


class _NobodyError(Exception):
    """The first round found nobody: roll the new dispatch back."""


def _refusal_of(
    offer: asyncpg.Record,
    dispatch: asyncpg.Record,
    driver: asyncpg.Record,
    *,
    declining: bool = False,
) -> OfferRefusedError | None:
    """Why this answer cannot be taken, or None (all rows locked by the caller)."""
    status = offer["status"]
    if status == "EXPIRED" or (status == "OPEN" and offer["late"]):
        return OfferRefusedError("OFFER_EXPIRED", "the offer expired")
    if status == "WITHDRAWN":
        reason = WITHDRAWN_REFUSALS.get(offer["reason"] or "", "OFFER_WITHDRAWN")
        return OfferRefusedError(reason, f"the offer was withdrawn ({offer['reason']})")
    if status == "DECLINED":
        return OfferRefusedError("OFFER_DECLINED", "the driver declined this offer")
    if status == "ACCEPTED":
        return OfferRefusedError("OFFER_SUPERSEDED", "the offer was accepted already")
    if dispatch["status"] == "CANCELLED":
        return OfferRefusedError("ORDER_CANCELLED", "the order was cancelled")
    if dispatch["status"] == "ASSIGNED":
        return OfferRefusedError("OFFER_SUPERSEDED", "another driver took the order")
    if declining:
        return None
    if driver["status"] == "BUSY":
        return OfferRefusedError("DRIVER_BUSY", "the driver has an active delivery")
    if driver["status"] != "AVAILABLE" or not driver["is_active"]:
        return OfferRefusedError("OFFER_WITHDRAWN", "the driver is not AVAILABLE")
    return None


async def _missed(conn: Conn, driver_id: str, offer_id: str, changes: Changes) -> None:
    """One more offer let expire; the MISSED_OFFERS_OFFLINE-th in a row sets OFFLINE."""
    changes.drivers.add(driver_id)
    await conn.execute(
        """UPDATE drivers SET missed_offers = missed_offers + 1,
               status = CASE WHEN missed_offers + 1 >= $2 AND status = 'AVAILABLE' THEN 'OFFLINE' ELSE status END,
               updated_at = now()
           WHERE id = $1""",
        driver_id,
        MISSED_OFFERS_OFFLINE,
    )
    await tell_driver(conn, driver_id, "offer.expired", {"offerId": offer_id})


# The delivery, its first history entry, the driver BUSY and the dispatch ASSIGNED.
BOOK_SQL = """
WITH delivery AS (
    INSERT INTO deliveries (seller_order_id, assignment_id, driver_id, zone_id, status,
        pickup_lat, pickup_lon, drop_lat, drop_lon, distance_km, response_body, sequence)
    VALUES ($1, $2, $3, $4, 'ASSIGNED', $5, $6, $7, $8, $9, $10, $11)
    RETURNING seller_order_id
), history AS (
    INSERT INTO delivery_history (seller_order_id, status)
    SELECT seller_order_id, 'ASSIGNED' FROM delivery
), busy AS (
    UPDATE drivers SET status = 'BUSY', missed_offers = 0, updated_at = now() WHERE id = $3
)
UPDATE dispatches SET status = 'ASSIGNED', driver_id = $3, sequence = $11, ended_at = now(),
    updated_at = now()
WHERE seller_order_id = $1
"""


async def _book(
    conn: Conn,
    dispatch: asyncpg.Record,
    driver_id: str,
    distance: float,
    changes: Changes,
    render: RenderAnswer,
) -> str:
    """Book `driver_id` for the dispatch's order (driver row locked by the caller)."""
    order = dispatch["seller_order_id"]
    assignment_id = new_assignment_id()
    distance_km = round_km(distance)
    sequence = dispatch["sequence"] + 1
    body = render(
        Assignment(order, driver_id, assignment_id, distance_km, dispatch["zone_id"])
    )
    await conn.execute(
        BOOK_SQL,
        order,
        assignment_id,
        driver_id,
        dispatch["zone_id"],
        dispatch["pickup_lat"],
        dispatch["pickup_lon"],
        dispatch["drop_lat"],
        dispatch["drop_lon"],
        distance_km,
        body,
        sequence,
    )
    await enqueue(
        conn,
        event_type="delivery.assigned",
        seller_order_id=order,
        data={
            "sellerOrderId": order,
            "driverId": driver_id,
            "assignmentId": assignment_id,
            "distanceKm": distance_km,
            "sequence": sequence,
        },
    )
    pickup = {"lat": dispatch["pickup_lat"], "lon": dispatch["pickup_lon"]}
    drop = (
        None
        if dispatch["drop_lat"] is None
        else {"lat": dispatch["drop_lat"], "lon": dispatch["drop_lon"]}
    )
    await tell_driver(
        conn,
        driver_id,
        "delivery.assigned",
        {
            "sellerOrderId": order,
            "assignmentId": assignment_id,
            "pickup": pickup,
            "drop": drop,
            "distanceKm": distance_km,
        },
    )
    changes.drivers.add(driver_id)
    return body


def _z(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def offer_counts(pool: asyncpg.Pool) -> tuple[dict[str, int], int]:
    """Offers by status, and the dispatches that ended unassigned (the metrics)."""
    async with pool.acquire(timeout=2.0) as conn:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM offers GROUP BY status"
        )
        gave_up: int = await conn.fetchval(
            "SELECT count(*) FROM webhook_outbox WHERE event_type = 'delivery.unassigned'"
        )
    return {r["status"]: r["n"] for r in rows}, gave_up
