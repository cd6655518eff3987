"""A booking reaching the zone after its order was booked replays the first answer.

The ingress reads `deliveries` before calling a zone, so a zone sees an already booked
order only when a retry races its first attempt; the zone relies on the primary key
then. Called on ZoneCore directly, which is exactly that race.
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
