"""Fault 5b: `dispatcher serve` SIGKILLed mid ping stream; only the last flush window's acknowledged fixes may be lost."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import ray

from dispatcher.config import ResolvedSettings
from dispatcher.embedded import free_port
from tests.faults.helpers import ServeProcess, remote_api, serve_env
from tests.support import BERLIN, Api, Driver, Point, offset

pytestmark = pytest.mark.integration

DRIVERS = 20
SPACING_KM = 0.3
# A long write-behind window, so that the kill surely lands with fixes still queued.
FLUSH_MS = 200.0
# Beyond the window: the flush's actor call and a busy machine's stalls.
MARGIN_S = 1.0
PING_FOR_S = 2.0
# Per driver, under the ingress's default rate limit (10 pings/s, burst 60).
PING_GAP_S = 0.11
# 3 m per ping: well under 100 km/h, far below the 250 km/h limit.
STEP_KM = 0.003
MIN_ACKED = 100


@dataclass(frozen=True)
class Fix:
    recorded_at: datetime
    lat: float
    lon: float


@dataclass
class Track:
    """One driver's pings: every fix sent, and each 204 with the monotonic time it came."""

    driver: Driver
    home: Point
    sent: dict[datetime, Fix] = field(default_factory=dict)
    acked: list[tuple[float, Fix]] = field(default_factory=list)
    refused: list[tuple[float, str]] = field(default_factory=list)


async def pinger(api: Api, track: Track, stop: asyncio.Event) -> None:
    """Ping as a phone would, a few metres further each time, until `stop`."""
    path = f"/drivers/{track.driver.driver_id}/location"
    step = 0
    while not stop.is_set():
        step += 1
        lat, lon = offset(*track.home, 0.0, STEP_KM * step)
        fix = Fix(datetime.now(UTC), lat, lon)
        track.sent[fix.recorded_at] = fix
        body = {"lat": lat, "lon": lon, "recordedAt": fix.recorded_at.isoformat()}
        try:
            resp = await api.client.patch(path, json=body, headers=track.driver.auth)
            answered = time.monotonic()
            text = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # After the kill: connection reset or refused.
            track.refused.append((time.monotonic(), repr(exc)))
        else:
            if resp.status == 204:
                track.acked.append((answered, fix))
            else:
                track.refused.append((answered, f"{resp.status} {text}"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PING_GAP_S)


def audit(
    tracks: list[Track], stored: dict[str, asyncpg.Record], killed_at: float
) -> list[float]:
    """Check every driver's stored fix; return the ages (s before the kill) of the lost acknowledged fixes."""
    cutoff = killed_at - (FLUSH_MS / 1000.0 + MARGIN_S)
    lost: list[float] = []
    for track in tracks:
        driver_id = track.driver.driver_id
        row = stored[driver_id]
        rec: datetime = row["location_recorded_at"]
        before = [(at, fix) for at, fix in track.acked if at <= cutoff]
        assert before, f"{driver_id}: no fix acknowledged before the final window"
        at, fix = before[-1]
        assert rec >= fix.recorded_at, (
            f"{driver_id}: fix recorded {fix.recorded_at.isoformat()}, acknowledged "
            f"{killed_at - at:.3f} s before the kill, is lost (PostgreSQL holds {rec.isoformat()})"
        )
        held = track.sent.get(rec)
        assert held is not None, (
            f"{driver_id}: PostgreSQL holds a fix never sent ({rec.isoformat()})"
        )
        assert (row["lat"], row["lon"]) == (held.lat, held.lon), (
            f"{driver_id}: {row} is not {held}"
        )
        lost += [killed_at - at for at, fix in track.acked if fix.recorded_at > rec]
    return lost


def report_loss(lost: list[float], acked: int) -> None:
    window_s = FLUSH_MS / 1000.0
    if not lost:
        print(
            f"NO acknowledged fix was lost: all {acked} are in PostgreSQL (the kill found the queues empty)"
        )
        return
    print(
        f"{len(lost)} of {acked} acknowledged fixes lost, acknowledged {min(lost):.3f} to "
        f"{max(lost):.3f} s before the kill (window {window_s:.1f} s + margin {MARGIN_S:.1f} s)"
    )
    in_window = sum(age <= window_s for age in lost)
    print(
        f"{in_window} of them within the flush window itself, {len(lost) - in_window} in the margin"
    )


async def test_ingress_sigkilled_mid_ping_stream(
    ray_session: None,
    zone_actors_cleanup: None,
    fault_settings: Callable[..., ResolvedSettings],
    own_pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    settings = fault_settings(
        ray_address=ray.get_runtime_context().gcs_address,
        heartbeat_ttl_s=600,
        ping_flush_interval_ms=FLUSH_MS,
    )
    env = serve_env(settings, port=(port := free_port()))
    # serve_env does not carry the flush window: without it the ingress flushes every 50 ms.
    env["DISPATCHER_PING_FLUSH_INTERVAL_MS"] = str(settings.ping_flush_interval_ms)
    proc = ServeProcess(env, tmp_path / "serve.log")
    try:
        started_s = await proc.start()
        print(f"ingress listening after {started_s:.2f} s")
        async with remote_api(f"http://127.0.0.1:{port}", settings) as api:
            tracks: list[Track] = []
            for n in range(DRIVERS):
                home = offset(*BERLIN, SPACING_KM * (n // 5), SPACING_KM * (n % 5))
                tracks.append(Track(await api.online_driver(*home, name=f"p{n}"), home))
            # The first fixes are written and every zone actor is up before the stream.
            await api.settle()
            stop = asyncio.Event()
            tasks = [asyncio.create_task(pinger(api, t, stop)) for t in tracks]
            try:
                await asyncio.sleep(PING_FOR_S)
                killed_at = time.monotonic()
                await proc.kill()
            finally:
                stop.set()
                await asyncio.gather(*tasks)

        acked = sum(len(t.acked) for t in tracks)
        early = [
            (t.driver.driver_id, why)
            for t in tracks
            for at, why in t.refused
            if at < killed_at
        ]
        assert not early, f"pings refused before the kill: {early[:5]}"
        assert acked > MIN_ACKED, f"only {acked} pings acknowledged"
        last_ack = max(at for t in tracks for at, _ in t.acked)
        print(
            f"{acked} pings acknowledged by {DRIVERS} drivers; the last {1000 * (killed_at - last_ack):.1f} ms before the kill"
        )

        # A flush already in the zone actor's hands may still land: wait, then read.
        await asyncio.sleep(0.5)
        rows = await own_pool.fetch(
            "SELECT id, lat, lon, location_recorded_at FROM drivers WHERE id = ANY($1::text[])",
            [t.driver.driver_id for t in tracks],
        )
        stored = {r["id"]: r for r in rows}
        lost = audit(tracks, stored, killed_at)
        report_loss(lost, acked)
    finally:
        await proc.kill()
