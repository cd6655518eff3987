"""Fault 5: `dispatcher serve` SIGKILLed with webhooks pending and in flight; the restart delivers all."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import ray

from dispatcher.config import ResolvedSettings
from dispatcher.embedded import free_port
from tests.support import BERLIN, WAIT_CEILING_S, WebhookReceiver, offset
from tests.support.faults import (
    ServeProcess,
    assert_booking_invariants,
    read_answer,
    remote_api,
    serve_env,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ORDERS = 6
PICKED_UP = 2
EVENTS = ORDERS + PICKED_UP
# Short POST timeout: the claim lease is timeout x ceil(50/8) + 5 s = 12 s.
WEBHOOK_TIMEOUT_S = 1.0
SCHEDULE_S = (0.0, 0.5, 1.0, *([2.0] * 27))


async def outbox(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT webhook_id, body, attempts, delivered_at, failed_at FROM webhook_outbox"
    )
    return {r["webhook_id"]: r for r in rows}


async def test_ingress_sigkilled_with_webhooks_pending(
    ray_session: None,
    zone_actors_cleanup: None,
    fault_settings: Callable[..., ResolvedSettings],
    own_pool: asyncpg.Pool,
    scripted_receiver: WebhookReceiver,
    tmp_path: Path,
    recovery: Callable[[str, float], None],
) -> None:
    settings = fault_settings(
        ray_address=ray.get_runtime_context().gcs_address,
        heartbeat_ttl_s=600,
        webhook_timeout_s=WEBHOOK_TIMEOUT_S,
        webhook_schedule_s=SCHEDULE_S,
    )
    hooks = scripted_receiver
    hooks.answer = (500, {})
    first = ServeProcess(
        serve_env(settings, port=(port1 := free_port())), tmp_path / "serve-1.log"
    )
    second = ServeProcess(
        serve_env(settings, port=(port2 := free_port())), tmp_path / "serve-2.log"
    )
    try:
        started_s = await first.start()
        print(f"first ingress listening after {started_s:.2f} s")
        answers: dict[str, bytes] = {}
        async with remote_api(f"http://127.0.0.1:{port1}", settings) as api:
            drivers = [
                await api.online_driver(*offset(*BERLIN, 0.3 * n, 0), name=f"i{n}")
                for n in range(ORDERS)
            ]
            for n in range(ORDERS):
                status, body, _ = await read_answer(
                    await api.order(f"I-{n}", *offset(*BERLIN, 0.3 * n, 0.01))
                )
                assert status == 200 and json.loads(body)["assigned"], body
                answers[f"I-{n}"] = body
            for n in range(PICKED_UP):
                driver = next(
                    d
                    for d in drivers
                    if d.driver_id == json.loads(answers[f"I-{n}"])["driverId"]
                )
                resp = await api.step(driver, f"I-{n}", "picked-up")
                assert resp.status == 200, await resp.text()

        # Every event was attempted (the receiver answers 500) and is still pending.
        async def all_attempted_twice() -> bool:
            rows = await outbox(own_pool)
            return len(rows) == EVENTS and all(
                r["attempts"] >= 2 for r in rows.values()
            )

        await wait_until(
            all_attempted_twice,
            within_s=WAIT_CEILING_S,
            what="every event attempted twice",
        )
        # Then the receiver hangs: the kill comes while POSTs are in flight.
        hooks.hold()
        held_from = len(hooks.attempts)

        async def in_flight() -> bool:
            return any(a.status == 0 for a in hooks.attempts[held_from:])

        await wait_until(
            in_flight, within_s=WAIT_CEILING_S, interval_s=0.01, what="a POST in flight"
        )
        await first.kill()
        attempted_before = hooks.attempted_ids()
        rows_before = await outbox(own_pool)
        assert set(rows_before) == attempted_before
        assert all(
            r["delivered_at"] is None and r["failed_at"] is None
            for r in rows_before.values()
        )
        print(
            f"killed with {EVENTS} events pending, {len(hooks.attempts)} attempts so far"
        )

        # The receiver is healthy again; a new ingress starts (no other replica ran meanwhile).
        hooks.release()
        hooks.answer = (204, {})
        restart_s = await second.start()
        restarted = time.monotonic()

        async def all_delivered() -> bool:
            return set(hooks.delivered()) >= set(rows_before)

        lease_s = WEBHOOK_TIMEOUT_S * 7 + 5
        await wait_until(
            all_delivered, within_s=lease_s + 15, what="every event after the restart"
        )
        recovery(
            "ingress_restart_to_all_webhooks_delivered", time.monotonic() - restarted
        )
        first_after = min(a.at for a in hooks.attempts if a.status == 204) - restarted
        recovery("ingress_restart_to_first_webhook", first_after)
        print(
            f"rows claimed by the killed process wait for their lease ({lease_s:.0f} s from the claim)"
        )
        recovery("ingress_sigkill_restart_startup", restart_s)
        await asyncio.sleep(0.5)

        delivered = hooks.delivered()
        assert set(delivered) == attempted_before, (
            "webhook-ids changed across the restart"
        )
        assert set(delivered.values()) == {1}, delivered
        sent = {a.webhook_id: a.raw for a in hooks.attempts if a.status == 204}
        assert all(sent[i] == rows_before[i]["body"].encode() for i in sent), (
            "bodies changed"
        )
        rows_after = await outbox(own_pool)
        assert all(r["delivered_at"] is not None for r in rows_after.values())
        types = sorted(json.loads(b)["type"] for b in sent.values())
        assert types == sorted(
            ["delivery.assigned"] * ORDERS + ["delivery.picked_up"] * PICKED_UP
        )
        print(
            f"{len(delivered)} events delivered once each; {len(hooks.attempts)} attempts in total"
        )

        # State survived too: a Vendure retry is replayed byte for byte by the new process.
        async with remote_api(f"http://127.0.0.1:{port2}", settings) as api:
            status, body, headers = await read_answer(
                await api.order("I-0", *offset(*BERLIN, 0, 0.01))
            )
            assert (status, body, headers.get("Idempotent-Replayed")) == (
                200,
                answers["I-0"],
                "true",
            )
        await assert_booking_invariants(own_pool)
    finally:
        await first.kill()
        await second.stop()
