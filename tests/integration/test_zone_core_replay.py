"""A booking reaching the zone after its order was booked replays the first answer.

The zone reads no `deliveries` row before booking: the primary key refuses a second
booking of an order (a retry), which is then replayed. Called on ZoneCore directly;
also for several orders in one call, which share one transaction.
"""

from __future__ import annotations

import asyncpg
import pytest

from dispatcher.actors.messages import AssignRequest
from tests.service_fixtures import MakeCore
from tests.support import BERLIN, located_drivers, offset

pytestmark = pytest.mark.integration


async def busy_and_bookings(pool: asyncpg.Pool) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM drivers WHERE status = 'BUSY'), (SELECT count(*) FROM deliveries),
                  (SELECT count(*) FROM webhook_outbox)"""
    )
    assert row is not None
    return row[0], row[1], row[2]


async def test_a_second_booking_of_a_booked_order_replays_and_takes_no_driver(
    zone_cores: MakeCore, pg_pool: asyncpg.Pool
) -> None:
    core = await zone_cores()
    await core.start()
    await located_drivers(core, [offset(*BERLIN, 0.1 * n, 0.0) for n in range(3)])
    first = await core.assign(AssignRequest("SO-R1", *BERLIN))
    assert first.kind == "assigned"
    assert await busy_and_bookings(pg_pool) == (1, 1, 1)

    again = await core.assign(AssignRequest("SO-R1", *BERLIN))
    assert (again.kind, again.body) == ("replayed", first.body)
    moved = await core.assign(AssignRequest("SO-R1", *offset(*BERLIN, 1.0, 0.0)))
    assert (moved.kind, moved.body) == ("conflict", first.body)
    # The refused second booking rolled back: still one BUSY driver, one delivery, one event.
    assert await busy_and_bookings(pg_pool) == (1, 1, 1)


async def test_a_booked_order_replays_even_when_nobody_is_free_any_more(
    zone_cores: MakeCore, pg_pool: asyncpg.Pool
) -> None:
    core = await zone_cores()
    await core.start()
    await located_drivers(core, [offset(*BERLIN, 0.2, 0.0)])
    first = await core.assign(AssignRequest("SO-R2", *BERLIN))
    assert first.kind == "assigned"
    # The only driver is now BUSY with this very order: the retry must not say "nobody".
    again = await core.assign(AssignRequest("SO-R2", *BERLIN))
    assert (again.kind, again.body) == ("replayed", first.body)
    other = await core.assign(AssignRequest("SO-R3", *BERLIN))
    assert other.kind == "unassigned"
    assert await busy_and_bookings(pg_pool) == (1, 1, 1)


async def test_orders_booked_together_share_a_transaction_and_fall_back_on_a_retry(
    zone_cores: MakeCore, pg_pool: asyncpg.Pool
) -> None:
    core = await zone_cores()
    await core.start()
    await located_drivers(core, [offset(*BERLIN, 0.1 * n, 0.0) for n in range(5)])
    # Three new orders in one call: each its own nearest free driver, all committed.
    together = await core.assign_many(
        [AssignRequest(f"SO-T{n}", *BERLIN) for n in range(3)]
    )
    assert [r.kind for r in together] == ["assigned"] * 3
    assert len({r.driver_id for r in together}) == 3
    assert await busy_and_bookings(pg_pool) == (3, 3, 3)
    # Orders are booked in turn: the nearest free driver went to the first.
    stored = {
        r["seller_order_id"]: r["distance_km"]
        for r in await pg_pool.fetch("SELECT * FROM deliveries")
    }
    assert stored["SO-T0"] <= stored["SO-T1"] <= stored["SO-T2"]

    # A call holding a retry (SO-T1) while drivers are still free: its second booking
    # hits the primary key, the shared transaction rolls back (SO-T4's booking too),
    # and each order goes alone: SO-T4 and SO-T5 book, the retry replays.
    mixed = await core.assign_many(
        [
            AssignRequest("SO-T4", *BERLIN),
            AssignRequest("SO-T1", *BERLIN),
            AssignRequest("SO-T5", *BERLIN),
        ]
    )
    assert [r.kind for r in mixed] == ["assigned", "replayed", "assigned"]
    assert mixed[1].body == together[1].body
    assert len({r.driver_id for r in (*together, mixed[0], mixed[2])}) == 5
    assert await busy_and_bookings(pg_pool) == (5, 5, 5)
