"""ZoneCore: one zone's shard, assignment and mirror upkeep; plain asyncio, no Ray."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from dispatcher.actors.offerdesk import OfferDesk
from dispatcher.actors.zonelock import ZoneLock
from dispatcher.config import ResolvedSettings
from dispatcher.errors import DispatchError, StaleEpochError
from dispatcher.messages import (
    AssignRequest,
    AssignResult,
    LookupPath,
    Ping,
    PingVerdict,
    ZoneStats,
)
from dispatcher.models import assigned_body, unassigned_body
from dispatcher.rules import is_dispatchable, replay, search_steps
from dispatcher.store.deliveries import (
    Booking,
    DeliveryStore,
    DriverTakenError,
    OrderExistsError,
)
from dispatcher.store.drivers import DriverStore, MirrorEntry
from dispatcher.store.geo import (
    GeoMirror,
    MirrorUnavailableError,
    NearestQuery,
)
from dispatcher.store.offers import Changes, Fence, OfferStore, PickRule
from dispatcher.store.pg import activate_zone, known_zones
from dispatcher.zoning import Zoning

log = logging.getLogger(__name__)

# Redis narrows the search to this many nearest mirror members; PostgreSQL then picks
# the nearest dispatchable one among them with exact distances.
CANDIDATES = 8
# Each retry follows a refusal by the one-active-delivery index, which means bad data.
MAX_TAKEN_RETRIES = 3


class ZoneCore:
    """Serializes assignment and mirror upkeep of one zone; ping batches run side by side.

    Guarantees: PostgreSQL is written before the mirror; a mirror failure never fails
    a request (the zone is marked dirty and rebuilt by the sweeper); every write
    transaction checks this incarnation's epoch, so a stale one cannot commit.
    """

    def __init__(
        self,
        zone_id: str,
        settings: ResolvedSettings,
        *,
        drivers: DriverStore,
        deliveries: DeliveryStore,
        mirror: GeoMirror,
        zoning: Zoning,
        clock: Callable[[], float] = time.time,
        offers: OfferStore | None = None,
    ) -> None:
        self.zone_id = zone_id
        self.settings = settings
        self.drivers = drivers
        self.deliveries = deliveries
        self.mirror = mirror
        self.zoning = zoning
        self.clock = clock
        self.epoch = 0
        self.shard: dict[str, MirrorEntry] = {}
        self._lock = ZoneLock()
        self._mirror_dirty = True
        self._last_reconcile = 0.0
        self._sweeper: asyncio.Task[None] | None = None
        # Set once a newer incarnation took the zone: this one must not act again.
        self.fenced = False
        # Zones PostgreSQL knew at the last reconcile: their mirrors must be built.
        self.known_zones: set[str] = set()
        # Cascade and wave: orders become dispatches whose offers wait for an accept.
        self._wakeups: set[asyncio.Task[None]] = set()
        self.desk: OfferDesk | None = None
        if settings.offer_mode != "auto":
            self.desk = OfferDesk(
                settings.offer_rules(),
                offers or OfferStore(deliveries.pool, render=assigned_body),
                PickRule(settings.search_radius_km, settings.heartbeat_ttl_s),
                fence=lambda: Fence(self.zone_id, self.epoch),
                follow=self._follow,
                wake=self._wake_dispatch,
            )

    # ---- lifetime -----------------------------------------------------------------

    async def start(self) -> None:
        """Take the zone (new epoch), rebuild the shard and the mirror from PostgreSQL."""
        async with self._lock.exclusive():
            self.epoch = await activate_zone(self.drivers.pool, self.zone_id)
            await self._reconcile()
            if self.desk is not None:
                # Timers live in memory: a new incarnation rebuilds them from PostgreSQL.
                rebuilt = await self.desk.rebuild(self.zone_id)
                if rebuilt:
                    log.info(
                        "zone %s resumed %d open dispatches", self.zone_id, rebuilt
                    )
        self._sweeper = asyncio.create_task(
            self._sweep_forever(), name=f"sweep:{self.zone_id}"
        )
        log.info(
            "zone %s active at epoch %d with %d drivers",
            self.zone_id,
            self.epoch,
            len(self.shard),
        )

    async def drain(self) -> None:
        """Hand the zone over: let the calls in flight finish, then refuse every new one
        (callers get StaleEpochError and retry on the next incarnation)."""
        async with self._lock.exclusive():
            self.fenced = True
        await self.stop()
        log.info("zone %s epoch %d drained for a handoff", self.zone_id, self.epoch)

    async def stop(self) -> None:
        if self.desk is not None:
            self.desk.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    # ---- pings --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self, *, shared: bool = False) -> AsyncIterator[None]:
        """The zone lock (shared for pings); a fencing failure retires this
        incarnation for good."""
        async with self._lock.shared() if shared else self._lock.exclusive():
            if self.fenced:
                raise StaleEpochError(
                    f"zone {self.zone_id}: this incarnation was fenced"
                )
            try:
                yield
            except StaleEpochError:
                self.fenced = True
                log.warning(
                    "zone %s epoch %d fenced by a newer incarnation",
                    self.zone_id,
                    self.epoch,
                )
                raise

    async def apply_pings(self, pings: Sequence[Ping]) -> list[PingVerdict]:
        """Each fix gets the verdict it would get if fixes came one at a time in
        recordedAt order: a driver's several fixes in one batch go in rounds."""
        verdicts: dict[int, PingVerdict] = {}
        async with self._exclusive(shared=True):
            for round_ in _rounds(pings):
                found, entries = await self.drivers.apply_pings(
                    self.zone_id,
                    self.epoch,
                    [pings[i] for i in round_],
                    self.settings.max_ping_speed_kmh,
                )
                verdicts.update(zip(round_, found, strict=True))
                for entry in entries:
                    # Concurrent batches may finish out of order: keep the newest fix.
                    known = self.shard.get(entry.driver_id)
                    if known is None or (known.fix_us or 0) <= (entry.fix_us or 0):
                        self.shard[entry.driver_id] = entry
                await self._mirror_write(entries)
        return [verdicts[i] for i in range(len(pings))]

    async def _mirror_write(self, entries: list[MirrorEntry]) -> None:
        try:
            await self.mirror.apply(
                entries, self.clock(), self.settings.heartbeat_ttl_s
            )
        except MirrorUnavailableError:
            self._mirror_dirty = True

    # ---- assignment ---------------------------------------------------------------

    async def assign(self, req: AssignRequest) -> AssignResult:
        return (await self.assign_many([req]))[0]

    async def assign_many(self, reqs: Sequence[AssignRequest]) -> list[AssignResult]:
        """Book several orders in turn under one lock, with one mirror round trip for
        their lookups and one transaction (one commit) for their bookings."""
        async with self._exclusive():
            if self.desk is not None:
                return [await self._offer_locked(self.desk, req) for req in reqs]
            if len(reqs) > 1:
                try:
                    return await self._assign_together(reqs)
                except (OrderExistsError, DriverTakenError):
                    # A retry among them, or bad data: all rolled back, so each order
                    # goes alone and gets its own answer (replay, conflict, skip).
                    pass
            return [await self._assign_locked(req) for req in reqs]

    async def _offer_locked(self, desk: OfferDesk, req: AssignRequest) -> AssignResult:
        """Cascade and wave: the order's dispatch starts (or is answered as it stands)."""
        result = await desk.open(req)
        # None: nobody could be offered, or a driver holds the order already.
        return await self._unassigned(req) if result is None else result

    async def advance_dispatch(self, seller_order_id: str) -> None:
        """Look at one dispatch now (an answer came in, or its timer fired)."""
        if self.desk is None:
            return
        async with self._exclusive():
            await self.desk.advance(seller_order_id)

    def _wake_dispatch(self, seller_order_id: str) -> None:
        task = asyncio.get_running_loop().create_task(
            self._woken(seller_order_id), name=f"offer:{seller_order_id}"
        )
        # The loop keeps only weak references to tasks: hold it until it is done.
        self._wakeups.add(task)
        task.add_done_callback(self._wakeups.discard)

    async def _woken(self, seller_order_id: str) -> None:
        try:
            await self.advance_dispatch(seller_order_id)
        except StaleEpochError:
            if self.desk is not None:
                self.desk.stop()
        except Exception as exc:
            # PostgreSQL away, most likely: try again shortly (the backstop ends the
            # dispatch if this zone never manages to).
            log.warning(
                "zone %s: dispatch %s not advanced: %s",
                self.zone_id,
                seller_order_id,
                exc,
            )
            if self.desk is not None and not self.fenced:
                self.desk.retry_later(seller_order_id)

    async def _follow(self, changes: Changes) -> None:
        """Drivers offered, freed or booked: the shard and the mirror follow PostgreSQL."""
        if not changes.drivers:
            return
        entries = await self.drivers.mirror_entries(sorted(changes.drivers))
        for entry in entries:
            if entry.zone_id == self.zone_id:
                self.shard[entry.driver_id] = entry
        await self._mirror_write(entries)

    async def _assign_together(
        self, reqs: Sequence[AssignRequest]
    ) -> list[AssignResult]:
        candidates = await self._candidates_many(reqs)
        booked = await self.deliveries.book_many(
            list(zip(reqs, candidates, strict=True)),
            zone_id=self.zone_id,
            epoch=self.epoch,
            radius_km=self.settings.search_radius_km,
            heartbeat_ttl_s=self.settings.heartbeat_ttl_s,
            render=assigned_body,
        )
        results: list[AssignResult] = []
        for req, (booking, from_mirror) in zip(reqs, booked, strict=True):
            if booking is None:
                results.append(await self._unassigned(req))
                continue
            results.append(
                AssignResult(
                    "assigned",
                    booking.body,
                    "redis" if from_mirror else "postgres",
                    booking.driver_id,
                )
            )
        await self._booked(*(b for b, _ in booked if b is not None))
        return results

    async def _candidates_many(self, reqs: Sequence[AssignRequest]) -> list[list[str]]:
        """Each order's mirror candidates (empty: PostgreSQL decides alone), in one round trip."""
        if self._mirror_dirty:
            return [[] for _ in reqs]
        radius = self.settings.search_radius_km
        queries = []
        for req in reqs:
            zones = self.zoning.zones_near(req.pickup_lat, req.pickup_lon, radius)
            queries.append(
                NearestQuery(
                    tuple(zones),
                    req.pickup_lat,
                    req.pickup_lon,
                    tuple(search_steps(radius)),
                    CANDIDATES,
                    tuple(z for z in zones if z in self.known_zones),
                )
            )
        try:
            found = await self.mirror.nearest_widening_many(queries)
        except MirrorUnavailableError:
            return [[] for _ in reqs]
        return [ids or [] for ids in found]

    async def _assign_locked(self, req: AssignRequest) -> AssignResult:
        # No "already booked?" read first: the sellerOrderId primary key refuses a second
        # booking inside the booking's own transaction (rolled back, driver untouched),
        # which then replays the first. That saves a round trip on every booking; only
        # retries and races pay for it.
        try:
            booking, path = await self._book(req)
        except OrderExistsError:
            return await self._replay(req)
        if booking is None:
            return await self._unassigned(req)
        await self._booked(booking)
        return AssignResult("assigned", booking.body, path, booking.driver_id)

    async def _unassigned(self, req: AssignRequest) -> AssignResult:
        # Nobody free, but the order may have been booked meanwhile (a retry racing its
        # first attempt): that answer wins.
        if await self.deliveries.existing(req.seller_order_id) is not None:
            return await self._replay(req)
        return AssignResult(
            "unassigned", unassigned_body(req.seller_order_id), "postgres"
        )

    async def _replay(self, req: AssignRequest) -> AssignResult:
        existing = await self.deliveries.existing(req.seller_order_id)
        assert existing is not None, "refused as a duplicate, so it exists"
        return replay(req, existing)

    async def _book(self, req: AssignRequest) -> tuple[Booking | None, LookupPath]:
        radius = self.settings.search_radius_km
        candidates: list[str] = []
        # A mirror missing writes (ours failed, or Redis came back empty and a zone is
        # not rebuilt yet) could hide the nearest driver: PostgreSQL decides alone then.
        if not self._mirror_dirty:
            zones = self.zoning.zones_near(req.pickup_lat, req.pickup_lon, radius)
            must_be_built = [z for z in zones if z in self.known_zones]
            with contextlib.suppress(MirrorUnavailableError):
                candidates = await self._nearest_widening(
                    req.pickup_lat, req.pickup_lon, must_be_built
                )
        if candidates:
            booking = await self._book_among(req, candidates)
            if booking is not None:
                return booking, "redis"
        # No usable mirror answer: PostgreSQL decides alone, so "nobody" is always
        # confirmed by the truth and a stale or empty mirror never loses an order.
        return await self._book_among(req, None), "postgres"

    async def _nearest_widening(
        self, lat: float, lon: float, must_be_built: list[str]
    ) -> list[str]:
        return await nearest_widening(
            self.mirror,
            self.zoning,
            lat,
            lon,
            self.settings.search_radius_km,
            must_be_built=must_be_built,
        )

    async def _book_among(
        self, req: AssignRequest, candidates: list[str] | None
    ) -> Booking | None:
        taken: list[str] = []
        while True:
            try:
                return await self.deliveries.book(
                    req,
                    zone_id=self.zone_id,
                    epoch=self.epoch,
                    candidates=candidates,
                    radius_km=self.settings.search_radius_km,
                    heartbeat_ttl_s=self.settings.heartbeat_ttl_s,
                    render=assigned_body,
                    exclude=taken,
                )
            except DriverTakenError as exc:
                # AVAILABLE yet holding an active delivery should not exist; the
                # index caught it, so skip that driver and say so loudly.
                log.error(
                    "driver %s is AVAILABLE with an active delivery; skipped",
                    exc.driver_id,
                )
                taken.append(exc.driver_id)
                if len(taken) > MAX_TAKEN_RETRIES:
                    raise

    async def _booked(self, *bookings: Booking) -> None:
        """Booked drivers leave the shard's available set and the mirror (one round trip)."""
        by_zone: dict[str, list[str]] = {}
        for booking in bookings:
            entry = self.shard.get(booking.driver_id)
            if entry is not None:
                self.shard[booking.driver_id] = _with_status(entry, available=False)
            by_zone.setdefault(booking.driver_zone_id or self.zone_id, []).append(
                booking.driver_id
            )
        try:
            await self.mirror.forget_many(by_zone)
        except MirrorUnavailableError:
            self._mirror_dirty = True

    # ---- refresh after writes made elsewhere (status, lifecycle, deactivation) ----------

    async def refresh(self, driver_ids: Sequence[str]) -> None:
        async with self._exclusive():
            entries = await self.drivers.mirror_entries(driver_ids)
            for entry in entries:
                if entry.zone_id == self.zone_id:
                    self.shard[entry.driver_id] = entry
                else:
                    self.shard.pop(entry.driver_id, None)
            await self._mirror_write(entries)

    def stats(self) -> ZoneStats:
        now = self.clock()
        available = sum(
            1
            for e in self.shard.values()
            if is_dispatchable(e, now, self.settings.heartbeat_ttl_s)
        )
        return ZoneStats(self.zone_id, self.epoch, len(self.shard), available)

    # ---- sweeper ------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.sweep_once()
            except StaleEpochError:
                return
            except (MirrorUnavailableError, DispatchError) as exc:
                self._mirror_dirty = True
                log.info("zone %s sweep skipped: %s", self.zone_id, exc)
            except Exception:
                log.exception("zone %s sweep failed", self.zone_id)

    async def sweep_once(self) -> None:
        async with self._exclusive():
            await self.sweep()

    async def sweep(self) -> None:
        """Expire silent drivers; rebuild when Redis lost the zone or missed writes."""
        now = self.clock()
        due = now - self._last_reconcile >= self.settings.reconcile_interval_s
        if self._mirror_dirty or not await self.mirror.is_built(self.zone_id):
            await self._reconcile()
        elif due:
            # The periodic check of a healthy mirror: rewrite only what differs.
            await self._reconcile(full=False)
        else:
            await self.mirror.expire(self.zone_id, now - self.settings.heartbeat_ttl_s)

    async def _reconcile(self, *, full: bool = True) -> None:
        entries = await self.drivers.zone_entries(self.zone_id)
        self.shard = {e.driver_id: e for e in entries}
        self.known_zones = set(await known_zones(self.drivers.pool))
        self._last_reconcile = self.clock()
        ttl = self.settings.heartbeat_ttl_s
        try:
            if full:
                await self.mirror.rebuild(self.zone_id, entries, self.clock(), ttl)
            elif repaired := await self.mirror.repair(
                self.zone_id, entries, self.clock(), ttl
            ):
                log.info(
                    "zone %s: reconcile repaired %d mirror entries",
                    self.zone_id,
                    repaired,
                )
        except MirrorUnavailableError:
            self._mirror_dirty = True
            return
        self._mirror_dirty = False


async def nearest_widening(
    mirror: GeoMirror,
    zoning: Zoning,
    lat: float,
    lon: float,
    radius_km: float,
    *,
    must_be_built: Sequence[str] = (),
) -> list[str]:
    """The mirror's nearest drivers, searching small circles first.

    GEOSEARCH costs the members in the search box: a fixed 5 km search in a dense city
    is slow. If a circle holds anyone, the nearest driver of the whole radius is inside
    it, so the first circle that finds members gives the candidates. Redis widens the
    circle itself (one script call), so the small first steps cost no round trips.
    """
    zones = zoning.zones_near(lat, lon, radius_km)
    return await mirror.nearest_widening(
        zones,
        lat,
        lon,
        search_steps(radius_km),
        CANDIDATES,
        must_be_built=must_be_built,
    )


def _rounds(pings: Sequence[Ping]) -> list[list[int]]:
    """Indexes of `pings` in rounds: round k holds each driver's k-th oldest fix."""
    by_driver: dict[str, list[int]] = {}
    for index in sorted(range(len(pings)), key=lambda i: pings[i].recorded_at):
        by_driver.setdefault(pings[index].driver_id, []).append(index)
    depth = max((len(v) for v in by_driver.values()), default=0)
    return [[v[k] for v in by_driver.values() if k < len(v)] for k in range(depth)]


def _with_status(entry: MirrorEntry, *, available: bool) -> MirrorEntry:
    return dataclasses.replace(entry, dispatchable_status=available)
