"""PingGate: the ingress's answer to a ping before it is written, from a driver cache."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from dispatcher.actors.messages import Ping, PingVerdict
from dispatcher.geo import haversine_km

# GPS fixes jitter by tens of metres; below this jump no speed check applies.
SPEED_CHECK_MIN_KM = 0.2
# A cached driver is read again after this long. The zone actors' verdicts correct
# the cache much sooner (see PingGate.applied); this only bounds what nothing corrects.
GATE_TTL_S = 300.0
# Enough for every driver of a large fleet; past it the cache starts over.
GATE_MAX_DRIVERS = 200_000


@dataclass(frozen=True, slots=True)
class LastFix:
    """What PostgreSQL (or this ingress, since) holds as a driver's newest fix."""

    is_active: bool
    lat: float | None
    lon: float | None
    recorded_at: datetime | None


def judge_fix(last: LastFix | None, ping: Ping, max_speed_kmh: float) -> PingVerdict:
    """The verdict of one fix against the driver's newest stored fix.

    The same rule as the ping statement in PostgreSQL (store/drivers.py PING_SQL).
    """
    if last is None:
        return PingVerdict.UNKNOWN_DRIVER
    if not last.is_active:
        return PingVerdict.INACTIVE
    previous = last.recorded_at
    if previous is not None and previous >= ping.recorded_at:
        return PingVerdict.STALE
    if last.lat is not None and last.lon is not None and previous is not None:
        jump = haversine_km(last.lat, last.lon, ping.lat, ping.lon)
        hours = (ping.recorded_at - previous).total_seconds() / 3600.0
        if jump > max(SPEED_CHECK_MIN_KM, max_speed_kmh * hours):
            return PingVerdict.TOO_FAST
    return PingVerdict.ACCEPTED


LoadFixes = Callable[[Sequence[str]], Awaitable[dict[str, LastFix]]]


@dataclass(slots=True)
class _Entry:
    fix: LastFix
    loaded_at: float


class PingGate:
    """Judges pings in the ingress so they can be answered before they are written.

    A driver's entry is read from PostgreSQL once, then advanced by every fix this
    ingress accepts, so a phone's burst is judged fix after fix in arrival order.
    PostgreSQL re-checks every fix when it is written; when it decides otherwise
    (another replica's fix, a deactivation made elsewhere) the zone actor's verdict
    corrects the entry through `applied`, so the next ping is answered right.
    """

    def __init__(
        self,
        load: LoadFixes,
        *,
        max_speed_kmh: float,
        ttl_s: float = GATE_TTL_S,
        max_drivers: int = GATE_MAX_DRIVERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._max_speed_kmh = max_speed_kmh
        self._ttl_s = ttl_s
        self._max_drivers = max_drivers
        self._clock = clock
        self._entries: dict[str, _Entry] = {}

    async def judge(self, pings: Sequence[Ping]) -> list[PingVerdict]:
        """Verdicts in order; accepted fixes advance their driver's entry."""
        now = self._clock()
        missing = {
            p.driver_id
            for p in pings
            if (e := self._entries.get(p.driver_id)) is None
            or now - e.loaded_at > self._ttl_s
        }
        if missing:
            loaded = await self._load(sorted(missing))
            if len(self._entries) + len(loaded) > self._max_drivers:
                self._entries.clear()
            for driver_id in missing:
                fix = loaded.get(driver_id)
                # Unknown drivers are not cached: one may be created any moment.
                if fix is None:
                    self._entries.pop(driver_id, None)
                # Another request may have loaded and advanced it while this one waited.
                elif (e := self._entries.get(driver_id)) is None or e.loaded_at < now:
                    self._entries[driver_id] = _Entry(fix, now)
        # From here to the end nothing awaits: verdicts and updates are one step.
        verdicts = []
        for ping in pings:
            entry = self._entries.get(ping.driver_id)
            verdict = judge_fix(
                None if entry is None else entry.fix, ping, self._max_speed_kmh
            )
            if verdict is PingVerdict.ACCEPTED and entry is not None:
                entry.fix = LastFix(True, ping.lat, ping.lon, ping.recorded_at)
            verdicts.append(verdict)
        return verdicts

    def clear(self) -> None:
        """Read every driver again (changes may have been missed)."""
        self._entries.clear()

    def forget(self, driver_id: str) -> None:
        """Read this driver from PostgreSQL next time (it changed elsewhere)."""
        self._entries.pop(driver_id, None)

    def applied(self, pings: Sequence[Ping], verdicts: Sequence[PingVerdict]) -> None:
        """Learn from PostgreSQL's verdicts on fixes this ingress had accepted."""
        for ping, verdict in zip(pings, verdicts, strict=True):
            if verdict is PingVerdict.INACTIVE:
                entry = self._entries.get(ping.driver_id)
                if entry is not None:
                    entry.fix = LastFix(
                        False, entry.fix.lat, entry.fix.lon, entry.fix.recorded_at
                    )
            elif verdict is not PingVerdict.ACCEPTED:
                # Unknown, or PostgreSQL holds another fix than ours: read it again.
                self._entries.pop(ping.driver_id, None)
