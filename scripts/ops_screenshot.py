"""Screenshot the operator page of a running service (the README's docs/img/ops.png).

Usage (a service with traffic, e.g. `dispatcher simulate --url ...` playing against it):
    DISPATCHER_ADMIN_TOKEN=adm_... python scripts/ops_screenshot.py \\
        http://127.0.0.1:8080 docs/img/ops.png

Drives Debian's /usr/bin/chromium through Playwright, as tests/browser does; it never
downloads a browser.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from playwright.async_api import async_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def shoot(url: str, token: str, out: str, settle_s: float) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page(viewport={"width": 1400, "height": 860})
        await page.goto(url.rstrip("/") + "/ops")
        await page.fill("#token", token)
        await page.click("#login-form button[type=submit]")
        await page.mouse.move(0, 0)
        await page.wait_for_selector("#map path.driver", timeout=60_000)
        # A few polls, so that the countdowns and dots have moved at least once.
        await asyncio.sleep(settle_s)
        await page.screenshot(path=out)
        await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service, e.g. http://127.0.0.1:8080")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait")
    args = parser.parse_args()
    token = os.environ["DISPATCHER_ADMIN_TOKEN"]
    asyncio.run(shoot(args.url, token, args.out, args.settle))


if __name__ == "__main__":
    main()
