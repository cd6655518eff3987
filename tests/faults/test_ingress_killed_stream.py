"""`dispatcher serve` SIGKILLed with driver sockets open: clients resume on the other replica, losing nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import ray

from dispatcher.config import ResolvedSettings
from dispatcher.embedded import free_port
from tests.faults.helpers import ServeProcess, remote_api, serve_env, wait_until
from tests.streams import Follower, connector_session
from tests.support import BERLIN, Api, offset

pytestmark = pytest.mark.integration

DRIVERS = 12


async def heads(pool: asyncpg.Pool) -> dict[str, int]:
    return {
        r["driver_id"]: r["seq"]
        for r in await pool.fetch("SELECT driver_id, seq FROM driver_event_seq")
    }


@pytest.mark.timeout(300)
async def test_sockets_resume_on_the_other_replica_after_sigkill(
    ray_session: None,
    zone_actors_cleanup: None,
    fault_settings: Callable[..., ResolvedSettings],
    own_pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    settings = fault_settings(
        ray_address=ray.get_runtime_context().gcs_address, heartbeat_ttl_s=600
    )
    first = ServeProcess(
        serve_env(settings, port=(port1 := free_port())), tmp_path / "serve-1.log"
    )
    second = ServeProcess(
        serve_env(settings, port=(port2 := free_port())), tmp_path / "serve-2.log"
    )
    urls = [f"http://127.0.0.1:{port1}", f"http://127.0.0.1:{port2}"]
    spots = [offset(*BERLIN, 0.4 * n, 0) for n in range(DRIVERS)]
    followers: list[Follower] = []
    try:
        await asyncio.gather(first.start(), second.start())
        async with (
            connector_session() as session,
            remote_api(urls[0], settings) as one,
            remote_api(urls[1], settings) as two,
        ):
            drivers = [
                await one.online_driver(*spot, name=f"k{n}")
                for n, spot in enumerate(spots)
            ]
            # Everyone starts on the first replica (the list order), and moves on at a close.
            followers = [Follower(session, urls, d).start() for d in drivers]

            async def all_(predicate: Callable[[Follower], bool]) -> bool:
                return all(predicate(f) for f in followers)

            await wait_until(
                lambda: all_(lambda f: f.connects == 1),
                within_s=30,
                what="all connected",
            )

            async def book(api: Api, prefix: str) -> None:
                for n, spot in enumerate(spots):
                    resp = await api.order(f"{prefix}-{n}", *spot)
                    assert (await resp.json())["assigned"], await resp.text()

            await book(one, "K")
            await wait_until(
                lambda: all_(lambda f: f.seqs == [1]), within_s=30, what="first events"
            )

            # Killed with every socket open; bookings go on through the other replica at once.
            await first.kill()
            for n in range(DRIVERS):
                assert (await two.cancel(f"K-{n}")).status == 200
            for d, spot in zip(drivers, spots, strict=True):
                assert (await two.ping(d, *spot)).status == 204
            await book(two, "L")

            expected = await heads(own_pool)
            assert set(expected.values()) == {3}

            async def caught_up() -> bool:
                return all(
                    f.seqs[-1:] == [expected[f.driver.driver_id]] for f in followers
                )

            await wait_until(
                caught_up,
                within_s=60,
                what="every follower caught up on the other replica",
            )
            await asyncio.sleep(0.5)
            for f in followers:
                assert f.seqs == [1, 2, 3], f.seqs
                assert [m["type"] for m in f.messages] == [
                    "delivery.assigned",
                    "delivery.cancelled",
                    "delivery.assigned",
                ]
                assert f.connects == 2 and f.close_codes[0] == 1006
                # Each event is this driver's own booking.
                assert {m["data"]["sellerOrderId"] for m in f.messages} == {
                    r["seller_order_id"]
                    for r in await own_pool.fetch(
                        "SELECT seller_order_id FROM deliveries WHERE driver_id = $1",
                        f.driver.driver_id,
                    )
                }
            print(
                f"\n{DRIVERS} drivers resumed on the other replica; every event once, in order"
            )

            # A graceful stop closes with 1001 ("going away").
            await second.stop()
            await wait_until(
                lambda: all_(lambda f: len(f.close_codes) == 2),
                within_s=30,
                what="closed",
            )
            assert {f.close_codes[1] for f in followers} == {1001}
    finally:
        for f in followers:
            await f.stop()
        await first.kill()
        await second.stop()
