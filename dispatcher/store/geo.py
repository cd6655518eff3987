"""Redis GEO mirror of dispatchable drivers: bounded-time calls, circuit breaker, rebuild."""

# Pipeline methods are typed as awaitables but only queue commands; execute() runs them.
# mypy: disable-error-code="unused-awaitable"

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from dispatcher.store import keys
from dispatcher.store.drivers import MirrorEntry

log = logging.getLogger(__name__)

# After a failure, skip Redis this long before probing again, so an outage costs
# one timeout per breaker period instead of one per request.
BREAKER_OPEN_S = 1.0

# Quantised GEO coordinates (52-bit geohash) are off by well under a metre: widen the
# Redis radius by this much so PostgreSQL's exact check sees every true candidate.
RADIUS_SLACK_KM = 0.005


# One driver's mirror write, atomic in Redis and ordered by the fix's recordedAt: an
# older fix never overwrites a newer one, and a driver lives in the keys of one zone
# only (the zone Redis last saw it in), whichever zone actor's write lands last.
# It names keys it computes (one Redis, not a cluster: documented in ARCHITECTURE).
# ARGV: id, zone, lon, lat, seen, fix_us, dispatchable (1/0).
UPSERT_LUA = f"""
local id, zone = ARGV[1], ARGV[2]
local fix = tonumber(ARGV[6])
local seen_fix = redis.call('HGET', '{keys.DRIVER_FIX}', id)
if seen_fix and tonumber(seen_fix) > fix then return 0 end
local old = redis.call('HGET', '{keys.DRIVER_ZONE}', id)
if old and old ~= zone then
  redis.call('ZREM', '{keys.ZONE_KEY_PREFIX}' .. old .. ':geo', id)
  redis.call('ZREM', '{keys.ZONE_KEY_PREFIX}' .. old .. ':seen', id)
end
redis.call('HSET', '{keys.DRIVER_FIX}', id, ARGV[6])
redis.call('HSET', '{keys.DRIVER_ZONE}', id, zone)
local geo = '{keys.ZONE_KEY_PREFIX}' .. zone .. ':geo'
local seen = '{keys.ZONE_KEY_PREFIX}' .. zone .. ':seen'
if ARGV[7] == '1' then
  redis.call('GEOADD', geo, ARGV[3], ARGV[4], id)
  redis.call('ZADD', seen, ARGV[5], id)
else
  redis.call('ZREM', geo, id)
  redis.call('ZREM', seen, id)
end
return 1
"""


class MirrorUnavailableError(Exception):
    """Redis did not answer in time; callers fall back to PostgreSQL."""


def connect_redis(url: str, timeout_s: float) -> aioredis.Redis:
    """A client whose every call is bounded and not silently retried."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
    )


class GeoMirror:
    """Per-zone GEO sets plus heartbeat sorted sets.

    Guarantee: every method returns or raises MirrorUnavailableError within
    `timeout_s`; none is needed for correctness, since PostgreSQL decides.
    """

    def __init__(self, client: aioredis.Redis, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self._open_until = 0.0

    async def _run_scripted(self, build: Callable[[aioredis.client.Pipeline], None], *, transaction: bool) -> None:
        """Run a pipeline that calls UPSERT_LUA by its SHA.

        EVALSHA avoids the SCRIPT EXISTS round trip redis-py adds to every pipeline that
        carries a Script object; a Redis that restarted has no script, so on NOSCRIPT
        it is loaded once and the (idempotent) pipeline runs again.
        """
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=transaction)
            build(pipe)
            try:
                await self._run(pipe)
                return
            except NoScriptError:
                if attempt == 2:
                    raise MirrorUnavailableError("cannot load the mirror script") from None
                loader = self.client.pipeline(transaction=False)
                loader.script_load(UPSERT_LUA)
                await self._run(loader)

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._open_until

    async def _run(self, pipe: aioredis.client.Pipeline) -> list[object]:
        if not self.healthy:
            raise MirrorUnavailableError("circuit open after a recent Redis failure")
        try:
            async with asyncio.timeout(self.timeout_s):
                result: list[object] = await pipe.execute()
        except NoScriptError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            self._open_until = time.monotonic() + BREAKER_OPEN_S
            log.warning("Redis unavailable (%s); using PostgreSQL", type(exc).__name__)
            raise MirrorUnavailableError(str(exc) or type(exc).__name__) from exc
        return result

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        self._open_until = 0.0
        return True

    async def nearest(
        self,
        zones: Sequence[str],
        lat: float,
        lon: float,
        radius_km: float,
        count: int,
        *,
        must_be_built: Sequence[str] = (),
    ) -> list[str]:
        """Up to `count` driver ids nearest to the point over several zones' keys.

        Raises MirrorUnavailableError when a zone of `must_be_built` has no built
        marker (Redis lost it and it is not rebuilt yet).
        """
        pipe = self.client.pipeline(transaction=False)
        for zone in must_be_built:
            pipe.exists(keys.zone_built(zone))
        for zone in zones:
            pipe.geosearch(
                keys.zone_geo(zone), longitude=lon, latitude=lat,
                radius=radius_km + RADIUS_SLACK_KM, unit="km",
                sort="ASC", count=count, withdist=True,
            )
        results = await self._run(pipe)
        built, searches = results[: len(must_be_built)], results[len(must_be_built) :]
        if not all(built):
            raise MirrorUnavailableError("a zone's mirror is not rebuilt yet")
        found: list[tuple[float, str]] = []
        for result in searches:
            assert isinstance(result, list)
            found.extend((float(dist), _text(member)) for member, dist in result)
        found.sort()
        return [member for _, member in found[:count]]

    async def apply(self, entries: Iterable[MirrorEntry], now_s: float, ttl_s: float) -> None:
        """Make the mirror agree with freshly written PostgreSQL rows."""
        batch = list(entries)

        def build(pipe: aioredis.client.Pipeline) -> None:
            for entry in batch:
                _stage(pipe, entry, now_s, ttl_s)

        await self._run_scripted(build, transaction=False)

    async def forget(self, zone_id: str, driver_ids: Sequence[str]) -> None:
        if not driver_ids:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(keys.zone_geo(zone_id), *driver_ids)
        pipe.zrem(keys.zone_seen(zone_id), *driver_ids)
        await self._run(pipe)

    async def expire(self, zone_id: str, cutoff_s: float) -> list[str]:
        """Drop members whose heartbeat is older than `cutoff_s`; returns their ids."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrangebyscore(keys.zone_seen(zone_id), "-inf", f"({cutoff_s}")
        (stale,) = await self._run(pipe)
        assert isinstance(stale, list)
        ids = [_text(m) for m in stale]
        await self.forget(zone_id, ids)
        return ids

    async def is_built(self, zone_id: str) -> bool:
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(keys.zone_built(zone_id))
        (exists,) = await self._run(pipe)
        return bool(exists)

    async def rebuild(self, zone_id: str, entries: Iterable[MirrorEntry], now_s: float, ttl_s: float) -> None:
        """Replace the zone's mirror atomically (MULTI) with what PostgreSQL holds."""
        batch = [e for e in entries if e.zone_id == zone_id]

        def build(pipe: aioredis.client.Pipeline) -> None:
            pipe.delete(keys.zone_geo(zone_id), keys.zone_seen(zone_id))
            for entry in batch:
                _stage(pipe, entry, now_s, ttl_s)
            pipe.set(keys.zone_built(zone_id), str(now_s))

        await self._run_scripted(build, transaction=True)

    async def members(self, zone_id: str) -> set[str]:
        pipe = self.client.pipeline(transaction=False)
        pipe.zrange(keys.zone_geo(zone_id), 0, -1)
        (found,) = await self._run(pipe)
        assert isinstance(found, list)
        return {_text(m) for m in found}


def is_dispatchable(entry: MirrorEntry, now_s: float, ttl_s: float) -> bool:
    """Invariant 3: in the mirror iff AVAILABLE and active, located, heartbeat fresh."""
    return (
        entry.dispatchable_status
        and entry.lat is not None
        and entry.lon is not None
        and entry.seen_epoch_s is not None
        and entry.seen_epoch_s > now_s - ttl_s
    )


UPSERT_SHA = hashlib.sha1(UPSERT_LUA.encode()).hexdigest()


def _stage(pipe: aioredis.client.Pipeline, entry: MirrorEntry, now_s: float, ttl_s: float) -> None:
    """Queue one driver's upsert on the pipeline."""
    if entry.zone_id is None or entry.fix_us is None or entry.lat is None or entry.lon is None:
        return  # never located: nothing to mirror
    pipe.evalsha(
        UPSERT_SHA, 0, entry.driver_id, entry.zone_id, entry.lon, entry.lat,
        entry.seen_epoch_s or 0.0, entry.fix_us, 1 if is_dispatchable(entry, now_s, ttl_s) else 0,
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
