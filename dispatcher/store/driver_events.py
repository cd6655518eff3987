"""Driver event log: append in the caller's transaction, read after a cursor, prune by age."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import asyncpg

from dispatcher.config import DEFAULT_PG_TIMEOUT_S
from dispatcher.store.outbox import Conn
from dispatcher.store.pg import connection

# Every type a driver's stream may carry; other changes add theirs here.
EVENT_TYPES: Final[frozenset[str]] = frozenset(
    {
        "delivery.assigned",
        "delivery.picked_up",
        "delivery.delivered",
        "delivery.failed",
        "delivery.cancelled",
        "offer.created",
        "offer.withdrawn",
        "offer.expired",
    }
)
# Ingress replicas LISTEN here. Payload "<driverId> <seq>": small (NOTIFY payloads must
# stay under 8000 bytes), and enough to wake only the replica holding that driver's
# socket; the event itself is read from the table, so a lost wake-up loses nothing.
EVENTS_CHANNEL: Final = "dispatcher_driver_events"
# Payload "<driverId> <generation>": a socket for the driver opened somewhere; every
# replica closes its older socket for that driver.
SOCKETS_CHANNEL: Final = "dispatcher_driver_sockets"

# One round trip: take the next seq (the counter row's lock serialises the writers of
# one driver, and a rollback gives the number back: no gaps), insert the row, and queue
# the wake-up, which PostgreSQL delivers only if the transaction commits.
_APPEND_SQL: Final = """
WITH next AS (
    INSERT INTO driver_event_seq AS s (driver_id, seq) VALUES ($1, 1)
    ON CONFLICT (driver_id) DO UPDATE SET seq = s.seq + 1
    RETURNING seq
), event AS (
    INSERT INTO driver_events (driver_id, seq, type, data)
    SELECT $1, seq, $2, $3 FROM next
    RETURNING seq
)
SELECT seq, pg_notify($4, $1 || ' ' || seq) FROM event
"""

# Up to `room` events after each cursor, in seq order (one query for many sockets).
_AFTER_SQL: Final = """
SELECT c.driver_id, e.seq, e.type, e.at, e.data
FROM unnest($1::text[], $2::bigint[], $3::int[]) AS c(driver_id, after, room)
CROSS JOIN LATERAL (
    SELECT seq, type, at, data FROM driver_events e
    WHERE e.driver_id = c.driver_id AND e.seq > c.after
    ORDER BY e.seq LIMIT c.room
) e
ORDER BY c.driver_id, e.seq
"""

# Where a driver's log stands: last seq and oldest retained seq.
_POSITION_SQL: Final = """
SELECT coalesce((SELECT seq FROM driver_event_seq WHERE driver_id = $1), 0) AS head,
       (SELECT min(seq) FROM driver_events WHERE driver_id = $1) AS oldest
"""

# A new socket's generation (the newest wins), and the wake-up that tells every
# replica to close its older socket for the driver.
_CLAIM_SQL: Final = """
WITH g AS (SELECT nextval('driver_socket_generation') AS generation)
SELECT g.generation, pg_notify($2, $1 || ' ' || g.generation) FROM g
"""


@dataclass(frozen=True, slots=True)
class DriverEvent:
    driver_id: str
    seq: int
    type: str
    at: datetime
    data: str

    def message(self) -> str:
        """The wire form `{"seq", "type", "at", "data"}`; `data` goes out as stored."""
        return (
            f'{{"seq":{self.seq},"type":{json.dumps(self.type)},'
            f'"at":"{format_at(self.at)}","data":{self.data}}}'
        )


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Where a driver's log stands when a socket opens."""

    head: int
    oldest: int | None

    def start_after(self, after: int | None) -> int | None:
        """The cursor a socket asking for `after` starts from, or None: resync.

        No `after`: live events only. An `after` whose successor was pruned (or that
        lies beyond the last event: another history) cannot be resumed.
        """
        if after is None or after == self.head:
            return self.head
        if after > self.head:
            return None
        oldest = self.head + 1 if self.oldest is None else self.oldest
        return after if oldest <= after + 1 else None


def format_at(at: datetime) -> str:
    """UTC with milliseconds and a Z, e.g. 2026-12-02T14:30:00.123Z."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def append_driver_event(
    conn: Conn,
    driver_id: str,
    event_type: str,
    data: Mapping[str, object],
    *,
    pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S,
) -> int:
    """Append one event to the driver's log inside the caller's transaction.

    The event exists, and reaches the driver's socket, if and only if the caller's
    transaction commits. Returns its seq (1, 2, ... per driver, no gaps).
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown driver event type {event_type!r}")
    # NaN/Infinity are not JSON: a client's parser would reject the message.
    body = json.dumps(dict(data), separators=(",", ":"), allow_nan=False)
    seq: int = await conn.fetchval(
        _APPEND_SQL, driver_id, event_type, body, EVENTS_CHANNEL, timeout=pg_timeout_s
    )
    return seq


class DriverEventStore:
    """Reads of the log for the sockets, and its pruning."""

    def __init__(
        self, pool: asyncpg.Pool, *, pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S
    ) -> None:
        self.pool = pool
        self.pg_timeout_s = pg_timeout_s

    async def position(self, driver_id: str) -> LogPosition:
        async with connection(self.pool) as conn:
            row = await conn.fetchrow(
                _POSITION_SQL, driver_id, timeout=self.pg_timeout_s
            )
        assert row is not None
        return LogPosition(row["head"], row["oldest"])

    async def claim_socket(self, driver_id: str) -> int:
        """A generation for a new socket of the driver; older ones everywhere close."""
        async with connection(self.pool) as conn:
            generation: int = await conn.fetchval(
                _CLAIM_SQL, driver_id, SOCKETS_CHANNEL, timeout=self.pg_timeout_s
            )
        return generation

    async def after(self, cursors: Sequence[tuple[str, int, int]]) -> list[DriverEvent]:
        """Events after each (driver, cursor), at most `room` per driver, in seq order."""
        if not cursors:
            return []
        ids, afters, rooms = zip(*cursors, strict=True)
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                _AFTER_SQL,
                list(ids),
                list(afters),
                list(rooms),
                timeout=self.pg_timeout_s,
            )
        return [
            DriverEvent(r["driver_id"], r["seq"], r["type"], r["at"], r["data"])
            for r in rows
        ]

    async def heads(self, driver_ids: Sequence[str]) -> dict[str, int]:
        """The last seq of each driver that has events."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT driver_id, seq FROM driver_event_seq WHERE driver_id = ANY($1::text[])",
                list(driver_ids),
                timeout=self.pg_timeout_s,
            )
        return {r["driver_id"]: r["seq"] for r in rows}

    async def prune(self, retention_s: float) -> int:
        """Delete events older than the retention; returns how many went."""
        async with connection(self.pool) as conn:
            status: str = await conn.execute(
                "DELETE FROM driver_events WHERE at < now() - make_interval(secs => $1)",
                retention_s,
                timeout=self.pg_timeout_s,
            )
        return int(status.split()[-1])
