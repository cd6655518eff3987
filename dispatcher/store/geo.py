"""Redis GEO mirror of dispatchable drivers: bounded-time calls, circuit breaker, rebuild."""

# Pipeline methods are typed as awaitables but only queue commands; execute() runs them.
# mypy: disable-error-code="unused-awaitable"

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from dispatcher.rules import is_dispatchable
from dispatcher.store import keys
from dispatcher.store.drivers import MirrorEntry

log = logging.getLogger(__name__)

# After a failure, skip Redis this long before probing again, so an outage costs
# one timeout per breaker period instead of one per request.
BREAKER_OPEN_S = 1.0

# Quantised GEO coordinates (52-bit geohash) are off by well under a metre: widen the
# Redis radius by this much so PostgreSQL's exact check sees every true candidate.
RADIUS_SLACK_KM = 0.005


# Drivers' mirror writes, each atomic in Redis and ordered by the fix's recordedAt: an
# older fix never overwrites a newer one, and a driver lives in the keys of one zone
# only (the zone Redis last saw it in), whichever zone actor's write lands last.
# Many drivers per call: one script call per chunk costs far less (in the actor and in
# Redis) than one command per driver, and a chunk keeps each call short.
# It names keys it computes (one Redis, not a cluster: documented in ARCHITECTURE).
# ARGV: one per driver, "fix_us dispatchable(1/0) lon lat seen zone id" (space-separated,
# the id last so it may hold anything): one argument instead of seven, because encoding
# each argument was the zone actor's largest cost per fix (redis-py packs in Python).
UPSERT_LUA = f"""
local applied = 0
for i = 1, #ARGV do
  local fix_s, on, lon, lat, seen, zone, id =
    string.match(ARGV[i], '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (.+)$')
  local fix = tonumber(fix_s)
  local seen_fix = redis.call('HGET', '{keys.DRIVER_FIX}', id)
  if not (seen_fix and tonumber(seen_fix) > fix) then
    local old = redis.call('HGET', '{keys.DRIVER_ZONE}', id)
    if old and old ~= zone then
      redis.call('ZREM', '{keys.ZONE_KEY_PREFIX}' .. old .. ':geo', id)
      redis.call('ZREM', '{keys.ZONE_KEY_PREFIX}' .. old .. ':seen', id)
    end
    redis.call('HSET', '{keys.DRIVER_FIX}', id, fix_s)
    redis.call('HSET', '{keys.DRIVER_ZONE}', id, zone)
    local geo = '{keys.ZONE_KEY_PREFIX}' .. zone .. ':geo'
    local seen_key = '{keys.ZONE_KEY_PREFIX}' .. zone .. ':seen'
    if on == '1' then
      redis.call('GEOADD', geo, lon, lat, id)
      redis.call('ZADD', seen_key, seen, id)
    else
      redis.call('ZREM', geo, id)
      redis.call('ZREM', seen_key, id)
    end
    applied = applied + 1
  end
end
return applied
"""
# Drivers per upsert call: a few milliseconds of Redis time at most.
UPSERT_CHUNK = 500
# Fix versions read per HMGET: one short call each.
FIX_READ_CHUNK = 5000


# The nearest members of several zones' GEO keys, searching small circles first, in one
# round trip: in a dense centre a 0.1 km circle holds a few dozen drivers where a 5 km one
# holds thousands, and GEOSEARCH costs the members it looks at. The first circle that
# finds anyone holds the nearest driver of the whole radius.
# KEYS: built markers that must exist, then the zones' GEO keys.
# ARGV: number of markers, lon, lat, count, then the radii in km, ascending.
# Returns nil if a marker is missing, else up to `count` ids, nearest first.
NEAREST_LUA = """
local markers = tonumber(ARGV[1])
for i = 1, markers do
  if redis.call('EXISTS', KEYS[i]) == 0 then return false end
end
local lon, lat, count = ARGV[2], ARGV[3], tonumber(ARGV[4])
for r = 5, #ARGV do
  local found = {}
  for k = markers + 1, #KEYS do
    local hits = redis.call('GEOSEARCH', KEYS[k], 'FROMLONLAT', lon, lat,
                            'BYRADIUS', ARGV[r], 'km', 'ASC', 'COUNT', count, 'WITHDIST')
    for _, hit in ipairs(hits) do
      found[#found + 1] = {tonumber(hit[2]), hit[1]}
    end
  end
  if #found > 0 then
    table.sort(found, function(a, b) return a[1] < b[1] end)
    local ids = {}
    for i = 1, math.min(count, #found) do ids[i] = found[i][2] end
    return ids
  end
end
return {}
"""


@dataclass(frozen=True, slots=True)
class NearestQuery:
    """One widening lookup: zones to search, the point, ascending radii (km), how many."""

    zones: tuple[str, ...]
    lat: float
    lon: float
    radii_km: tuple[float, ...]
    count: int
    must_be_built: tuple[str, ...] = ()


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

    async def _run_scripted(
        self,
        build: Callable[[aioredis.client.Pipeline], None],
        *,
        transaction: bool,
        script: str = UPSERT_LUA,
    ) -> list[object]:
        """Run a pipeline that calls `script` by its SHA.

        EVALSHA avoids the SCRIPT EXISTS round trip redis-py adds to every pipeline that
        carries a Script object; a Redis that restarted has no script, so on NOSCRIPT
        it is loaded once and the (idempotent) pipeline runs again.
        """
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=transaction)
            build(pipe)
            try:
                return await self._run(pipe)
            except NoScriptError:
                if attempt == 2:
                    raise MirrorUnavailableError(
                        "cannot load the mirror script"
                    ) from None
                loader = self.client.pipeline(transaction=False)
                loader.script_load(script)
                await self._run(loader)
        raise AssertionError("unreachable")

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

    async def aclose(self) -> None:
        """Close the client. redis-py bounds closing a socket by the connect timeout and
        raises TimeoutError past it, which a process starved of CPU can hit: the sockets
        are dropped all the same, and a zone handing over must not fail on it."""
        try:
            await self.client.aclose()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("Redis client closed uncleanly: %s", exc)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        self._open_until = 0.0
        return True

    async def nearest_widening(
        self,
        zones: Sequence[str],
        lat: float,
        lon: float,
        radii_km: Sequence[float],
        count: int,
        *,
        must_be_built: Sequence[str] = (),
    ) -> list[str]:
        """Up to `count` driver ids nearest to the point, from the first of `radii_km`
        (ascending) whose circle holds anyone, over several zones' keys; one round trip.

        Raises MirrorUnavailableError when a zone of `must_be_built` has no built
        marker (Redis lost it and it is not rebuilt yet).
        """
        query = NearestQuery(
            tuple(zones), lat, lon, tuple(radii_km), count, tuple(must_be_built)
        )
        (found,) = await self.nearest_widening_many([query])
        if found is None:
            raise MirrorUnavailableError("a zone's mirror is not rebuilt yet")
        return found

    async def nearest_widening_many(
        self, queries: Sequence[NearestQuery]
    ) -> list[list[str] | None]:
        """`nearest_widening` for several points in one round trip; None for a point
        whose zones' mirror is not rebuilt yet."""

        def build(pipe: aioredis.client.Pipeline) -> None:
            for q in queries:
                markers = [keys.zone_built(z) for z in q.must_be_built]
                geo_keys = [keys.zone_geo(z) for z in q.zones]
                radii = [r + RADIUS_SLACK_KM for r in q.radii_km]
                pipe.evalsha(
                    NEAREST_SHA,
                    len(markers) + len(geo_keys),
                    *markers,
                    *geo_keys,
                    len(markers),
                    q.lon,
                    q.lat,
                    q.count,
                    *radii,
                )

        results = await self._run_scripted(build, transaction=False, script=NEAREST_LUA)
        return [
            None if r is None else [_text(m) for m in cast(list[object], r)]
            for r in results
        ]

    async def apply(
        self, entries: Iterable[MirrorEntry], now_s: float, ttl_s: float
    ) -> None:
        """Make the mirror agree with freshly written PostgreSQL rows."""
        args = _upsert_args(entries, now_s, ttl_s)

        def build(pipe: aioredis.client.Pipeline) -> None:
            for start in range(0, len(args), UPSERT_CHUNK):
                pipe.evalsha(UPSERT_SHA, 0, *args[start : start + UPSERT_CHUNK])

        if args:
            await self._run_scripted(build, transaction=False)

    async def forget(self, zone_id: str, driver_ids: Sequence[str]) -> None:
        await self.forget_many({zone_id: driver_ids})

    async def forget_many(self, by_zone: Mapping[str, Sequence[str]]) -> None:
        """Remove drivers from their zones' keys, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for zone_id, driver_ids in by_zone.items():
            if driver_ids:
                pipe.zrem(keys.zone_geo(zone_id), *driver_ids)
                pipe.zrem(keys.zone_seen(zone_id), *driver_ids)
        if len(pipe):
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

    async def rebuild(
        self, zone_id: str, entries: Iterable[MirrorEntry], now_s: float, ttl_s: float
    ) -> None:
        """Make the zone's keys equal what PostgreSQL holds, then mark the zone built.

        In chunks, each its own short call, so a zone of 50,000 drivers neither blocks
        Redis nor outlasts the per-call timeout (one MULTI of it took 1.7 s here). The
        keys are never emptied on the way: a lookup meanwhile may see a member that is
        about to go, which PostgreSQL then refuses, as with any stale member. Callers hold
        the zone exclusively, so no ping of this zone writes its keys meanwhile.
        """
        batch = [e for e in entries if e.zone_id == zone_id]
        await self._upsert_in_chunks(batch, now_s, ttl_s)
        wanted = {e.driver_id for e in batch if is_dispatchable(e, now_s, ttl_s)}
        await self._forget_in_chunks(zone_id, (await self._held(zone_id))[0] - wanted)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(keys.zone_built(zone_id), str(now_s))
        await self._run(pipe)

    async def repair(
        self, zone_id: str, entries: Iterable[MirrorEntry], now_s: float, ttl_s: float
    ) -> int:
        """Rewrite only what differs from PostgreSQL; returns how many drivers it fixed.

        A driver is right in Redis when it is in both of the zone's keys and its mirrored
        fix version (`driver:fix`) is PostgreSQL's: position and heartbeat are written
        with that version by the same script. Reading ids and versions costs far less
        than rewriting every driver (a full rebuild of 39,000 drivers took ~1.4 s of
        CPU each reconcile interval). Callers hold the zone exclusively.
        """
        batch = [e for e in entries if e.zone_id == zone_id]
        wanted = {e.driver_id: e for e in batch if is_dispatchable(e, now_s, ttl_s)}
        held, complete = await self._held(zone_id)
        versions = await self._fix_versions(list(wanted))
        stale = [
            e
            for e in wanted.values()
            if e.driver_id not in complete or versions.get(e.driver_id) != e.fix_us
        ]
        extra = held - set(wanted)
        await self._upsert_in_chunks(stale, now_s, ttl_s)
        await self._forget_in_chunks(zone_id, extra)
        return len(stale) + len(extra)

    async def _upsert_in_chunks(
        self, entries: Sequence[MirrorEntry], now_s: float, ttl_s: float
    ) -> None:
        for start in range(0, len(entries), UPSERT_CHUNK):
            await self.apply(entries[start : start + UPSERT_CHUNK], now_s, ttl_s)

    async def _forget_in_chunks(self, zone_id: str, driver_ids: Iterable[str]) -> None:
        ids = sorted(driver_ids)
        for start in range(0, len(ids), UPSERT_CHUNK):
            await self.forget(zone_id, ids[start : start + UPSERT_CHUNK])

    async def _held(self, zone_id: str) -> tuple[set[str], set[str]]:
        """Ids in either of the zone's keys, and ids in both."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrange(keys.zone_geo(zone_id), 0, -1)
        pipe.zrange(keys.zone_seen(zone_id), 0, -1)
        geo, seen = await self._run(pipe)
        assert isinstance(geo, list) and isinstance(seen, list)
        in_geo, in_seen = {_text(m) for m in geo}, {_text(m) for m in seen}
        return in_geo | in_seen, in_geo & in_seen

    async def _fix_versions(self, driver_ids: Sequence[str]) -> dict[str, int]:
        """driver id -> its mirrored fix version, for those Redis has one for."""
        out: dict[str, int] = {}
        for start in range(0, len(driver_ids), FIX_READ_CHUNK):
            chunk = driver_ids[start : start + FIX_READ_CHUNK]
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(keys.DRIVER_FIX, chunk)
            (values,) = await self._run(pipe)
            assert isinstance(values, list)
            out.update(
                (d, int(v)) for d, v in zip(chunk, values, strict=True) if v is not None
            )
        return out


UPSERT_SHA = hashlib.sha1(UPSERT_LUA.encode()).hexdigest()
NEAREST_SHA = hashlib.sha1(NEAREST_LUA.encode()).hexdigest()


def _upsert_args(
    entries: Iterable[MirrorEntry], now_s: float, ttl_s: float
) -> list[str]:
    """UPSERT_LUA's arguments, one per located driver (one never located has nothing to mirror)."""
    return [
        f"{e.fix_us} {1 if is_dispatchable(e, now_s, ttl_s) else 0} {e.lon!r} {e.lat!r} "
        f"{e.seen_epoch_s or 0.0!r} {e.zone_id} {e.driver_id}"
        for e in entries
        if e.zone_id is not None
        and e.fix_us is not None
        and e.lat is not None
        and e.lon is not None
    ]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
