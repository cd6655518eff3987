"""`dispatcher serve|migrate|zones|simulate`: settings -> embedded servers if needed -> Ray -> ingress."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from dispatcher import __version__
from dispatcher.config import ResolvedSettings, Settings
from dispatcher.errors import DispatchError
from dispatcher.runtime import Runtime
from dispatcher.store.migrate import migrate_dsn
from dispatcher.zonectl import commands as zonectl

log = logging.getLogger("dispatcher")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher", description="Delivery-driver dispatcher for Vendure."
    )
    parser.add_argument(
        "--version", action="version", version=f"dispatcher {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the HTTP ingress (starts embedded servers when unset)"
    )
    serve.add_argument(
        "--host", help="listen address (DISPATCHER_HOST, default 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=int, help="listen port (DISPATCHER_PORT, default 8080)"
    )
    sub.add_parser("migrate", help="apply database migrations and exit")
    zonectl.add_parser(sub)
    sub.add_parser(
        "simulate",
        help="play a city's drivers and orders (dispatcher simulate --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["simulate"]:
        # The simulator has its own options and, without --url, starts its own service.
        from dispatcher.simulate.cli import main as simulate_main

        return simulate_main(raw[1:])
    args = _parser().parse_args(raw)
    overrides = {
        k: v
        for k, v in (
            ("host", getattr(args, "host", None)),
            ("port", getattr(args, "port", None)),
        )
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValueError as exc:
        print(f"dispatcher: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "zones":
        return zonectl.run(args, settings)
    runtime = Runtime(settings)
    try:
        resolved = runtime.resolve()
        applied = asyncio.run(migrate_dsn(resolved.database_url))
        log.info("migrations applied: %s", ", ".join(applied) or "none (up to date)")
        if args.command == "migrate":
            return 0
        _announce(runtime, resolved)
        return _serve(resolved)
    except (DispatchError, OSError, RuntimeError) as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return 1
    finally:
        runtime.close()


def _announce(runtime: Runtime, s: ResolvedSettings) -> None:
    """Say where everything is; secrets only when this process made or loaded them."""
    if runtime.postgres is not None:
        print(f"embedded PostgreSQL: {s.database_url}", flush=True)
    if runtime.redis is not None:
        print(f"embedded Redis: {s.redis_url}", flush=True)
    labels = {
        "admin_token": "DISPATCHER_ADMIN_TOKEN",
        "inbound_secret": "DISPATCHER_INBOUND_SECRET",
        "vendure_webhook_secret": "DISPATCHER_VENDURE_WEBHOOK_SECRET",
    }
    for name, value in runtime.generated.items():
        print(f"{labels[name]}={value}  (stored in {s.data_dir})", flush=True)
    if s.vendure_webhook_url is None:
        print(
            "DISPATCHER_VENDURE_WEBHOOK_URL is unset: webhooks stay in the outbox",
            flush=True,
        )


def _serve(settings: ResolvedSettings) -> int:
    import ray

    from dispatcher.rayenv import apply_ray_env

    apply_ray_env()
    owns_ray = settings.ray_address is None
    # Blocking, so before the event loop starts.
    ray.init(
        # Unset means our own local Ray: never one that ray.init() would autodetect.
        address=settings.ray_address or "local",
        namespace=settings.ray_namespace,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        return asyncio.run(_run_ingress(settings, owns_ray))
    finally:
        if owns_ray:
            ray.shutdown()


async def _run_ingress(settings: ResolvedSettings, owns_ray: bool) -> int:
    from dispatcher.api.app import create_app
    from dispatcher.api.http_server import IngressRunner
    from dispatcher.api.keys import DISPATCHER

    app = create_app(settings)
    runner = IngressRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    # Before the listening line, which scripts wait for as the last one.
    page_host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    print(
        f"operator page: http://{page_host}:{port}/ops"
        "  (log in with DISPATCHER_ADMIN_TOKEN; docs/OPS.md)",
        flush=True,
    )
    print(f"dispatcher listening on http://{settings.host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if owns_ray:
        dispatcher = app[DISPATCHER]
        # Acknowledged pings are written while their zones are still up.
        await dispatcher.settle_pings()
        await dispatcher.shutdown_zones()
    await runner.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
