"""A real headless Chromium (Debian's, never a downloaded one) driven by Playwright."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, Page, Request, Route, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
# No phoning home: no component updates, sync, field trials or first-run pages.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Generous: the page's own work is milliseconds, the machine may be loaded.
STEP_TIMEOUT_MS = 20_000


@pytest.fixture
def chromium() -> Path:
    """Missing is a failure, not a skip: a browser test that never runs proves nothing."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it)"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@dataclass
class OpsPage:
    """The page under test and everything it asked for or complained about."""

    page: Page
    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def outside_loopback(self) -> list[str]:
        return [
            r.url
            for r in self.requests
            if urlsplit(r.url).scheme not in {"data", "blob"}
            and urlsplit(r.url).hostname not in LOOPBACK
        ]

    async def log_in(self, token: str) -> None:
        await self.page.fill("#token", token)
        await self.page.click("#login-form button[type=submit]")
        # Off the map, so that no hover tooltip covers the screenshot.
        await self.page.mouse.move(0, 0)

    async def drawn_drivers(self) -> int:
        return await self.page.locator("#map path.driver").count()


OpsPageOpener = Callable[[str], Awaitable[OpsPage]]


@pytest.fixture
async def open_ops(
    browser: Browser, request: pytest.FixtureRequest, shots: Path
) -> AsyncIterator[OpsPageOpener]:
    pages: list[OpsPage] = []

    async def opener(url: str) -> OpsPage:
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        ops = OpsPage(page)
        page.on("request", lambda r: ops.requests.append(r))
        page.on("pageerror", lambda exc: ops.errors.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: (
                ops.errors.append(f"console: {msg.text}")
                if msg.type == "error"
                else None
            ),
        )

        # Anything that would leave loopback is recorded above and refused here.
        async def guard(route: Route) -> None:
            host = urlsplit(route.request.url).hostname
            if host in LOOPBACK:
                await route.continue_()
            else:
                await route.abort()

        await context.route(re.compile(r"^https?://"), guard)
        await page.goto(url)
        pages.append(ops)
        return ops

    yield opener
    name = re.sub(r"[^\w.-]", "_", request.node.name)
    for n, ops in enumerate(pages):
        # The screenshot is the test's artifact, kept under the session's basetemp.
        await ops.page.screenshot(path=str(shots / f"{name}-{n}.png"))
        await ops.page.context.close()


@pytest.fixture
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "browser-shots"
    folder.mkdir(exist_ok=True)
    return folder
