"""What serializes the writes of a dispatch, and what fences a stale zone.

Every write path (accept, decline, cancel, expiry, force-assign, redispatch, give-up)
is shown to wait for the dispatch row lock and then to judge the row as the lock
holder left it; every zone-made write (start, round, expiry, give-up) with a stale
zone epoch is shown to write nothing. The writes are called on the store directly,
so no zone is woken behind the test's back; the zone actor only sets the scene.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from dispatcher.config import ResolvedSettings
from dispatcher.errors import StaleEpochError
from dispatcher.messages import AssignRequest
from dispatcher.models import assigned_body
from dispatcher.offers.policy import GiveUp, next_step
from dispatcher.store.offers import (
    Fence,
    OfferRefusedError,
    OfferStore,
    PickRule,
)
from tests.integration.test_offers import open_offers, wait_for
from tests.support import BERLIN, Api, Driver, offset

pytestmark = pytest.mark.integration

StartApi = Callable[[ResolvedSettings], Awaitable[Api]]

# Long enough that no zone timer and no backstop fires while a test runs.
QUIET = {
    "offer_timeout_s": 600.0,
    "dispatch_deadline_s": 3000.0,
    "offer_backstop_interval_s": 3600.0,
}


class Scene:
    """One cascade order offered to one driver (of two), its zone and the store."""

    def __init__(
        self, api: Api, pool: asyncpg.Pool, order: str, drivers: list[Driver]
    ) -> None:
        self.api = api
        self.pool = pool
        self.order = order
        self.drivers = drivers
        self.store = OfferStore(pool, render=assigned_body)
        self.rules = api.settings.offer_rules()
        self.pick = PickRule(
            api.settings.search_radius_km, api.settings.heartbeat_ttl_s
        )

    @property
    def offered(self) -> Driver:
        return self.drivers[0]

    async def offer_id(self) -> str:
        (offer,) = await open_offers(self.api, self.offered)
        offer_id: str = offer["offerId"]
        return offer_id

    async def zone(self) -> str:
        zone: str = await self.pool.fetchval(
            "SELECT zone_id FROM dispatches WHERE seller_order_id = $1", self.order
        )
        return zone

    async def fence(self, *, stale: bool = False) -> Fence:
        zone = await self.zone()
        epoch: int = await self.pool.fetchval(
            "SELECT epoch FROM zones WHERE zone_id = $1", zone
        )
        return Fence(zone, epoch - 1 if stale else epoch)

    async def dispatch(self) -> asyncpg.Record:
        row = await self.pool.fetchrow(
            "SELECT * FROM dispatches WHERE seller_order_id = $1", self.order
        )
        assert row is not None
        return row

    async def offers(self) -> list[tuple[str, str]]:
        rows = await self.pool.fetch(
            "SELECT driver_id, status FROM offers WHERE seller_order_id = $1 ORDER BY created_at, driver_id",
            self.order,
        )
        return [(r["driver_id"], r["status"]) for r in rows]

    async def unassigned_sent(self) -> int:
        n: int = await self.pool.fetchval(
            "SELECT count(*) FROM webhook_outbox WHERE seller_order_id = $1 AND event_type = 'delivery.unassigned'",
            self.order,
        )
        return n

    async def deliveries(self) -> int:
        n: int = await self.pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE seller_order_id = $1", self.order
        )
        return n


@pytest.fixture
async def scene(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
) -> Scene:
    api = await start_api(
        make_settings(offer_mode="cascade", offer_max_rounds=1, **QUIET)
    )
    drivers = [
        await api.online_driver(*offset(*BERLIN, km, 0.0), name=f"f{km}")
        for km in (0.1, 0.2)
    ]
    order = "SO-fence"
    body = await (await api.order(order, *BERLIN)).json()
    assert body["dispatchStatus"] == "OFFERED", body
    return Scene(api, pg_pool, order, drivers)


async def behind_the_lock(
    scene: Scene, write: Callable[[], Awaitable[Any]], holder_sql: str
) -> Any:
    """Hold the dispatch row lock, start `write`, wait until PostgreSQL shows it waiting
    for that lock, run `holder_sql` ($1: the order) and commit: `write` then goes on and
    sees the row as the holder left it. Returns what `write` returned or raised."""
    async with scene.pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute(
                "SELECT 1 FROM dispatches WHERE seller_order_id = $1 FOR UPDATE",
                scene.order,
            )
            holder_pid: int = await holder.fetchval("SELECT pg_backend_pid()")

            async def run() -> Any:
                try:
                    return await write()
                except (OfferRefusedError, StaleEpochError) as exc:
                    return exc

            task = asyncio.create_task(run())

            async def waiting() -> bool:
                assert not task.done(), f"the write did not wait: {task.result()!r}"
                blocked = await scene.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    holder_pid,
                )
                return bool(blocked)

            await wait_for(waiting)
            await holder.execute(holder_sql, scene.order)
        except BaseException:
            await tx.rollback()
            raise
        await tx.commit()
    return await task


CANCEL_SQL = "UPDATE dispatches SET status = 'CANCELLED', ended_at = now() WHERE seller_order_id = $1"
# What an operator's redispatch does to the row (its offers aside).
NEW_ATTEMPT_SQL = """UPDATE dispatches SET status = 'PENDING', attempt = attempt + 1, round = 0,
    deadline_at = now() + interval '1 hour' WHERE seller_order_id = $1"""


# ---- the bug: give-up decided on a stale read --------------------------------------------


async def test_a_give_up_decided_before_a_redispatch_does_not_end_the_new_attempt(
    scene: Scene,
) -> None:
    """A decline leaves the last round with nothing open: the zone reads the dispatch and
    decides to give up; an operator's redispatch commits before the zone's transaction.
    The give-up must be decided again on the locked row, and leave the new attempt be."""
    await scene.store.decline(scene.offered.driver_id, await scene.offer_id(), None)
    loaded = await scene.store.load(scene.order)
    assert loaded is not None
    step = next_step(scene.rules, loaded.view, loaded.now)
    assert isinstance(step, GiveUp), step
    await scene.store.redispatch(scene.order, scene.rules.deadline_s)

    ended = await scene.store.give_up(
        scene.order, rules=scene.rules, fence=await scene.fence()
    )

    assert ended is False
    row = await scene.dispatch()
    assert (row["status"], row["attempt"], row["reason"]) == ("PENDING", 2, None)
    assert await scene.unassigned_sent() == 0


# ---- every write path waits for the dispatch row and judges it afresh --------------------


async def test_accept_waits_for_the_dispatch_row(scene: Scene) -> None:
    offer_id = await scene.offer_id()
    result = await behind_the_lock(
        scene,
        lambda: scene.store.accept(scene.offered.driver_id, offer_id),
        CANCEL_SQL,
    )
    assert isinstance(result, OfferRefusedError) and result.reason == "ORDER_CANCELLED"
    assert await scene.deliveries() == 0


async def test_decline_waits_for_the_dispatch_row(scene: Scene) -> None:
    offer_id = await scene.offer_id()
    result = await behind_the_lock(
        scene,
        lambda: scene.store.decline(scene.offered.driver_id, offer_id, None),
        CANCEL_SQL,
    )
    assert isinstance(result, OfferRefusedError) and result.reason == "ORDER_CANCELLED"
    assert await scene.offers() == [(scene.offered.driver_id, "OPEN")]


async def test_cancel_waits_for_the_dispatch_row(scene: Scene) -> None:
    result = await behind_the_lock(
        scene,
        lambda: scene.store.cancel(scene.order),
        # As if another path had booked the order meanwhile.
        f"""UPDATE dispatches SET status = 'ASSIGNED', driver_id = '{scene.drivers[1].driver_id}',
            ended_at = now() WHERE seller_order_id = $1""",
    )
    # Assigned meanwhile: the cancel leaves the dispatch to the delivery's cancel.
    assert result is None
    assert (await scene.dispatch())["status"] == "ASSIGNED"
    assert await scene.offers() == [(scene.offered.driver_id, "OPEN")]


async def test_expiry_waits_for_the_dispatch_row(scene: Scene) -> None:
    offer_id = await scene.offer_id()
    await scene.pool.execute(
        "UPDATE offers SET expires_at = now() - interval '3 s', accept_by = now() - interval '1 s' WHERE offer_id = $1",
        offer_id,
    )
    fence = await scene.fence()
    result = await behind_the_lock(
        scene,
        lambda: scene.store.expire(scene.order, [offer_id], fence=fence),
        # The offer was answered while the expiry waited.
        "UPDATE offers SET status = 'DECLINED', answered_at = now() WHERE seller_order_id = $1",
    )
    assert result.drivers == set()
    assert await scene.offers() == [(scene.offered.driver_id, "DECLINED")]
    assert (
        await scene.pool.fetchval(
            "SELECT missed_offers FROM drivers WHERE id = $1", scene.offered.driver_id
        )
        == 0
    )


async def test_force_assign_waits_for_the_dispatch_row(scene: Scene) -> None:
    other = scene.drivers[1]
    result = await behind_the_lock(
        scene,
        lambda: scene.store.force_assign(scene.order, other.driver_id),
        CANCEL_SQL,
    )
    assert isinstance(result, OfferRefusedError) and result.reason == "ORDER_CANCELLED"
    assert await scene.deliveries() == 0


async def test_redispatch_waits_for_the_dispatch_row(scene: Scene) -> None:
    result = await behind_the_lock(
        scene,
        lambda: scene.store.redispatch(scene.order, 60.0),
        CANCEL_SQL,
    )
    assert isinstance(result, OfferRefusedError) and result.reason == "ORDER_CANCELLED"
    row = await scene.dispatch()
    assert (row["status"], row["attempt"]) == ("CANCELLED", 1)


async def test_give_up_waits_for_the_dispatch_row(scene: Scene) -> None:
    """The race of the first test, with the redispatch committing while the give-up
    waits for the row."""
    await scene.store.decline(scene.offered.driver_id, await scene.offer_id(), None)
    fence = await scene.fence()
    result = await behind_the_lock(
        scene,
        lambda: scene.store.give_up(scene.order, rules=scene.rules, fence=fence),
        NEW_ATTEMPT_SQL,
    )
    assert result is False
    row = await scene.dispatch()
    assert (row["status"], row["attempt"]) == ("PENDING", 2)
    assert await scene.unassigned_sent() == 0


async def test_give_up_goes_ahead_when_the_row_still_calls_for_it(scene: Scene) -> None:
    await scene.store.decline(scene.offered.driver_id, await scene.offer_id(), None)
    fence = await scene.fence()
    assert await scene.store.give_up(scene.order, rules=scene.rules, fence=fence)
    row = await scene.dispatch()
    assert (row["status"], row["reason"]) == ("UNASSIGNED", "NO_DRIVER_ACCEPTED")
    assert await scene.unassigned_sent() == 1


# ---- a stale zone epoch writes nothing -----------------------------------------------------


async def test_a_stale_epoch_cannot_expire(scene: Scene) -> None:
    offer_id = await scene.offer_id()
    await scene.pool.execute(
        "UPDATE offers SET expires_at = now() - interval '3 s', accept_by = now() - interval '1 s' WHERE offer_id = $1",
        offer_id,
    )
    with pytest.raises(StaleEpochError):
        await scene.store.expire(
            scene.order, [offer_id], fence=await scene.fence(stale=True)
        )
    assert await scene.offers() == [(scene.offered.driver_id, "OPEN")]
    await scene.store.expire(scene.order, [offer_id], fence=await scene.fence())
    assert await scene.offers() == [(scene.offered.driver_id, "EXPIRED")]


async def test_a_stale_epoch_cannot_give_up(scene: Scene) -> None:
    await scene.store.decline(scene.offered.driver_id, await scene.offer_id(), None)
    with pytest.raises(StaleEpochError):
        await scene.store.give_up(
            scene.order, rules=scene.rules, fence=await scene.fence(stale=True)
        )
    assert (await scene.dispatch())["status"] == "OFFERED"
    assert await scene.unassigned_sent() == 0


async def test_a_stale_epoch_cannot_make_a_round(scene: Scene) -> None:
    await scene.store.redispatch(scene.order, 60.0)
    with pytest.raises(StaleEpochError):
        await scene.store.make_round(
            scene.order,
            fence=await scene.fence(stale=True),
            rules=scene.rules,
            pick=scene.pick,
        )
    row = await scene.dispatch()
    assert (row["status"], row["round"]) == ("PENDING", 0)
    assert [s for _, s in await scene.offers()] == ["WITHDRAWN"]


async def test_a_stale_epoch_cannot_start_a_dispatch(scene: Scene) -> None:
    req = AssignRequest(
        seller_order_id="SO-fence-2",
        pickup_lat=BERLIN[0],
        pickup_lon=BERLIN[1],
        drop_lat=None,
        drop_lon=None,
    )
    with pytest.raises(StaleEpochError):
        await scene.store.open_dispatch(
            req,
            fence=await scene.fence(stale=True),
            rules=scene.rules,
            pick=scene.pick,
        )
    assert (
        await scene.pool.fetchval(
            "SELECT count(*) FROM dispatches WHERE seller_order_id = 'SO-fence-2'"
        )
        == 0
    )
    assert (
        await scene.pool.fetchval(
            "SELECT count(*) FROM offers WHERE seller_order_id = 'SO-fence-2'"
        )
        == 0
    )
