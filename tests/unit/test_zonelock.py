"""ZoneLock: shared holders overlap, exclusive holders are alone, writers are not starved."""

from __future__ import annotations

import asyncio

from dispatcher.actors.zonelock import ZoneLock


async def test_shared_holders_overlap_and_exclusive_ones_are_alone() -> None:
    lock = ZoneLock()
    inside: list[str] = []
    peak_shared = 0
    violations = 0

    async def shared(n: int) -> None:
        nonlocal peak_shared, violations
        async with lock.shared():
            inside.append(f"s{n}")
            peak_shared = max(peak_shared, sum(1 for i in inside if i.startswith("s")))
            violations += any(i.startswith("x") for i in inside)
            await asyncio.sleep(0.01)
            inside.remove(f"s{n}")

    async def exclusive(n: int) -> None:
        nonlocal violations
        async with lock.exclusive():
            violations += len(inside) > 0
            inside.append(f"x{n}")
            await asyncio.sleep(0.005)
            inside.remove(f"x{n}")

    await asyncio.gather(
        *(shared(n) for n in range(10)), *(exclusive(n) for n in range(3))
    )
    assert violations == 0
    assert peak_shared > 1


async def test_a_waiting_exclusive_holder_blocks_new_shared_ones() -> None:
    lock = ZoneLock()
    order: list[str] = []
    first_in = asyncio.Event()

    async def long_shared() -> None:
        async with lock.shared():
            first_in.set()
            await asyncio.sleep(0.05)
            order.append("shared-1 done")

    async def writer() -> None:
        async with lock.exclusive():
            order.append("exclusive")

    async def late_shared() -> None:
        async with lock.shared():
            order.append("shared-2")

    task = asyncio.create_task(long_shared())
    await first_in.wait()
    writer_task = asyncio.create_task(writer())
    await asyncio.sleep(0.005)
    await asyncio.gather(task, writer_task, late_shared())
    assert order == ["shared-1 done", "exclusive", "shared-2"]
