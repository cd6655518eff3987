"""Bearer tokens: every route's access rule, instant deactivation, secrets kept out of sight."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from secrets import token_hex
from typing import Any

import aiohttp
import asyncpg
import pytest
import ray
from aiohttp import ClientResponse
from redis.asyncio import Redis

from dispatcher.api.app import ROUTES
from dispatcher.config import ResolvedSettings
from dispatcher.embedded import free_port
from tests.fuzz.state import assert_unchanged, problem, settled, snapshot
from tests.support import BERLIN, VALID_BODIES, Api, Driver, WebhookReceiver, offset
from tests.support.faults import ServeProcess, serve_env
from tests.support.fixtures import kill_zone_actors

pytestmark = pytest.mark.integration

# A valid body per route, so that only the credentials decide the answer.
BODIES = {
    **VALID_BODIES,
    ("POST", "/events/seller-order-cancelled"): {"sellerOrderId": "SO-owned"},
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(
    api: Api,
    method: str,
    template: str,
    driver_id: str,
    order: str,
    headers: dict[str, str],
) -> ClientResponse:
    path = template.replace("{driverId}", driver_id).replace("{sellerOrderId}", order)
    path = path.replace("{offerId}", "ofr_none")
    body = BODIES[(method, template)]
    resp: ClientResponse = await api.client.request(
        method, path, json=body, headers=headers
    )
    return resp


async def owned_order(
    api: Api, pg_pool: asyncpg.Pool, receiver: WebhookReceiver
) -> tuple[Driver, Driver]:
    """`owner` holds SO-owned; `other` is an active, located driver of the same zone."""
    owner = await api.online_driver(*offset(*BERLIN, 0.1, 0.0), name="owner")
    resp = await api.order("SO-owned", *BERLIN)
    assert (await resp.json())["driverId"] == owner.driver_id
    other = await api.online_driver(*offset(*BERLIN, 0.3, 0.0), name="other")
    await settled(pg_pool, receiver)
    return owner, other


async def test_every_route_refuses_the_wrong_credentials_and_writes_nothing(
    api: Api, pg_pool: asyncpg.Pool, redis_client: Redis, receiver: WebhookReceiver
) -> None:
    """Driver tokens on operator routes and on another driver's routes: 403. Tokens
    instead of signatures, or nothing at all: 401. Derived from ROUTES, so a new route
    cannot slip through unlisted."""
    owner, other = await owned_order(api, pg_pool, receiver)
    guarded = {(r.method, r.path): r.auth for r in ROUTES if r.auth != "none"}
    assert set(guarded) == set(BODIES)
    before = await snapshot(pg_pool, redis_client)
    failures: list[str] = []

    async def expect(
        status: int, method: str, template: str, headers: dict[str, str], who: str
    ) -> None:
        resp = await call(api, method, template, owner.driver_id, "SO-owned", headers)
        try:
            await problem(resp, {status})
        except AssertionError as exc:
            failures.append(f"{who} on {method} {template}: {exc}")

    for (method, template), auth in guarded.items():
        if auth == "operator":
            await expect(403, method, template, owner.auth, "the driver's own token")
            await expect(403, method, template, other.auth, "a driver token")
        elif auth == "driver":
            await expect(403, method, template, other.auth, "another driver's token")
        else:  # a Vendure event: no bearer token replaces the signature
            await expect(401, method, template, api.admin, "the admin token")
            await expect(401, method, template, owner.auth, "a driver token")
        await expect(401, method, template, {}, "no credentials")
        await expect(
            401, method, template, bearer(owner.token + "x"), "a lookalike token"
        )
    assert failures == [], "\n".join(failures)
    await assert_unchanged(before, pg_pool, redis_client)


async def test_token_lookalikes_and_other_carriers_are_refused(
    api: Api, pg_pool: asyncpg.Pool
) -> None:
    driver = await api.create_driver("real")
    admin = api.settings.admin_token
    driver_id, _, secret = driver.token.partition(".")
    other_secret = base64.urlsafe_b64encode(b"\x00" * 32).decode().rstrip("=")
    lookalikes = [
        admin[:-1],
        admin + "x",
        admin.upper(),
        admin[::-1],
        f"{admin} {admin}",
        f"{driver_id}.{other_secret}",  # the right driver id, a made-up secret
        f"{driver_id}.",
        driver_id,
        secret,
        driver.token[:-1],
        driver.token + ".",
    ]
    for token in lookalikes:
        await problem(await api.client.get("/drivers", headers=bearer(token)), {401})
        await problem(
            await api.client.get(f"/drivers/{driver.driver_id}", headers=bearer(token)),
            {401},
        )
    for headers in (
        {
            "Authorization": f"Basic {base64.b64encode(f'admin:{admin}'.encode()).decode()}"
        },
        {"Authorization": admin},
        {"Authorization": f"Token {admin}"},
        {"X-Admin-Token": admin},
        {"Cookie": f"token={admin}"},
        {"X-Forwarded-Authorization": f"Bearer {admin}"},
    ):
        await problem(await api.client.get("/drivers", headers=headers), {401})
    await problem(
        await api.client.get(f"/drivers?token={admin}&access_token={admin}"), {401}
    )
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers") == 1


async def test_deactivation_stops_a_cached_token_at_once_on_every_route_and_ingress(
    start_api: Callable[[ResolvedSettings], Any],
    settings: ResolvedSettings,
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
    receiver: WebhookReceiver,
) -> None:
    """Ingress B has the token cached (it served the driver just before); the operator
    deactivates the driver through ingress A; B refuses the very next request."""
    a: Api = await start_api(settings)
    b: Api = await start_api(settings)
    owner, _ = await owned_order(a, pg_pool, receiver)
    # B learns the token: a read and a ping.
    assert (
        await b.client.get(f"/drivers/{owner.driver_id}", headers=owner.auth)
    ).status == 200
    assert (await b.ping(owner, *offset(*BERLIN, 0.11, 0.0))).status == 204
    await settled(pg_pool, receiver)

    resp = await a.client.patch(
        f"/drivers/{owner.driver_id}", json={"isActive": False}, headers=a.admin
    )
    assert resp.status == 200, await resp.text()
    before = await snapshot(pg_pool, redis_client)
    failures: list[str] = []
    for (method, template), auth in {
        (r.method, r.path): r.auth for r in ROUTES
    }.items():
        if auth != "driver":
            continue
        resp = await call(b, method, template, owner.driver_id, "SO-owned", owner.auth)
        if resp.status != 403:
            failures.append(f"{method} {template}: {resp.status} {await resp.text()}")
    # The gateway batch, through B, refuses the deactivated driver's fix as well.
    batch = await b.client.post(
        "/drivers/locations",
        json={
            "pings": [{"driverId": owner.driver_id, "lat": BERLIN[0], "lon": BERLIN[1]}]
        },
        headers=b.admin,
    )
    assert await batch.json() == {
        "accepted": 0,
        "rejected": [{"index": 0, "detail": "driver is deactivated"}],
    }
    assert failures == [], "\n".join(failures)
    await assert_unchanged(before, pg_pool, redis_client)

    # Reactivated through A: B lets the token in again at once.
    resp = await a.client.patch(
        f"/drivers/{owner.driver_id}", json={"isActive": True}, headers=a.admin
    )
    assert resp.status == 200
    assert (
        await b.client.get("/deliveries/SO-owned", headers=owner.auth)
    ).status == 200


def _secret_values(settings: ResolvedSettings, extra: list[str]) -> dict[str, str]:
    values = {
        "admin token": settings.admin_token,
        "inbound secret": settings.inbound_secret,
        "inbound key": settings.inbound_secret.removeprefix("whsec_"),
        "webhook secret": settings.vendure_webhook_secret,
        "webhook key": settings.vendure_webhook_secret.removeprefix("whsec_"),
    }
    values.update({f"secret {n}": v for n, v in enumerate(extra)})
    return values


def _leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


def _scan_files(
    folder: Path, secrets: dict[str, str]
) -> tuple[int, dict[str, list[str]]]:
    """How many files under `folder` were read, and which of them hold a secret."""
    files = [
        p for p in folder.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
    ]
    found = {str(p): _leaks(p.read_text(errors="replace"), secrets) for p in files}
    return len(files), {k: v for k, v in found.items() if v}


async def _hostile_session(api: Api, drivers: list[Driver]) -> list[tuple[str, str]]:
    """Requests that fail in every way, carrying the secrets where they do not belong.
    Returns every answer as (status line and headers, body) for the leak check."""
    s = api.settings
    admin, token = s.admin_token, drivers[0].token
    answers: list[tuple[str, str]] = []

    async def keep(resp: ClientResponse) -> None:
        answers.append((f"{resp.status} {dict(resp.headers)}", await resp.text()))

    json_headers = {"Content-Type": "application/json"}
    for bad in (admin + "x", admin[:-1], token + "x", f"{token} {admin}"):
        await keep(await api.client.get("/drivers", headers=bearer(bad)))
        await keep(
            await api.client.get(
                f"/drivers/{drivers[1].driver_id}", headers=bearer(bad)
            )
        )
    await keep(await api.client.get("/zones", headers=drivers[0].auth))
    await keep(
        await api.client.get(
            f"/drivers/{drivers[1].driver_id}", headers=drivers[0].auth
        )
    )
    await keep(
        await api.client.post(
            "/drivers",
            json={"name": 5, "phone": admin, "vehicleType": s.inbound_secret},
            headers=api.admin,
        )
    )
    await keep(
        await api.client.post(
            "/drivers", json={"name": "x", admin: token}, headers=api.admin
        )
    )
    await keep(
        await api.client.patch(
            f"/drivers/{drivers[0].driver_id}/location",
            json={"lat": admin, "lon": token, "recordedAt": s.inbound_secret},
            headers=drivers[0].auth,
        )
    )
    await keep(
        await api.client.post(
            "/drivers/locations",
            json={
                "pings": [
                    {"driverId": token, "lat": 1, "lon": 2},
                    {"driverId": admin, "lat": admin, "lon": 2},
                    admin,
                ]
            },
            headers=api.admin,
        )
    )
    # (No secret in a URL: the test server's access log records request lines, and a
    # token in a URL is the client's leak. `dispatcher serve` runs without an access log.)
    await keep(
        await api.client.get("/drivers?zoneId=x&status=SLEEPING", headers=bearer(admin))
    )
    await keep(
        await api.client.post(
            "/deliveries/SO-none/failed",
            json={"reason": 7, "x": admin},
            headers=drivers[0].auth,
        )
    )
    raw = json.dumps(
        {"sellerOrderId": 5.5, "pickupLat": admin, "pickupLon": token}
    ).encode()
    await keep(
        await api.client.post(
            "/events/seller-order-ready", data=raw, headers=api.signed_headers(raw)
        )
    )
    for signature in (
        s.inbound_secret,
        f"v1,{s.inbound_secret}",
        f"v1,{admin}",
        s.vendure_webhook_secret,
    ):
        await keep(
            await api.client.post(
                "/events/seller-order-ready",
                data=raw,
                headers={
                    **json_headers,
                    "webhook-id": admin,
                    "webhook-timestamp": "1",
                    "webhook-signature": signature,
                },
            )
        )
    wrong_key = api.signed_headers(raw, secret=s.vendure_webhook_secret)
    await keep(
        await api.client.post(
            "/events/seller-order-cancelled", data=raw, headers=wrong_key
        )
    )
    # Successes too: the order (a webhook is sent) and its lifecycle.
    await keep(await api.order("SO-leak", *BERLIN))
    await keep(await api.step(drivers[0], "SO-leak", "picked-up"))
    await keep(
        await api.step(drivers[0], "SO-leak", "failed", {"reason": "no one home"})
    )
    for path in ("/metrics", "/ready", "/openapi.json", "/health"):
        await keep(await api.client.get(path))
    return answers


async def test_tokens_and_secrets_never_appear_in_logs_errors_or_metrics(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    receiver: WebhookReceiver,
    pg_pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url_password, url_token = "pw-" + token_hex(12), "qt-" + token_hex(12)
    webhook_url = (
        receiver.url.replace("http://", f"http://hooks:{url_password}@")
        + f"?token={url_token}"
    )
    for name in ("dispatcher", "aiohttp", "asyncio", ""):
        caplog.set_level(logging.DEBUG, logger=name)
    api: Api = await start_api(make_settings(vendure_webhook_url=webhook_url))
    receiver.script = [500, 429, 302]  # the sender logs each failed attempt
    drivers = [
        await api.online_driver(*offset(*BERLIN, 0.1 * i, 0.0), name=f"d{i}")
        for i in (1, 2)
    ]
    answers = await _hostile_session(api, drivers)
    await receiver.wait_until(lambda: len(receiver.received) >= 3)
    await settled(pg_pool, receiver)
    await asyncio.sleep(0.2)

    secrets = _secret_values(
        api.settings, [d.token for d in drivers] + [url_password, url_token]
    )
    records = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''} {r.args!r}"
        for r in caplog.records
    )
    assert (
        "attempt 1 failed" in records
    )  # the sender did log, and at DEBUG everything is on
    assert _leaks(records, secrets) == []
    assert _leaks(caplog.text, secrets) == []
    leaked = {f"{head[:60]}": _leaks(head + body, secrets) for head, body in answers}
    assert {k: v for k, v in leaked.items() if v} == {}
    # Zone actors log to Ray's files (and get their settings with the secrets redacted).
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())  # type: ignore[attr-defined]
    scanned, found = await asyncio.to_thread(_scan_files, logs_dir, secrets)
    assert scanned > 0
    assert found == {}


async def test_serve_never_prints_secrets_it_was_given(
    settings: ResolvedSettings, ray_session: None, pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """`dispatcher serve` at DEBUG: stdout and stderr hold none of the configured secrets
    (it prints only secrets it generated itself: docs/CONFIGURATION.md), through failures and successes."""
    port = free_port()
    resolved = settings.model_copy(
        update={
            "ray_address": ray.get_runtime_context().gcs_address,
            "data_dir": tmp_path / "data",
        }
    )
    env = serve_env(resolved, port=port)
    env["DISPATCHER_LOG_LEVEL"] = "DEBUG"
    log_path = tmp_path / "serve.log"
    serve = ServeProcess(env, log_path)
    stdout = b""
    try:
        await serve.start()
        base = f"http://127.0.0.1:{port}"
        admin = bearer(settings.admin_token)
        async with aiohttp.ClientSession(base_url=base) as http:
            created = await (
                await http.post("/drivers", json={"name": "cli"}, headers=admin)
            ).json()
            for headers in (
                bearer(settings.admin_token + "x"),
                bearer(created["token"] + "x"),
                {},
            ):
                assert (await http.get("/drivers", headers=headers)).status == 401
            assert (
                await http.get("/zones", headers=bearer(created["token"]))
            ).status == 403
            assert (
                await http.post(
                    "/events/seller-order-ready",
                    data=b"{}",
                    headers={
                        "webhook-id": "x",
                        "webhook-timestamp": "1",
                        "webhook-signature": settings.inbound_secret,
                    },
                )
            ).status == 401
            resp = await http.patch(
                f"/drivers/{created['driverId']}/location",
                json={"lat": 52.52, "lon": 13.405},
                headers=bearer(created["token"]),
            )
            assert resp.status == 204, await resp.text()
    finally:
        await serve.stop()
        # Its zones are detached actors on the session's Ray: end them like start_api does.
        await asyncio.to_thread(kill_zone_actors)
        if serve.proc is not None and serve.proc.stdout is not None:
            with contextlib.suppress(Exception):
                stdout = await serve.proc.stdout.read()
    output = stdout.decode(errors="replace") + log_path.read_text(errors="replace")
    assert "DEBUG" in output or "INFO" in output, output[-2000:]
    secrets = _secret_values(settings, [created["token"]])
    assert _leaks(output, secrets) == [], output[-3000:]
