"""Accepted inbound webhook-ids: a signed message authorizes one event, on one route."""

from __future__ import annotations

import hashlib
import time

import asyncpg

from dispatcher.store.pg import connection

# Rows outlive the signed timestamp by the verifier's tolerance plus this margin (clock
# skew between PostgreSQL and the sender): past that, the signature check refuses the
# message on its own, so forgetting its id opens nothing.
EXPIRY_MARGIN_S = 60
# Expired rows are deleted at most this often per ingress, piggybacked on a claim.
PRUNE_INTERVAL_S = 60.0

_CLAIM_SQL = """
INSERT INTO inbound_webhooks (webhook_id, event_type, body_sha256, expires_at)
VALUES ($1, $2, $3, to_timestamp($4))
ON CONFLICT (webhook_id)
DO UPDATE SET expires_at = greatest(inbound_webhooks.expires_at, EXCLUDED.expires_at)
RETURNING event_type, body_sha256
"""


class InboundIdStore:
    """Remembers each accepted `webhook-id` with its event type and body hash.

    Guarantee: once an id was accepted for one (event type, body), the same id with any
    other event type or body is refused for as long as its signature could still verify.
    A retry (same id, same event, same body) is accepted again, as Standard Webhooks
    senders re-send the same id with a new timestamp.
    """

    def __init__(self, pool: asyncpg.Pool, *, tolerance_s: int) -> None:
        self.pool = pool
        self.tolerance_s = tolerance_s
        self._next_prune = 0.0

    async def claim(
        self, webhook_id: str, event_type: str, body: bytes, *, signed_at: int
    ) -> bool:
        """True if this id is new or was accepted before for this same event and body."""
        digest = hashlib.sha256(body).digest()
        expires = signed_at + self.tolerance_s + EXPIRY_MARGIN_S
        async with connection(self.pool) as conn:
            row = await conn.fetchrow(
                _CLAIM_SQL, webhook_id, event_type, digest, expires
            )
            now = time.monotonic()
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_INTERVAL_S
                await conn.execute(
                    "DELETE FROM inbound_webhooks WHERE expires_at < now()"
                )
        assert (
            row is not None
        )  # INSERT ... ON CONFLICT DO UPDATE always returns the row
        return bool(
            row["event_type"] == event_type and bytes(row["body_sha256"]) == digest
        )
