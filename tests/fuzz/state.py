"""Snapshots of PostgreSQL and Redis, to prove that hostile requests wrote nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import ClientResponse
from redis.asyncio import Redis

from tests.support import CORE_TABLES, PROBLEM_JSON, WebhookReceiver


@dataclass(frozen=True)
class State:
    """Every row of every table, and every Redis key with its content."""

    rows: dict[str, list[tuple[Any, ...]]]
    redis: dict[str, Any]

    def diff(self, other: State) -> list[str]:
        changed = [
            f"table {t}: {self.rows[t]!r:.300} -> {other.rows[t]!r:.300}"
            for t in CORE_TABLES
            if self.rows[t] != other.rows[t]
        ]
        keys = set(self.redis) | set(other.redis)
        changed += [
            f"redis {k}: {self.redis.get(k)!r:.200} -> {other.redis.get(k)!r:.200}"
            for k in sorted(keys)
            if self.redis.get(k) != other.redis.get(k)
        ]
        return changed


async def _redis_value(redis: Redis, key: bytes) -> Any:
    found = await redis.type(key)
    kind = found.decode() if isinstance(found, bytes) else found
    if key.endswith(b":built"):
        return kind  # rewritten by every rebuild; only its presence matters
    if kind == "zset":
        return await redis.zrange(key, 0, -1, withscores=True)
    if kind == "hash":
        return sorted((await redis.hgetall(key)).items())
    if kind == "string":
        return await redis.get(key)
    return kind


async def snapshot(pool: asyncpg.Pool, redis: Redis) -> State:
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with pool.acquire() as conn:
        for table in CORE_TABLES:
            records = await conn.fetch(f"SELECT * FROM {table}")
            rows[table] = sorted((tuple(r.values()) for r in records), key=repr)
    content: dict[str, Any] = {}
    async for key in redis.scan_iter(match=b"*"):
        raw = key if isinstance(key, bytes) else key.encode()
        content[raw.decode()] = await _redis_value(redis, raw)
    return State(rows, content)


async def settled(
    pool: asyncpg.Pool, receiver: WebhookReceiver, timeout_s: float = 10.0
) -> None:
    """Wait until every outbox row is delivered: the sender then leaves the tables alone."""
    deadline = time.monotonic() + timeout_s
    while await pool.fetchval(
        "SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL"
    ):
        assert time.monotonic() < deadline, (
            f"webhooks not delivered: {len(receiver.received)} received"
        )
        await asyncio.sleep(0.05)


async def assert_unchanged(before: State, pool: asyncpg.Pool, redis: Redis) -> None:
    after = await snapshot(pool, redis)
    changes = before.diff(after)
    assert changes == [], "hostile requests changed stored state:\n" + "\n".join(
        changes
    )


async def problem(
    resp: ClientResponse, statuses: Iterable[int] | None = None
) -> dict[str, Any]:
    """The RFC 9457 body of a 4xx answer (of one of `statuses`, if given)."""
    text = await resp.text()
    allowed = set(statuses) if statuses is not None else set(range(400, 500))
    assert resp.status in allowed, f"{resp.status} {text[:300]}"
    content_type = resp.headers.get("Content-Type", "")
    assert content_type.startswith(PROBLEM_JSON), (
        f"{resp.status} {content_type}: {text[:300]}"
    )
    body: dict[str, Any] = json.loads(text)
    assert body["status"] == resp.status
    for key in ("type", "title", "detail"):
        assert isinstance(body[key], str) and body[key], body
    return body
