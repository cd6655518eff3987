"""ZoneDirectory's failover bookkeeping, with stand-in handles (no Ray)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import RayActorError

from dispatcher.actors.options import ZoneSlot
from dispatcher.api.zoneclient import ZoneDirectory
from dispatcher.config import ResolvedSettings
from dispatcher.errors import ZoneUnavailableError

ZONE = "861f1d48fffffff"


def settings() -> ResolvedSettings:
    return ResolvedSettings.model_validate(
        {
            "database_url": "postgresql://unused/db",
            "redis_url": "redis://unused:6379/0",
            "vendure_webhook_secret": "whsec_unused",
            "inbound_secret": "whsec_unused",
            "admin_token": "adm_unused_0123456789",
            "zone_standby": True,
        }
    )


class FakeDirectory(ZoneDirectory):
    """Slot a dies; a takeover names slot b. Records which slot each takeover was for."""

    def __init__(self) -> None:
        super().__init__(settings())
        self.dead_slots: list[ZoneSlot] = []

    async def _take_over(self, zone_id: str, dead: ZoneSlot, since: float) -> bool:
        self.dead_slots.append(dead)
        self._handles[zone_id] = "handle-b"  # type: ignore[assignment]
        self._slots[zone_id] = "b"
        return True


async def test_a_call_that_fails_late_on_the_dead_slot_keeps_the_standby() -> None:
    directory = FakeDirectory()
    directory._handles[ZONE] = "handle-a"  # type: ignore[assignment]
    directory._slots[ZONE] = "a"
    a_died = asyncio.Event()
    used: list[str] = []

    async def first(handle: Any) -> str:
        used.append(handle)
        if handle == "handle-a":
            a_died.set()
            raise RayActorError()
        return "answered by b"

    async def late(handle: Any) -> str:
        used.append(handle)
        if handle == "handle-a":
            # Sent to slot a before the takeover; its failure arrives after it.
            await a_died.wait()
            await asyncio.sleep(0.2)
            raise RayActorError()
        return "answered by b"

    results = await asyncio.gather(
        directory._call(ZONE, late), directory._call(ZONE, first)
    )
    assert list(results) == ["answered by b", "answered by b"]
    # Both failures were slot a's: the late one did not hand the zone "back" from b.
    assert directory.dead_slots == ["a", "a"]
    assert directory._handles[ZONE] == "handle-b" and directory._slots[ZONE] == "b"


async def test_without_standbys_a_dead_zone_waits_for_ray_not_a_takeover() -> None:
    directory = ZoneDirectory(settings().model_copy(update={"zone_standby": False}))
    assert await directory._fail_over(ZONE, "a", 0.0) is False


class NoHandoffs(ZoneDirectory):
    """A directory with one cached handle and no handoff in progress (no Ray KV)."""

    def __init__(self, handle: str) -> None:
        super().__init__(settings().model_copy(update={"actor_call_timeout_s": 0.05}))
        self._handles[ZONE] = handle  # type: ignore[assignment]

    async def _in_handoff(self, zone_id: str, since: float) -> bool:
        return False


async def test_a_zone_still_starting_is_waited_for_past_the_call_timeout() -> None:
    """Ray holds calls to a new process until its constructor ends, which can take
    longer than the call timeout on a starved machine: not a hung zone."""
    directory = NoHandoffs("new-handle")
    calls = 0

    async def slow_first(handle: Any) -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            await asyncio.sleep(1.0)  # past the 0.05 s timeout: still starting
        return f"answered by {handle}"

    assert await directory._call(ZONE, slow_first) == "answered by new-handle"
    assert calls == 3


async def test_a_zone_that_answered_then_hangs_is_unavailable_at_once() -> None:
    directory = NoHandoffs("old-handle")

    async def quick(handle: Any) -> str:
        return "ok"

    async def hung(handle: Any) -> str:
        await asyncio.sleep(1.0)
        return "too late"

    assert await directory._call(ZONE, quick) == "ok"
    with pytest.raises(ZoneUnavailableError, match="did not answer in time"):
        await directory._call(ZONE, hung)
