"""PingBuffer: write-behind per zone, newest fix per driver, settle, retry after failures."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from dispatcher.actors.batcher import PingBuffer
from dispatcher.actors.messages import Ping, PingVerdict
from dispatcher.errors import DatabaseUnavailableError


def ping(n: int, *, driver: str | None = None, age_s: float = 0.0) -> Ping:
    at = datetime.now(UTC) - timedelta(seconds=age_s)
    return Ping(
        driver_id=driver or f"d{n}", lat=1.0 + n / 1000, lon=2.0, recorded_at=at
    )


class RecordingFlush:
    """A fake zone: records each batch and how many calls overlap per zone."""

    def __init__(
        self,
        delay_s: float = 0.005,
        failures: int = 0,
        verdict: PingVerdict = PingVerdict.ACCEPTED,
    ) -> None:
        self.batches: list[tuple[str, list[Ping]]] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight = 0
        self.delay_s = delay_s
        self.failures = failures
        self.verdict = verdict

    async def __call__(self, zone: str, pings: Sequence[Ping]) -> list[PingVerdict]:
        self.in_flight[zone] = self.in_flight.get(zone, 0) + 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight[zone])
        try:
            await asyncio.sleep(self.delay_s)
            if self.failures > 0:
                self.failures -= 1
                raise DatabaseUnavailableError("PostgreSQL down")
            self.batches.append((zone, list(pings)))
            return [self.verdict] * len(pings)
        finally:
            self.in_flight[zone] -= 1

    def written(self) -> list[str]:
        return [p.driver_id for _, batch in self.batches for p in batch]


async def test_offers_return_at_once_and_form_few_batches_per_zone() -> None:
    flush = RecordingFlush()
    buffer = PingBuffer(flush, interval_s=0.01, max_batch=50, max_age_s=60)
    for n in range(200):
        buffer.offer("z1" if n % 2 else "z2", ping(n))
    assert flush.batches == []  # nothing written yet: the 204s went out before
    assert buffer.queued == 200
    await buffer.settle()
    assert sorted(flush.written()) == sorted(f"d{n}" for n in range(200))
    assert len(flush.batches) <= 6  # 100 per zone in batches of up to 50
    assert all(len(batch) <= 50 for _, batch in flush.batches)
    assert flush.max_in_flight == 1
    await buffer.close()


async def test_only_the_newest_fix_of_a_driver_is_written() -> None:
    flush = RecordingFlush()
    buffer = PingBuffer(flush, interval_s=1.0, max_batch=50, max_age_s=60)
    old, new = ping(1, driver="d", age_s=2), ping(2, driver="d", age_s=1)
    buffer.offer("z", new)
    buffer.offer("z", old)  # arrives later, recorded earlier: superseded
    await buffer.settle()  # cuts the 1 s window short
    assert [b for _, b in flush.batches] == [[new]]
    await buffer.close()


async def test_settle_waits_only_for_what_was_offered_before_it() -> None:
    flush = RecordingFlush(delay_s=0.05)
    buffer = PingBuffer(flush, interval_s=0.0, max_batch=50, max_age_s=60)
    await buffer.settle()  # nothing queued: returns at once
    buffer.offer("z", ping(1))
    settled = asyncio.create_task(buffer.settle())
    await asyncio.sleep(0.01)
    assert not settled.done()  # the call is in flight
    await settled
    assert flush.written() == ["d1"]
    await buffer.close()


async def test_a_failed_flush_keeps_its_fixes_reports_the_failure_and_retries() -> None:
    flush = RecordingFlush(failures=2)
    applied: list[PingVerdict] = []
    buffer = PingBuffer(
        flush,
        interval_s=0.0,
        max_batch=10,
        max_age_s=60,
        on_applied=lambda pings, verdicts: applied.extend(verdicts),
    )
    buffer.offer("z", ping(1))
    await buffer.settle()  # the first attempt failed
    assert isinstance(buffer.failure("z"), DatabaseUnavailableError)
    assert flush.written() == []
    for _ in range(100):  # retries after 0.1 s, then 0.25 s
        if flush.written():
            break
        await asyncio.sleep(0.02)
    assert flush.written() == ["d1"]
    assert buffer.failure("z") is None
    assert applied == [PingVerdict.ACCEPTED]
    assert buffer.dropped == 0
    await buffer.close()


async def test_fixes_too_old_to_matter_are_dropped_not_retried() -> None:
    flush = RecordingFlush(failures=1)
    buffer = PingBuffer(flush, interval_s=0.0, max_batch=10, max_age_s=5)
    buffer.offer("z", ping(1, age_s=10))
    buffer.offer("z", ping(2, age_s=1))
    await buffer.settle()
    await asyncio.sleep(0.2)
    await buffer.settle()
    assert flush.written() == ["d2"]
    assert buffer.dropped == 1
    await buffer.close()


async def test_verdicts_reach_the_callback_and_close_flushes_what_is_queued() -> None:
    flush = RecordingFlush(verdict=PingVerdict.INACTIVE)
    seen: list[tuple[str, PingVerdict]] = []
    buffer = PingBuffer(
        flush,
        interval_s=10.0,
        max_batch=10,
        max_age_s=60,
        on_applied=lambda pings, verdicts: seen.extend(
            (p.driver_id, v) for p, v in zip(pings, verdicts, strict=True)
        ),
    )
    buffer.offer("z", ping(1))
    await buffer.close()
    assert seen == [("d1", PingVerdict.INACTIVE)]
    with pytest.raises(RuntimeError):
        buffer.offer("z", ping(2))


async def test_a_failing_verdict_handler_does_not_stop_the_zones_flusher() -> None:
    flush = RecordingFlush()

    def broken(pings: Sequence[Ping], verdicts: Sequence[PingVerdict]) -> None:
        raise ValueError("bookkeeping bug")

    buffer = PingBuffer(
        flush, interval_s=0.0, max_batch=10, max_age_s=60, on_applied=broken
    )
    buffer.offer("z", ping(1))
    await buffer.settle()
    buffer.offer("z", ping(2))
    await buffer.settle()
    assert flush.written() == ["d1", "d2"]
    await buffer.close()
