"""OrderBatcher: orders queued behind a zone's call share the next call; errors fan out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from dispatcher.actors.messages import AssignRequest, AssignResult
from dispatcher.actors.orderbatcher import OrderBatcher
from dispatcher.errors import ZoneUnavailableError


class FakeZones:
    """Records each call; answers every order "assigned" after `delay_s`."""

    def __init__(self, delay_s: float = 0.01, fail: bool = False) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight = 0
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(
        self, zone: str, reqs: Sequence[AssignRequest]
    ) -> list[AssignResult]:
        self.in_flight[zone] = self.in_flight.get(zone, 0) + 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight[zone])
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail:
                raise ZoneUnavailableError(f"zone {zone} is restarting")
            self.calls.append((zone, [r.seller_order_id for r in reqs]))
            return [
                AssignResult("assigned", f'{{"id":"{r.seller_order_id}"}}', "redis")
                for r in reqs
            ]
        finally:
            self.in_flight[zone] -= 1


def order(n: int) -> AssignRequest:
    return AssignRequest(f"SO-{n}", 52.5, 13.4)


async def test_a_lone_order_is_sent_at_once_and_concurrent_ones_share_calls() -> None:
    zones = FakeZones()
    batcher = OrderBatcher(zones, max_batch=8)
    lone = await batcher.assign("z", order(0))
    assert lone.body == '{"id":"SO-0"}' and zones.calls == [("z", ["SO-0"])]

    results = await asyncio.gather(
        *(batcher.assign("z1" if n % 2 else "z2", order(n)) for n in range(40))
    )
    assert [r.body for r in results] == [f'{{"id":"SO-{n}"}}' for n in range(40)]
    later = zones.calls[1:]
    assert sorted(i for _, ids in later for i in ids) == sorted(
        f"SO-{n}" for n in range(40)
    )
    assert len(later) < 40 and all(len(ids) <= 8 for _, ids in later)
    assert zones.max_in_flight == 1
    await batcher.close()


async def test_a_failed_call_fails_each_of_its_orders() -> None:
    batcher = OrderBatcher(FakeZones(fail=True), max_batch=8)
    results = await asyncio.gather(
        *(batcher.assign("z", order(n)) for n in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, ZoneUnavailableError) for r in results)
    await batcher.close()


async def test_an_order_whose_client_left_is_not_sent() -> None:
    zones = FakeZones(delay_s=0.05)
    batcher = OrderBatcher(zones, max_batch=8)
    first = asyncio.create_task(batcher.assign("z", order(1)))
    await asyncio.sleep(0.01)  # in flight
    gone = asyncio.create_task(batcher.assign("z", order(2)))
    await asyncio.sleep(0.01)
    gone.cancel()
    await first
    await asyncio.sleep(0.08)
    assert zones.calls == [("z", ["SO-1"])]
    await batcher.close()
    with pytest.raises(RuntimeError):
        await batcher.assign("z", order(3))
