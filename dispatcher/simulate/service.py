"""The service a live run starts for itself when given no `--url`: `dispatcher serve`'s pieces, in-process."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from dispatcher.config import ResolvedSettings, Settings
from dispatcher.runtime import Runtime
from dispatcher.store.migrate import migrate_dsn

# Its own place under the data dir: a `dispatcher serve` running beside the simulator
# keeps its embedded servers, its secrets and its drivers to itself.
SIMULATOR_DIR = "simulator"


def simulator_settings(base: Settings, **overrides: Any) -> Settings:
    """`base` (the DISPATCHER_* environment) with the simulator's data dir and overrides."""
    return Settings.model_validate(
        {
            **base.model_dump(),
            "data_dir": Path(base.data_dir) / SIMULATOR_DIR,
            **overrides,
        }
    )


@contextlib.contextmanager
def resolved_service(settings: Settings) -> Iterator[ResolvedSettings]:
    """Embedded PostgreSQL and Redis (when unset), migrations, secrets, and Ray: what
    `dispatcher serve` does before it listens. Stops them in reverse order."""
    import asyncio

    import ray

    from dispatcher.rayenv import apply_ray_env

    runtime = Runtime(settings)
    try:
        resolved = runtime.resolve()
        asyncio.run(migrate_dsn(resolved.database_url))
        apply_ray_env()
        # "local": a new Ray of our own, never another user's instance on this machine.
        ray.init(
            address=resolved.ray_address or "local",
            namespace=resolved.ray_namespace,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        try:
            yield resolved
        finally:
            ray.shutdown()
    finally:
        runtime.close()


@contextlib.asynccontextmanager
async def ingress(settings: ResolvedSettings) -> AsyncIterator[str]:
    """The aiohttp ingress on `settings.host`/`port` (0: a free port); yields its URL."""
    from dispatcher.api.app import create_app
    from dispatcher.api.keys import DISPATCHER

    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        port = runner.addresses[0][1]
        yield f"http://{settings.host}:{port}"
        dispatcher = app[DISPATCHER]
        # As `serve` does on its way out: acknowledged pings are written while their
        # zones are still up, then the zones it owns stop with it.
        await dispatcher.settle_pings()
        if settings.ray_address is None:
            await dispatcher.zones.shutdown_all(sorted(dispatcher.router.known))
    finally:
        await runner.cleanup()
