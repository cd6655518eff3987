"""Webhook target: only the configured URL is ever called; redirects are not followed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from dispatcher.config import ResolvedSettings
from tests.fuzz.state import settled
from tests.support import BERLIN, Api, WebhookReceiver, offset

pytestmark = pytest.mark.integration

READY = "/events/seller-order-ready"
CANCELLED = "/events/seller-order-cancelled"


@dataclass
class Trap:
    """An HTTP server that records any request to any path: nobody should call it."""

    url: str = ""
    hits: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def record(request: web.Request) -> web.Response:
            self.hits.append(f"{request.method} {request.path_qs}")
            return web.Response(status=204)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    server = Trap()
    await server.start()
    yield server
    await server.stop()


async def test_urls_in_request_data_are_never_called(
    api: Api, receiver: WebhookReceiver, trap: Trap, pg_pool: asyncpg.Pool
) -> None:
    """Callback-looking fields and forwarding headers do not steer the webhooks."""
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.0))
    steering = {
        "callbackUrl": f"{trap.url}/callback",
        "webhookUrl": f"{trap.url}/webhook",
        "url": f"{trap.url}/url",
        "notify": {"url": f"{trap.url}/nested", "href": f"{trap.url}/href"},
        "channelId": f"{trap.url}/channel",
        "eventId": f"{trap.url}/event",
    }
    host = trap.url.removeprefix("http://")
    forwarding = {
        "X-Forwarded-Host": host,
        "Forwarded": f"host={host}",
        "Referer": trap.url,
        "Origin": trap.url,
        "X-Callback-Url": trap.url,
    }
    raw_ready = (
        b'{"sellerOrderId": "SO-steer", "pickupLat": 52.52, "pickupLon": 13.405, '
        + ", ".join(f'"{k}": {json.dumps(v)}' for k, v in steering.items()).encode()
        + b"}"
    )
    resp = await api.client.post(
        READY, data=raw_ready, headers={**api.signed_headers(raw_ready), **forwarding}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["driverId"] == driver.driver_id
    # Lifecycle bodies and the cancel event carry URLs too.
    resp = await api.client.post(
        "/deliveries/SO-steer/picked-up",
        json={"callbackUrl": trap.url},
        headers={**driver.auth, **forwarding},
    )
    assert resp.status == 200, await resp.text()
    raw_cancel = (
        b'{"sellerOrderId": "SO-steer", "reason": "'
        + trap.url.encode()
        + b'", "callbackUrl": "'
        + trap.url.encode()
        + b'/cancel"}'
    )
    resp = await api.client.post(
        CANCELLED,
        data=raw_cancel,
        headers={**api.signed_headers(raw_cancel), **forwarding},
    )
    assert resp.status == 200, await resp.text()

    await receiver.wait_until(lambda: len(receiver.for_order("SO-steer")) == 3)
    await asyncio.sleep(0.5)  # time for any stray call to land
    assert [d.body["type"] for d in receiver.for_order("SO-steer")] == [
        "delivery.assigned",
        "delivery.picked_up",
        "delivery.cancelled",
    ]
    assert trap.hits == []
    # The outbox holds no URL at all: the target is configuration, not data.
    columns = {
        r["column_name"]
        for r in await pg_pool.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'webhook_outbox'"
        )
    }
    assert not any("url" in c for c in columns), columns


async def test_redirects_from_the_configured_url_are_not_followed_through_the_service(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    receiver: WebhookReceiver,
    trap: Trap,
    pg_pool: asyncpg.Pool,
) -> None:
    """The receiver answers 302, 307 and 308 towards the trap: each is a failed attempt,
    retried at the configured URL, and the trap never sees the event."""
    receiver.script = [
        (302, {"Location": f"{trap.url}/found"}),
        (307, {"Location": f"{trap.url}/temporary"}),
        (308, {"Location": f"{trap.url}/permanent"}),
    ]
    api: Api = await start_api(make_settings())
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.0))
    assert (await (await api.order("SO-redirect", *BERLIN)).json())[
        "driverId"
    ] == driver.driver_id

    await receiver.wait_until(lambda: len(receiver.for_order("SO-redirect")) == 1)
    await settled(
        pg_pool, receiver
    )  # the sender records the 2xx just after the receiver saw it
    row = await pg_pool.fetchrow(
        "SELECT * FROM webhook_outbox WHERE seller_order_id = 'SO-redirect'"
    )
    assert row is not None
    # Three redirects, each a failed attempt, then the fourth is delivered (204).
    assert (row["attempts"], row["last_status"]) == (4, 204) and row[
        "delivered_at"
    ] is not None
    assert receiver.script == []
    assert receiver.for_order("SO-redirect")[0].webhook_id == row["webhook_id"]
    await asyncio.sleep(0.3)
    assert trap.hits == []
