"""Driver rows in PostgreSQL: creation, reads, status, batched location pings."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from dispatcher.errors import ConflictError, NotFoundError, StaleEpochError
from dispatcher.messages import Ping, PingVerdict
from dispatcher.rules import SPEED_CHECK_MIN_KM, LastFix, judge_fix
from dispatcher.store.pg import connection, haversine_sql

# Enough for every driver of a large fleet; past it the cache simply starts over.
TOKEN_CACHE_MAX = 200_000

# NOTIFY channel whose payload is the id of a driver whose activity may have changed.
DRIVER_CHANGED_CHANNEL = "dispatcher_driver_changed"

DRIVER_COLUMNS = """
    d.id, d.name, d.phone, d.vehicle_type, d.status, d.is_active, d.lat, d.lon,
    d.last_seen_at, d.zone_id, d.auto_accept,
    a.seller_order_id AS active_order, a.assignment_id AS active_assignment,
    a.status AS active_status
"""
DRIVER_FROM = """
    drivers d LEFT JOIN deliveries a
    ON a.driver_id = d.id AND a.status IN ('ASSIGNED', 'PICKED_UP')
"""


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class DriverRecord:
    """One driver as stored; `active_*` describe the active delivery, if any."""

    id: str
    name: str
    phone: str | None
    vehicle_type: str | None
    status: str
    is_active: bool
    lat: float | None
    lon: float | None
    last_seen_at: datetime | None
    zone_id: str | None
    auto_accept: bool
    active_order: str | None
    active_assignment: str | None
    active_status: str | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> DriverRecord:
        return cls(**{name: row[name] for name in cls.__slots__})


@dataclass(frozen=True, slots=True)
class MirrorEntry:
    """What the GEO mirror needs to know of one driver after a write."""

    driver_id: str
    zone_id: str | None
    lat: float | None
    lon: float | None
    seen_epoch_s: float | None
    dispatchable_status: (
        bool  # AVAILABLE, active, no open offer; freshness is checked separately
    )
    # recordedAt of the stored fix (µs): orders mirror writes, newest fix wins.
    fix_us: int | None = None


class DriverStore:
    """Every SQL statement about drivers; PostgreSQL is the truth."""

    def __init__(
        self, pool: asyncpg.Pool, *, ping_pool: asyncpg.Pool | None = None
    ) -> None:
        self.pool = pool
        # Pings may use a pool with synchronous_commit off (see actors/zone.py).
        self.ping_pool = ping_pool or pool
        # token hash -> driver id never changes (tokens are not reassigned), so it can
        # be cached; whether the driver is active is always read fresh.
        self._token_owner: dict[bytes, str] = {}

    async def create(
        self, name: str, phone: str | None, vehicle_type: str | None
    ) -> tuple[DriverRecord, str]:
        driver_id = "drv_" + uuid.uuid4().hex[:20]
        # The token names its driver so a mismatch is a clear 403, and carries
        # 256 random bits; only its hash is stored.
        token = f"{driver_id}.{secrets.token_urlsafe(32)}"
        async with connection(self.pool) as conn:
            await conn.execute(
                "INSERT INTO drivers (id, name, phone, vehicle_type, token_hash) VALUES ($1, $2, $3, $4, $5)",
                driver_id,
                name,
                phone,
                vehicle_type,
                hash_token(token),
            )
        record = await self.get(driver_id)
        assert record is not None
        return record, token

    async def get(self, driver_id: str) -> DriverRecord | None:
        async with connection(self.pool) as conn:
            row = await conn.fetchrow(
                f"SELECT {DRIVER_COLUMNS} FROM {DRIVER_FROM} WHERE d.id = $1", driver_id
            )
        return None if row is None else DriverRecord.from_row(row)

    async def list_drivers(
        self, status: str | None, zone_id: str | None, limit: int
    ) -> list[DriverRecord]:
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                f"""SELECT {DRIVER_COLUMNS} FROM {DRIVER_FROM}
                WHERE ($1::text IS NULL OR d.status = $1) AND ($2::text IS NULL OR d.zone_id = $2)
                ORDER BY d.id LIMIT $3""",
                status,
                zone_id,
                limit,
            )
        return [DriverRecord.from_row(r) for r in rows]

    async def token_owner(self, token: str) -> str | None:
        """The driver a bearer token names, or None."""
        digest = hash_token(token)
        owner = self._token_owner.get(digest)
        if owner is None:
            async with connection(self.pool) as conn:
                owner = await conn.fetchval(
                    "SELECT id FROM drivers WHERE token_hash = $1", digest
                )
            if owner is not None:
                if len(self._token_owner) >= TOKEN_CACHE_MAX:
                    self._token_owner.clear()
                self._token_owner[digest] = owner
        return owner

    async def last_fixes(self, driver_ids: Sequence[str]) -> dict[str, LastFix]:
        """Each known driver's activity and newest stored fix (the ping gate's cache)."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT id, is_active, lat, lon, location_recorded_at FROM drivers WHERE id = ANY($1::text[])",
                list(driver_ids),
            )
        return {r["id"]: _last_fix(r) for r in rows}

    async def is_active(self, driver_id: str) -> bool:
        return bool(await driver_active(self.pool, driver_id))

    async def update(
        self,
        driver_id: str,
        *,
        is_active: bool | None,
        name: str | None,
        auto_accept: bool | None = None,
    ) -> DriverRecord:
        async with connection(self.pool) as conn:
            # The NOTIFY (sent at commit) tells every ingress's ping gate to read the
            # driver again: a deactivation is refused at once on every replica.
            found = await conn.fetchval(
                """WITH changed AS (
                       UPDATE drivers SET is_active = coalesce($2, is_active), name = coalesce($3, name),
                           auto_accept = coalesce($5, auto_accept), updated_at = now() WHERE id = $1 RETURNING id
                   )
                   SELECT id FROM changed, pg_notify($4, id) AS notified""",
                driver_id,
                is_active,
                name,
                DRIVER_CHANGED_CHANNEL,
                auto_accept,
            )
        if found is None:
            raise NotFoundError(f"driver {driver_id} not found")
        record = await self.get(driver_id)
        assert record is not None
        return record

    async def set_status(self, driver_id: str, status: str) -> DriverRecord:
        """AVAILABLE or OFFLINE; a driver with an active delivery cannot change."""
        async with connection(self.pool) as conn, conn.transaction():
            current = await conn.fetchval(
                "SELECT status FROM drivers WHERE id = $1 FOR UPDATE", driver_id
            )
            if current is None:
                raise NotFoundError(f"driver {driver_id} not found")
            if current == "BUSY":
                raise ConflictError(
                    f"driver {driver_id} has an active delivery; finish it first"
                )
            await conn.execute(
                "UPDATE drivers SET status = $2, updated_at = now() WHERE id = $1",
                driver_id,
                status,
            )
        record = await self.get(driver_id)
        assert record is not None
        return record

    async def mirror_entries(self, driver_ids: Sequence[str]) -> list[MirrorEntry]:
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                f"SELECT {mirror_columns()} FROM drivers WHERE id = ANY($1::text[])",
                list(driver_ids),
            )
        return [_mirror_entry(r) for r in rows]

    async def zone_entries(self, zone_id: str) -> list[MirrorEntry]:
        """Every located driver of a zone, to rebuild a shard and its mirror."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                f"SELECT {mirror_columns()} FROM drivers WHERE zone_id = $1", zone_id
            )
        return [_mirror_entry(r) for r in rows]

    async def apply_pings(
        self, zone_id: str, epoch: int, pings: Sequence[Ping], max_speed_kmh: float
    ) -> tuple[list[PingVerdict], list[MirrorEntry]]:
        """Write a batch of fixes in ONE autocommit statement (one round trip).

        Returns a verdict per ping and the mirror entries of accepted drivers.
        Raises StaleEpochError when a newer incarnation owns the zone.
        """
        ids = [p.driver_id for p in pings]
        async with connection(self.ping_pool) as conn:
            rows = await conn.fetch(
                PING_SQL,
                ids,
                [p.lat for p in pings],
                [p.lon for p in pings],
                [p.recorded_at for p in pings],
                zone_id,
                max_speed_kmh,
                SPEED_CHECK_MIN_KM,
                epoch,
            )
            updated = {r["id"]: r for r in rows}
            missing = [i for i in ids if i not in updated]
            others = {}
            if missing:
                # The slow path (some fix refused): say why, and whether the fence did it.
                current = await conn.fetchval(
                    "SELECT epoch FROM zones WHERE zone_id = $1", zone_id
                )
                if current != epoch:
                    raise StaleEpochError(
                        f"zone {zone_id}: epoch {epoch} superseded by {current}"
                    )
                others = {
                    r["id"]: r
                    for r in await conn.fetch(
                        "SELECT id, is_active, lat, lon, location_recorded_at FROM drivers WHERE id = ANY($1::text[])",
                        missing,
                    )
                }
        verdicts = [_verdict(p, updated, others, max_speed_kmh) for p in pings]
        return verdicts, [_mirror_entry(r) for r in rows]


def mirror_columns(t: str = "drivers") -> str:
    """What the GEO mirror needs of a driver row aliased `t`."""
    return f"""
    {t}.id, {t}.zone_id, {t}.lat, {t}.lon, extract(epoch FROM {t}.last_seen_at)::float8 AS seen,
    floor(extract(epoch FROM {t}.location_recorded_at) * 1000000)::bigint AS fix_us,
    ({t}.status = 'AVAILABLE' AND {t}.is_active AND {t}.open_offer_id IS NULL) AS dispatchable_status
"""


# One statement for the whole batch. The `locked` CTE takes the rows in id order (two
# batches sharing drivers cannot deadlock) and every condition reads `d`, which
# PostgreSQL re-checks against the newest row version after waiting for a lock: a fix
# written concurrently by another zone's actor can never be overwritten by an older one.
PING_SQL = f"""
WITH fence AS (
    -- The zone row held shared for the statement: an activation cannot interleave,
    -- and a stale incarnation ($8 superseded) locks and updates nothing.
    SELECT epoch FROM zones WHERE zone_id = $5 FOR SHARE
), input AS (
    SELECT * FROM unnest($1::text[], $2::float8[], $3::float8[], $4::timestamptz[])
        AS t(id, lat, lon, rec)
), locked AS (
    SELECT d.id FROM drivers d JOIN input i ON i.id = d.id
    WHERE (SELECT epoch FROM fence) = $8
    ORDER BY d.id FOR UPDATE OF d
)
UPDATE drivers d
SET lat = i.lat, lon = i.lon, location_recorded_at = i.rec,
    last_seen_at = least(i.rec, now()), zone_id = $5, updated_at = now()
FROM input i, locked l
WHERE d.id = i.id AND l.id = i.id AND d.is_active
  AND (d.location_recorded_at IS NULL OR d.location_recorded_at < i.rec)
  AND (
    d.lat IS NULL
    OR {haversine_sql("d.lat", "d.lon", "i.lat", "i.lon")}
       <= greatest($7, $6 * extract(epoch FROM i.rec - d.location_recorded_at) / 3600.0)
  )
RETURNING {mirror_columns("d")}
"""


def _mirror_entry(row: asyncpg.Record) -> MirrorEntry:
    return MirrorEntry(
        driver_id=row["id"],
        zone_id=row["zone_id"],
        lat=row["lat"],
        lon=row["lon"],
        seen_epoch_s=row["seen"],
        dispatchable_status=row["dispatchable_status"],
        fix_us=row["fix_us"],
    )


def _verdict(
    ping: Ping,
    updated: dict[str, asyncpg.Record],
    others: dict[str, Any],
    max_speed_kmh: float,
) -> PingVerdict:
    if ping.driver_id in updated:
        return PingVerdict.ACCEPTED
    row = others.get(ping.driver_id)
    verdict = judge_fix(None if row is None else _last_fix(row), ping, max_speed_kmh)
    # ACCEPTED here means it lost a race with a newer fix written between the two statements.
    return PingVerdict.STALE if verdict is PingVerdict.ACCEPTED else verdict


def _last_fix(row: asyncpg.Record) -> LastFix:
    return LastFix(
        row["is_active"], row["lat"], row["lon"], row["location_recorded_at"]
    )


async def driver_active(pool: asyncpg.Pool, driver_id: str) -> bool | None:
    """Whether the driver is active; None when there is no such driver."""
    async with connection(pool) as conn:
        active: bool | None = await conn.fetchval(
            "SELECT is_active FROM drivers WHERE id = $1", driver_id
        )
    return active
