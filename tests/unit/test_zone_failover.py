"""ZoneDirectory's failover bookkeeping, with stand-in handles (no Ray)."""

from __future__ import annotations

import asyncio
from typing import Any

from ray.exceptions import RayActorError

from dispatcher.actors.options import ZoneSlot
from dispatcher.api.zoneclient import ZoneDirectory
from dispatcher.config import ResolvedSettings

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
