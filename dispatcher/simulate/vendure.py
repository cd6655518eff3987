"""The Vendure stand-in: signed seller-order events out, verified `delivery.*` webhooks in."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from dispatcher.simulate.city import Point
from dispatcher.webhooks.signing import InvalidSignatureError, sign, verify


class VendureStandIn:
    """Sends what a Vendure plugin sends and counts what the service sends back.

    Events are signed with the inbound secret exactly as Vendure signs them (Standard
    Webhooks). Webhooks are verified with the outgoing secret when it is known (the
    simulator started the service); otherwise they are counted unverified.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        inbound_secret: str,
        webhook_secret: str | None,
    ) -> None:
        self.session = session
        self.inbound_secret = inbound_secret
        self.webhook_secret = webhook_secret
        self.received: Counter[str] = Counter()
        self.rejected = 0
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    async def start_receiver(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/webhooks", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound = self._runner.addresses[0][1]
        self.url = f"http://{host}:{bound}/webhooks"
        return self.url

    async def stop_receiver(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if self.webhook_secret is not None:
            try:
                verify([self.webhook_secret], request.headers, raw)
            except InvalidSignatureError:
                self.rejected += 1
                return web.Response(status=401)
        try:
            event_type = str(json.loads(raw)["type"])
        except (ValueError, KeyError, TypeError):
            self.rejected += 1
            return web.Response(status=400)
        self.received[event_type] += 1
        return web.Response(status=204)

    async def order_ready(
        self, seller_order_id: str, pickup: Point, drop: Point
    ) -> tuple[int, dict[str, Any]]:
        body = {
            "eventId": "evt_" + uuid.uuid4().hex,
            "sellerOrderId": seller_order_id,
            "channelId": "simulator",
            "pickup": {"lat": pickup[0], "lon": pickup[1]},
            "drop": {"lat": drop[0], "lon": drop[1]},
        }
        return await self._post("/events/seller-order-ready", body)

    async def order_cancelled(
        self, seller_order_id: str, reason: str
    ) -> tuple[int, dict[str, Any]]:
        return await self._post(
            "/events/seller-order-cancelled",
            {"sellerOrderId": seller_order_id, "reason": reason},
        )

    async def _post(
        self, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        raw = json.dumps(body).encode()
        msg_id = "msg_" + uuid.uuid4().hex
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(self.inbound_secret, msg_id, ts, raw),
        }
        async with self.session.post(path, data=raw, headers=headers) as resp:
            answer: dict[str, Any] = await resp.json(content_type=None)
            return resp.status, answer
