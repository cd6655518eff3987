"""Outbox sender: delivers webhook_outbox rows to the Vendure endpoint at least once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final

import aiohttp
import asyncpg
from yarl import URL

from dispatcher import __version__
from dispatcher.backoff import Backoff
from dispatcher.config import DEFAULT_PG_TIMEOUT_S
from dispatcher.store.listen import Listener
from dispatcher.store.outbox import (
    CLAIM_SQL,
    DELIVERED_SQL,
    DISABLED_SQL,
    GONE_SQL,
    NOTIFY_CHANNEL,
    PENDING_SQL,
    RELEASE_SQL,
    RETRY_SQL,
)
from dispatcher.webhooks import signing

logger = logging.getLogger(__name__)

# Slack on top of the sending time a lease covers: the claim's own round trip and the
# scheduling delays around it, so a lease never runs out while its holder may still send.
LEASE_MARGIN_S: Final = 5.0
# A broken endpoint answering `Retry-After: <a year>` must not park events past the retry window.
MAX_RETRY_AFTER_S: Final = 86400.0
# last_error is for operators reading a row: enough for the cause, bounded for the table.
MAX_ERROR_CHARS: Final = 300
USER_AGENT: Final = f"dispatcher-webhooks/{__version__}"
_DELTA_SECONDS_RE: Final = re.compile(r"[0-9]{1,10}")
# What PostgreSQL being down or restarting looks like: expected, so no traceback.
_OUTAGE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


@dataclass(frozen=True, slots=True)
class _Row:
    """One claimed outbox row; `lease` is its next_attempt_at while we hold it."""

    id: int
    webhook_id: str
    body: bytes
    attempts: int
    lease: datetime


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one POST produced: an HTTP status, or an error and no status."""

    status: int | None
    error: str | None = None
    retry_after_s: float | None = None


def parse_retry_after(
    value: str | None, *, now: datetime | None = None
) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date), else None."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS_RE.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # HTTP-dates are always GMT.
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC) if now is None else now
    return max(0.0, (when - current).total_seconds())


def _display_url(url: str) -> str:
    """The URL without credentials or query, which may carry tokens, for logs."""
    parsed = URL(url)
    return str(parsed.with_user(None).with_query(None).with_fragment(None))


def _validated_url(url: str | None) -> str | None:
    if url is None:
        return None
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("webhook URL must be an absolute http(s) URL")
    return url


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_ERROR_CHARS]


class WebhookSender:
    """Delivers outbox rows to one URL, at least once, alongside any number of peers."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        url: str | None,
        secret: str,
        schedule_s: Sequence[float],
        timeout_s: float,
        poll_interval_s: float,
        jitter: float = 0.2,
        batch_size: int = 50,
        concurrency: int = 8,
        pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S,
    ) -> None:
        signing.decode_secret(secret)  # fail at construction, not at the first event
        if not schedule_s or any(not (0 <= s < math.inf) for s in schedule_s):
            raise ValueError("webhook schedule must be a non-empty list of delays >= 0")
        if timeout_s <= 0 or poll_interval_s <= 0 or pg_timeout_s <= 0:
            raise ValueError("webhook timeouts and poll interval must be > 0")
        if not 0 <= jitter < 1:
            raise ValueError("webhook jitter must be in [0, 1)")
        if batch_size < 1 or concurrency < 1:
            raise ValueError("webhook batch size and concurrency must be >= 1")
        self._pool = pool
        self._url = _validated_url(url)
        self._secret = secret
        self._schedule_s = tuple(float(s) for s in schedule_s)
        self._timeout_s = timeout_s
        self._poll_interval_s = poll_interval_s
        self._jitter = jitter
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._pg_timeout_s = pg_timeout_s
        # A batch is sent in ceil(batch / concurrency) waves of at most timeout_s each.
        self._lease_s = timeout_s * math.ceil(batch_size / concurrency) + LEASE_MARGIN_S
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        # Set by a 410 in the current batch so its rows not yet sent stay unsent.
        self._gone = False

    # -- public API ----------------------------------------------------------------

    def wake(self) -> None:
        """Look for due rows now instead of at the next poll."""
        self._wake.set()

    async def pending_count(self) -> int:
        """Events neither delivered nor given up on."""
        return int(await self._fetchval(PENDING_SQL))

    async def endpoint_disabled(self) -> bool:
        """Whether the configured URL answered 410 and is disabled."""
        if self._url is None:
            return False
        return bool(await self._fetchval(DISABLED_SQL, self._url))

    async def run(self) -> None:
        """Deliver due rows until cancelled; PostgreSQL or endpoint outages never end it."""
        if self._url is None:
            logger.warning("no webhook URL configured: events stay in the outbox")
            await asyncio.Event().wait()  # nothing to do until cancelled
            return
        logger.info("sending webhooks to %s", _display_url(self._url))
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            connector=aiohttp.TCPConnector(limit=self._concurrency),
            headers={"user-agent": USER_AGENT},
        )
        async with session:
            # A NOTIFY wakes the poller; rows may have come while nobody listened.
            listen = Listener(
                self._pool,
                {NOTIFY_CHANNEL: lambda _: self.wake()},
                pg_timeout_s=self._pg_timeout_s,
                on_listening=self.wake,
            )
            listener = asyncio.create_task(listen.run_forever(), name="webhook-listen")
            try:
                await self._poll_forever(session, self._url)
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

    # -- polling -------------------------------------------------------------------

    async def _poll_forever(self, session: aiohttp.ClientSession, url: str) -> None:
        # PostgreSQL outages: retry soon, then back off to a gentle rate while it stays down.
        backoff = Backoff()
        while True:
            # Cleared before claiming, so a wake-up during the claim is not lost.
            self._wake.clear()
            try:
                claimed = await self._process_batch(session, url)
            except Exception as exc:
                delay = backoff.next_delay()
                if isinstance(exc, _OUTAGE_ERRORS):
                    logger.warning(
                        "webhook outbox unavailable (%s); retrying in %.1f s",
                        _describe(exc),
                        delay,
                    )
                else:
                    # A dead sender would strand every future event: log loudly, go on.
                    logger.exception("webhook batch failed; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if claimed < self._batch_size:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancel that lands in the same loop turn as wake(), hanging shutdown.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval_s):
                        await self._wake.wait()

    async def _process_batch(self, session: aiohttp.ClientSession, url: str) -> int:
        # Taken before the claim so our idea of the lease ends no later than PostgreSQL's.
        claimed_at = time.monotonic()
        rows = await self._claim(url)
        self._gone = False
        async with asyncio.TaskGroup() as group:
            for row in rows:
                group.create_task(self._deliver(session, url, row, claimed_at))
        return len(rows)

    async def _claim(self, url: str) -> list[_Row]:
        async with self._pool.acquire(timeout=self._pg_timeout_s) as conn:
            records = await conn.fetch(
                CLAIM_SQL,
                url,
                self._batch_size,
                self._lease_s,
                timeout=self._pg_timeout_s,
            )
        rows = [
            _Row(
                id=r["id"],
                webhook_id=r["webhook_id"],
                body=r["body"].encode("utf-8"),
                attempts=r["attempts"],
                lease=r["next_attempt_at"],
            )
            for r in records
        ]
        rows.sort(key=lambda row: row.id)
        return rows

    # -- one row -------------------------------------------------------------------

    async def _deliver(
        self, session: aiohttp.ClientSession, url: str, row: _Row, claimed_at: float
    ) -> None:
        async with self._slots:
            # Never start a send that could outlive the lease: a peer may claim it then.
            late = time.monotonic() - claimed_at + self._timeout_s > self._lease_s
            outcome = (
                None if self._gone or late else await self._send(session, url, row)
            )
        try:
            if outcome is None:
                await self._execute(RELEASE_SQL, row.id, row.lease)
            else:
                await self._record(url, row, outcome)
        except Exception as exc:
            # The lease runs out and the row is sent again: at least once still holds.
            logger.warning(
                "could not record webhook %s (%s); it will be retried",
                row.webhook_id,
                _describe(exc),
            )

    async def _send(
        self, session: aiohttp.ClientSession, url: str, row: _Row
    ) -> _Outcome:
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": row.webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signing.sign(
                self._secret, row.webhook_id, timestamp, row.body
            ),
        }
        try:
            # No redirects: a 3xx is a failure, and we only ever talk to the configured URL.
            async with session.post(
                url, data=row.body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return _Outcome(status)
                error = f"HTTP {status} {response.reason or ''}".strip()
                return _Outcome(
                    status,
                    error[:MAX_ERROR_CHARS],
                    parse_retry_after(response.headers.get("Retry-After")),
                )
        except TimeoutError:
            return _Outcome(None, f"timed out after {self._timeout_s:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return _Outcome(None, _describe(exc))

    async def _record(self, url: str, row: _Row, outcome: _Outcome) -> None:
        status = outcome.status
        if status is not None and 200 <= status < 300:
            await self._execute(DELIVERED_SQL, row.id, status)
            logger.debug("webhook %s delivered (HTTP %d)", row.webhook_id, status)
            return
        if status == 410:
            self._gone = True
            await self._execute(GONE_SQL, row.id, row.lease, url, "410 Gone")
            logger.warning(
                "webhook endpoint %s answered 410 Gone: disabled, events stay in the outbox",
                _display_url(url),
            )
            return
        attempts = row.attempts + 1
        exhausted = attempts >= len(self._schedule_s)
        delay = 0.0 if exhausted else self._retry_delay(attempts, outcome.retry_after_s)
        await self._execute(
            RETRY_SQL, row.id, row.lease, status, outcome.error, delay, exhausted
        )
        if exhausted:
            logger.error(
                "webhook %s failed for good after %d attempts: %s",
                row.webhook_id,
                attempts,
                outcome.error,
            )
        else:
            logger.warning(
                "webhook %s attempt %d failed (%s); next in %.1f s",
                row.webhook_id,
                attempts,
                outcome.error,
                delay,
            )

    def _retry_delay(self, attempts: int, retry_after_s: float | None) -> float:
        # schedule_s[n] is the delay before attempt n+1; attempts already made = n.
        delay = self._schedule_s[attempts] * random.uniform(
            1 - self._jitter, 1 + self._jitter
        )
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
        return delay

    # -- PostgreSQL helpers --------------------------------------------------------

    async def _execute(self, sql: str, *args: object) -> None:
        async with self._pool.acquire(timeout=self._pg_timeout_s) as conn:
            await conn.execute(sql, *args, timeout=self._pg_timeout_s)

    async def _fetchval(self, sql: str, *args: object) -> Any:
        async with self._pool.acquire(timeout=self._pg_timeout_s) as conn:
            return await conn.fetchval(sql, *args, timeout=self._pg_timeout_s)
