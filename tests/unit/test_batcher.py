"""PingBatcher: coalesces concurrent pings per zone, one call in flight, errors fan out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from dispatcher.actors.batcher import PingBatcher
from dispatcher.actors.messages import Ping, PingVerdict


def ping(n: int) -> Ping:
    return Ping(driver_id=f"d{n}", lat=1.0, lon=2.0, recorded_at=datetime.now(UTC))


class RecordingFlush:
    """A fake zone: records each batch and how many calls overlap per zone."""

    def __init__(self, delay_s: float = 0.01, fail: bool = False) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight = 0
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self, zone: str, pings: Sequence[Ping]) -> list[PingVerdict]:
        self.in_flight[zone] = self.in_flight.get(zone, 0) + 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight[zone])
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail:
                raise RuntimeError("zone down")
            self.batches.append((zone, [p.driver_id for p in pings]))
            return [PingVerdict.ACCEPTED] * len(pings)
        finally:
            self.in_flight[zone] -= 1


async def test_concurrent_pings_share_few_calls_and_bounded_in_flight_per_zone() -> None:
    flush = RecordingFlush()
    batcher = PingBatcher(flush, interval_s=0.002, max_batch=50, max_in_flight=1)
    verdicts = await asyncio.gather(*(batcher.submit("z1" if n % 2 else "z2", ping(n)) for n in range(200)))
    await batcher.close()
    assert verdicts == [PingVerdict.ACCEPTED] * 200
    assert sum(len(ids) for _, ids in flush.batches) == 200
    assert len(flush.batches) <= 12  # 200 pings, batches of up to 50, two zones
    assert flush.max_in_flight == 1
    assert all(len(ids) <= 50 for _, ids in flush.batches)


async def test_a_failed_batch_fails_each_of_its_pings() -> None:
    batcher = PingBatcher(RecordingFlush(fail=True), interval_s=0.0, max_batch=10)
    results = await asyncio.gather(*(batcher.submit("z", ping(n)) for n in range(5)), return_exceptions=True)
    await batcher.close()
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_submit_many_keeps_order() -> None:
    batcher = PingBatcher(RecordingFlush(delay_s=0), interval_s=0.0, max_batch=3)
    verdicts = await batcher.submit_many("z", [ping(n) for n in range(7)])
    await batcher.close()
    assert verdicts == [PingVerdict.ACCEPTED] * 7


async def test_closed_batcher_refuses_work() -> None:
    batcher = PingBatcher(RecordingFlush(), interval_s=0.0, max_batch=3)
    await batcher.close()
    with pytest.raises(RuntimeError):
        await batcher.submit("z", ping(1))


async def test_several_batches_of_a_zone_overlap_up_to_the_bound() -> None:
    flush = RecordingFlush(delay_s=0.02)
    batcher = PingBatcher(flush, interval_s=0.0, max_batch=5, max_in_flight=3)
    verdicts = await asyncio.gather(*(batcher.submit("z", ping(n)) for n in range(60)))
    await batcher.close()
    assert verdicts == [PingVerdict.ACCEPTED] * 60
    assert flush.max_in_flight == 3
    assert sum(len(ids) for _, ids in flush.batches) == 60
