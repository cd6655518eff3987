"""Webhook outbox: events written in the same transaction as the state change they report."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dispatcher.config import DEFAULT_PG_TIMEOUT_S
from dispatcher.store.pg import connection

# What callers hold inside a transaction: a bare connection or one acquired from a pool.
Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy

EVENT_TYPES: Final[tuple[str, ...]] = (
    "delivery.assigned",
    "delivery.picked_up",
    "delivery.delivered",
    "delivery.failed",
    "delivery.cancelled",
    # Offer modes: a dispatch gave up (no driver accepted, or none was available).
    "delivery.unassigned",
)
# Senders LISTEN here; the notification is delivered only when the caller commits.
NOTIFY_CHANNEL: Final = "dispatcher_outbox"


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One event as the outbox stores it: the id and the bytes every attempt sends."""

    webhook_id: str
    event_type: str
    seller_order_id: str
    body: str

    def params(self) -> tuple[str, str, str, str]:
        """The values of `insert_sql`'s parameters, in order."""
        return (self.webhook_id, self.event_type, self.seller_order_id, self.body)


def insert_sql(first: int) -> str:
    """The one INSERT of an outbox row, its values from parameter `$first` on (in
    `OutboxRow.params()` order); usable alone or as a CTE of a larger statement."""
    values = ", ".join(f"${n}" for n in range(first, first + 4))
    return (
        "INSERT INTO webhook_outbox (webhook_id, event_type, seller_order_id, body)"
        f" VALUES ({values}) RETURNING id"
    )


# Events still to send: neither delivered nor given up on.
PENDING_SQL: Final = """
SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL AND failed_at IS NULL
"""

# The sender's statements (webhooks/sender.py).
# Claim and lease in one statement: SKIP LOCKED keeps concurrent senders apart while the
# statement runs, the pushed next_attempt_at keeps them apart until the lease ends, and a
# sender that dies mid-send just leaves rows that come due again when it runs out.
CLAIM_SQL: Final = """
WITH due AS (
    SELECT id FROM webhook_outbox
    WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM webhook_endpoints WHERE url = $1 AND disabled_at IS NOT NULL
      )
    ORDER BY next_attempt_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_outbox AS o
SET next_attempt_at = now() + make_interval(secs => $3)
FROM due
WHERE o.id = due.id
RETURNING o.id, o.webhook_id, o.body, o.attempts, o.next_attempt_at
"""
# Success is recorded even if our lease ran out meanwhile: the event did arrive.
DELIVERED_SQL: Final = """
UPDATE webhook_outbox
SET delivered_at = now(), failed_at = NULL, attempts = attempts + 1,
    last_status = $2, last_error = NULL
WHERE id = $1 AND delivered_at IS NULL
"""
# The other writes are fenced by the lease value: if it changed, another sender owns the row.
RETRY_SQL: Final = """
UPDATE webhook_outbox
SET attempts = attempts + 1, last_status = $3, last_error = $4,
    next_attempt_at = now() + make_interval(secs => $5),
    failed_at = CASE WHEN $6::boolean THEN now() END
WHERE id = $1 AND next_attempt_at = $2 AND delivered_at IS NULL AND failed_at IS NULL
"""
# 410: disable the endpoint and hand the row back at once for a sender with another URL.
GONE_SQL: Final = """
WITH endpoint AS (
    INSERT INTO webhook_endpoints (url, disabled_at, disabled_reason)
    VALUES ($3, now(), $4)
    ON CONFLICT (url) DO UPDATE
    SET disabled_at = excluded.disabled_at, disabled_reason = excluded.disabled_reason
    WHERE webhook_endpoints.disabled_at IS NULL
)
UPDATE webhook_outbox
SET attempts = attempts + 1, last_status = 410, last_error = $4, next_attempt_at = now()
WHERE id = $1 AND next_attempt_at = $2 AND delivered_at IS NULL AND failed_at IS NULL
"""
RELEASE_SQL: Final = """
UPDATE webhook_outbox SET next_attempt_at = now()
WHERE id = $1 AND next_attempt_at = $2 AND delivered_at IS NULL AND failed_at IS NULL
"""
DISABLED_SQL: Final = """
SELECT EXISTS (
    SELECT 1 FROM webhook_endpoints WHERE url = $1 AND disabled_at IS NOT NULL
)
"""

# One round trip: the insert and the wake-up ride the same statement.
_ENQUEUE_SQL: Final = f"""
WITH inserted AS ({insert_sql(1)})
SELECT pg_notify($5, '') FROM inserted
"""


def build_body(event_type: str, data: Mapping[str, object], now: datetime) -> str:
    """Return the compact JSON body `{"type", "timestamp", "data"}` (docs/API.md#webhooks)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}")
    if now.tzinfo is None:
        raise ValueError("webhook timestamp must be timezone-aware")
    payload = {
        "type": event_type,
        "timestamp": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": dict(data),
    }
    # ASCII-only output means the text column and the wire bytes cannot disagree on encoding;
    # NaN/Infinity are not JSON and Vendure's parser would reject them.
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def new_event_id() -> str:
    """A Standard Webhooks `webhook-id`, fixed for every attempt of one event."""
    return "msg_" + uuid.uuid4().hex


def new_row(
    event_type: str, seller_order_id: str, data: Mapping[str, object]
) -> OutboxRow:
    """The row of one event, stamped now, with a fresh webhook-id."""
    if data.get("sellerOrderId", seller_order_id) != seller_order_id:
        raise ValueError("data.sellerOrderId disagrees with seller_order_id")
    # Built once and stored: every retry sends these exact bytes.
    body = build_body(event_type, data, datetime.now(UTC))
    return OutboxRow(new_event_id(), event_type, seller_order_id, body)


async def enqueue(
    conn: Conn,
    *,
    event_type: str,
    seller_order_id: str,
    data: Mapping[str, object],
    pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S,
) -> str:
    """Add one event to the outbox inside the caller's transaction; return its webhook-id."""
    row = new_row(event_type, seller_order_id, data)
    await conn.execute(
        _ENQUEUE_SQL, *row.params(), NOTIFY_CHANNEL, timeout=pg_timeout_s
    )
    return row.webhook_id


async def pending(pool: asyncpg.Pool) -> int:
    """How many events wait to be sent (`/ready`, the metrics)."""
    async with connection(pool) as conn:
        count: int = await conn.fetchval(PENDING_SQL)
    return count
