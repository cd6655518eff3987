"""The operator page in a real headless Chromium against the real service."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dispatcher.config import ResolvedSettings
from tests.browser.conftest import OpsPage, OpsPageOpener
from tests.support import BERLIN, Api, offset

pytestmark = pytest.mark.browser

StartApi = Callable[[ResolvedSettings], Awaitable[Api]]
# The page must show a ping's move within this of its write (the page's promise).
MOVE_WITHIN_MS = 3_000
MOVES = 12


def page_url(api: Api) -> str:
    return str(api.client.make_url("/ops"))


async def api_snapshot(api: Api) -> dict[str, Any]:
    resp = await api.client.get("/ops/snapshot", headers=api.admin)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def logged_in(open_ops: OpsPageOpener, api: Api, drivers: int) -> OpsPage:
    ops = await open_ops(page_url(api))
    await ops.log_in(api.settings.admin_token)
    await ops.page.wait_for_selector(f'#map[data-drivers="{drivers}"]')
    return ops


async def test_the_page_loads_from_loopback_only_and_draws_every_driver_the_api_counts(
    api: Api, open_ops: OpsPageOpener
) -> None:
    for n in range(6):
        await api.online_driver(*offset(*BERLIN, 0.4 * n, 0.3 * (n % 3)), name=f"d{n}")
    await api.create_driver("off shift")
    counts = (await api_snapshot(api))["counts"]
    assert counts["drivers"] == 6 and counts["offline"] == 1

    ops = await logged_in(open_ops, api, counts["drivers"])
    assert await ops.drawn_drivers() == counts["drivers"]
    await ops.page.wait_for_selector('[data-count="available"]:text-is("6")')
    assert await ops.page.locator('[data-count="offline"]').inner_text() == "1"
    assert await ops.page.locator("#map path.zone").count() >= 1

    assert ops.requests, "no request was recorded"
    assert ops.outside_loopback() == []
    token = api.settings.admin_token
    assert [r.url for r in ops.requests if token in r.url] == []
    snapshot_calls = [r for r in ops.requests if r.url.endswith("/ops/snapshot")]
    assert snapshot_calls
    assert (await snapshot_calls[0].all_headers())["authorization"] == f"Bearer {token}"
    # The policy refused nothing and no script failed.
    assert ops.errors == []


async def test_a_ping_moves_its_driver_within_3_s(
    api: Api, open_ops: OpsPageOpener, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = await api.online_driver(*BERLIN, name="mover")
    await api.online_driver(*offset(*BERLIN, 1.0, 1.0), name="still")
    ops = await logged_in(open_ops, api, 2)
    dot = f'#map path.driver[data-driver-id="{driver.driver_id}"]'
    latencies_ms: list[float] = []
    for step in range(1, MOVES + 1):
        lat, lon = offset(*BERLIN, 0.0, 0.15 * step)
        before = await ops.page.get_attribute(dot, "d")
        started = time.perf_counter()
        # The latency counts from here: the ping's request.
        resp = await api.client.patch(
            f"/drivers/{driver.driver_id}/location",
            json={"lat": lat, "lon": lon},
            headers=driver.auth,
        )
        assert resp.status == 204, await resp.text()
        # The write-behind flush is the ingress's (its own tests bound it); on a loaded
        # machine a zone call can take seconds. The page's promise starts at the write:
        await api.settle()
        # The dot's drawn geometry changed and it is where the ping put it.
        await ops.page.wait_for_function(
            """([selector, lat, before]) => {
                const el = document.querySelector(selector);
                return el !== null && el.dataset.lat === String(lat)
                    && el.getAttribute("d") !== before;
            }""",
            arg=[dot, lat, before],
            timeout=MOVE_WITHIN_MS,
            polling=20,
        )
        latencies_ms.append((time.perf_counter() - started) * 1000)
    p50 = statistics.median(latencies_ms)
    p95 = statistics.quantiles(latencies_ms, n=20, method="inclusive")[-1]
    with capsys.disabled():
        print(
            f"\nping -> dot: n={len(latencies_ms)} p50={p50:.0f} ms p95={p95:.0f} ms"
            f" max={max(latencies_ms):.0f} ms"
        )
    assert await ops.drawn_drivers() == 2
    assert ops.errors == []


async def test_an_offered_order_shows_its_countdown(
    start_api: StartApi,
    make_settings: Callable[..., ResolvedSettings],
    open_ops: OpsPageOpener,
) -> None:
    api = await start_api(make_settings(offer_mode="cascade", offer_timeout_s=60))
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.0))
    resp = await api.order("SO-countdown", *BERLIN)
    assert (await resp.json())["reason"] == "AWAITING_ACCEPTANCE"

    ops = await logged_in(open_ops, api, 1)
    row = ops.page.locator("#queue-offered li", has_text="SO-countdown")
    await row.wait_for()
    countdown = row.locator(".countdown")
    first = await countdown.inner_text()
    assert re.fullmatch(r"\d+ s", first), first
    assert 0 < int(first.split()[0]) <= 60
    # It counts down in the browser, between snapshots.
    await ops.page.wait_for_function(
        """([selector, first]) => {
            const el = document.querySelector(selector);
            return el !== null && parseInt(el.textContent, 10) < parseInt(first, 10);
        }""",
        arg=["#queue-offered li .countdown", first],
    )
    await ops.page.wait_for_selector(
        f'#map path.driver[data-driver-id="{driver.driver_id}"][data-state="offered"]'
    )
    assert await ops.page.locator('[data-count="offeredOrders"]').inner_text() == "1"
    assert ops.errors == []


async def test_a_wrong_token_shows_a_login_error_and_no_data(
    api: Api, open_ops: OpsPageOpener
) -> None:
    await api.online_driver(*BERLIN)
    ops = await open_ops(page_url(api))
    await ops.log_in("adm_not_the_token")
    error = ops.page.locator("#login-error")
    await error.wait_for(state="visible")
    assert "Wrong token" in await error.inner_text()
    assert await ops.page.locator("#ops").is_hidden()
    assert await ops.drawn_drivers() == 0
    assert await ops.page.locator("#queue-offered li").count() == 0
    counts = await ops.page.locator("[data-count]").all_inner_texts()
    # Every count shows the placeholder (an en dash), none a number.
    assert set(counts) == {"\u2013"}
    stored = await ops.page.evaluate("JSON.stringify(sessionStorage)")
    assert json.loads(stored) == {}
    answers = [
        await r.response() for r in ops.requests if r.url.endswith("/ops/snapshot")
    ]
    assert [a.status for a in answers if a is not None] == [401]
    assert ops.outside_loopback() == []

    # The right token then shows the data.
    await ops.log_in(api.settings.admin_token)
    await ops.page.wait_for_selector('#map[data-drivers="1"]')
    assert await error.is_hidden()
