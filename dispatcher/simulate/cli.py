"""`dispatcher simulate`: parse, pick the city and the defaults, run live or offline, print the summary."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from dispatcher.config import ResolvedSettings, Settings
from dispatcher.embedded import free_port
from dispatcher.offers.policy import OfferRules
from dispatcher.simulate.city import City
from dispatcher.simulate.progress import RunProgress
from dispatcher.simulate.settings import RunSettings
from dispatcher.simulate.summary import RunResult, format_table

SCENARIOS = ("manhattan", "synthetic")
OFFER_MODES = ("auto", "cascade", "wave")
# The service refuses a fix implying more than this (DISPATCHER_MAX_PING_SPEED_KMH's
# default): compressed live time must keep drivers under it on the wall clock.
SERVICE_MAX_PING_SPEED_KMH = 250.0
# A city's fastest straight-line speed, for that check (Manhattan's source peaks ~25 km/h).
FASTEST_CITY_KMH = 30.0


@dataclass(frozen=True, slots=True)
class Defaults:
    drivers: int
    demand: float


# Sized so that drivers are busy about a third to a half of their shift. Live runs put
# every driver on shift at once; offline ones spread daily shifts over the day.
DEFAULTS = {
    ("synthetic", "offline"): Defaults(drivers=350, demand=1.0),
    ("manhattan", "offline"): Defaults(drivers=150, demand=0.005),
    ("synthetic", "live"): Defaults(drivers=30, demand=1.0),
    ("manhattan", "live"): Defaults(drivers=40, demand=0.005),
}
LIVE_SPEED = 5.0
LIVE_START_HOUR = 12.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dispatcher simulate",
        description="Play a city's drivers and orders against the service (live, the default) "
        "or against its decision rule in virtual time (--offline). Ends with a summary table.",
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="manhattan",
        help="city model: manhattan (2018 taxi demand, the default) or synthetic",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="same seed, same orders and drivers (default 1)",
    )
    p.add_argument(
        "--drivers",
        type=_positive_int,
        help="fleet size (default per scenario, see docs/SIMULATOR.md)",
    )
    p.add_argument(
        "--demand",
        type=_positive_float,
        help="demand scale: Manhattan's share of taxi trips, synthetic's multiplier",
    )
    p.add_argument(
        "--start-hour",
        type=_hour,
        help="hour of day the run starts (live 12, offline 0)",
    )
    p.add_argument(
        "--offer-mode",
        choices=OFFER_MODES,
        help="auto books the nearest driver at once; cascade and wave offer the job and "
        "wait for an accept (default: DISPATCHER_OFFER_MODE, else auto)",
    )
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="also write a Markdown report with PNG plots here",
    )
    live = p.add_argument_group("live (default)")
    live.add_argument(
        "--url",
        help="a running service; without it one is started with embedded defaults",
    )
    live.add_argument(
        "--minutes",
        type=_positive_float,
        help="wall-clock minutes of orders (default 5)",
    )
    live.add_argument(
        "--speed",
        type=_positive_float,
        help=f"simulated seconds per wall second (default {LIVE_SPEED:g})",
    )
    live.add_argument(
        "--open", action="store_true", help="print the operator page's address"
    )
    live.add_argument(
        "--admin-token", help="operator token for --url (or DISPATCHER_ADMIN_TOKEN)"
    )
    live.add_argument(
        "--inbound-secret",
        help="whsec_ key for --url's Vendure events (or DISPATCHER_INBOUND_SECRET)",
    )
    live.add_argument(
        "--receiver-port",
        type=_port,
        help="with --url: receive webhooks on this port (point the service's webhook URL at it)",
    )
    offline = p.add_argument_group("offline")
    offline.add_argument(
        "--offline",
        action="store_true",
        help="virtual time against the auto-mode rule, no service",
    )
    offline.add_argument(
        "--hours", type=_positive_float, help="simulated hours (default 24)"
    )
    return p


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _hour(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an hour: {text!r}") from None
    if not 0 <= value < 24:
        raise argparse.ArgumentTypeError(f"must be in [0, 24): {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return value


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; each is a usage error (exit 2)."""
    if args.offline:
        live_only = [
            f
            for f, v in (
                ("--url", args.url),
                ("--minutes", args.minutes),
                ("--speed", args.speed),
                ("--open", args.open),
                ("--receiver-port", args.receiver_port),
                ("--admin-token", args.admin_token),
                ("--inbound-secret", args.inbound_secret),
            )
            if v
        ]
        if live_only:
            p.error(
                f"{', '.join(live_only)} only apply to live runs, not with --offline"
            )
    else:
        if args.hours is not None:
            p.error("--hours applies to --offline runs; live runs take --minutes")
        if args.url is not None and not args.url.startswith(("http://", "https://")):
            p.error(f"--url must be an http(s) URL, got {args.url!r}")
        if args.url is None and args.receiver_port is not None:
            p.error(
                "--receiver-port applies to --url runs (the simulator wires its own service)"
            )


def make_city(scenario: str) -> City:
    if scenario == "manhattan":
        from dispatcher.simulate.manhattan import ManhattanCity

        return ManhattanCity()
    from dispatcher.simulate.synthetic import SyntheticCity

    return SyntheticCity()


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    _check(p, args)
    try:
        env = Settings()
    except ValueError as exc:
        print(f"dispatcher simulate: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    mode = "offline" if args.offline else "live"
    defaults = DEFAULTS[(args.scenario, mode)]
    start = (
        args.start_hour
        if args.start_hour is not None
        else (0.0 if args.offline else LIVE_START_HOUR)
    )
    run = RunSettings(
        seed=args.seed,
        start_hour=start,
        hours=args.hours if args.hours is not None else 24.0,
        drivers=args.drivers if args.drivers is not None else defaults.drivers,
        demand_scale=args.demand if args.demand is not None else defaults.demand,
    )
    city = make_city(args.scenario)
    if args.offer_mode is not None:
        env = env.model_copy(update={"offer_mode": args.offer_mode})
    if args.offline:
        result = _offline(city, run, env.offer_rules())
    else:
        result_or_code = _live(p, args, env, city, run)
        if isinstance(result_or_code, int):
            return result_or_code
        result = result_or_code
    print(format_table(result), flush=True)
    if args.report is not None:
        from dispatcher.simulate.report import ReportUnavailableError, write_report

        try:
            files = write_report(result, args.report)
        except ReportUnavailableError as exc:
            print(f"dispatcher simulate: {exc}", file=sys.stderr)
            return 1
        print(f"report: {files[-1]}", file=sys.stderr)
    return 0


def _offline(city: City, run: RunSettings, rules: OfferRules) -> RunResult:
    from dispatcher.simulate.engine import run_offline

    progress = RunProgress(f"{city.name} offline {rules.mode} {run.hours:g} h")
    try:
        return run_offline(city, run, progress=progress.update, offer_rules=rules)
    finally:
        progress.close()


def _live(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    env: Settings,
    city: City,
    run: RunSettings,
) -> RunResult | int:
    from dispatcher.simulate.live import LiveRunner, LiveTarget

    minutes = args.minutes if args.minutes is not None else 5.0
    speed = args.speed if args.speed is not None else LIVE_SPEED
    wall_kmh = FASTEST_CITY_KMH * run.driver.speed_factor * speed
    progress = RunProgress(f"{city.name} live {minutes:g} min x{speed:g}")
    if args.url is not None:
        admin = args.admin_token or env.admin_token
        inbound = args.inbound_secret or env.inbound_secret
        if not admin or not inbound:
            p.error(
                "--url needs the operator token and the inbound secret: --admin-token and "
                "--inbound-secret, or DISPATCHER_ADMIN_TOKEN and DISPATCHER_INBOUND_SECRET"
            )
        if wall_kmh > SERVICE_MAX_PING_SPEED_KMH:
            print(
                f"dispatcher simulate: at --speed {speed:g} drivers may move at {wall_kmh:.0f} km/h of wall "
                "time; the service refuses fixes above its DISPATCHER_MAX_PING_SPEED_KMH (250 by default)",
                file=sys.stderr,
            )
        url = args.url.rstrip("/")
        if args.open:
            print(f"operator page: {url}/ops", flush=True)
        target = LiveTarget(url, admin, inbound, env.vendure_webhook_secret)
        runner = LiveRunner(
            city,
            run,
            target,
            minutes=minutes,
            speed=speed,
            receiver_port=args.receiver_port,
            progress=progress.update,
            offer_mode=env.offer_mode,
        )
        try:
            return asyncio.run(runner.run())
        except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError) as exc:
            print(
                f"dispatcher simulate: the service at {url} failed: {exc}",
                file=sys.stderr,
            )
            return 1
        finally:
            progress.close()
    return _live_embedded(args, env, city, run, minutes, speed, wall_kmh, progress)


def _offer_clock(rules: OfferRules, speed: float) -> dict[str, object]:
    """The service the simulator starts judges offers in simulated time: its answer
    timeout and dispatch deadline shrink by --speed, as the drivers' response times do."""
    if rules.mode == "auto":
        return {}
    return {
        "offer_mode": rules.mode,
        "offer_timeout_s": rules.timeout_s / speed,
        "dispatch_deadline_s": rules.deadline_s / speed,
    }


def _live_embedded(
    args: argparse.Namespace,
    env: Settings,
    city: City,
    run: RunSettings,
    minutes: float,
    speed: float,
    wall_kmh: float,
    progress: RunProgress,
) -> RunResult | int:
    from dispatcher.errors import DispatchError
    from dispatcher.simulate.live import LiveRunner, LiveTarget
    from dispatcher.simulate.service import (
        ingress,
        resolved_service,
        simulator_settings,
    )

    receiver_port = free_port()
    settings = simulator_settings(
        env,
        # A free port unless one was asked for: `dispatcher serve` may hold 8080.
        port=env.port if "port" in env.model_fields_set else 0,
        vendure_webhook_url=f"http://127.0.0.1:{receiver_port}/webhooks",
        # Compressed time: drivers cross the city faster on the wall clock than anyone drives.
        max_ping_speed_kmh=max(env.max_ping_speed_kmh, 2 * wall_kmh),
        log_level="WARNING",
        **_offer_clock(env.offer_rules(), speed),
    )
    print(
        f"starting the service (data in {settings.data_dir}) ...",
        file=sys.stderr,
        flush=True,
    )

    async def play(resolved: ResolvedSettings) -> RunResult:
        async with ingress(resolved) as url:
            print(f"dispatcher listening on {url}", file=sys.stderr, flush=True)
            if args.open:
                print(f"operator page: {url}/ops", flush=True)
            target = LiveTarget(
                url,
                resolved.admin_token,
                resolved.inbound_secret,
                resolved.vendure_webhook_secret,
            )
            runner = LiveRunner(
                city,
                run,
                target,
                minutes=minutes,
                speed=speed,
                receiver_port=receiver_port,
                progress=progress.update,
                offer_mode=resolved.offer_mode,
            )
            try:
                return await runner.run()
            finally:
                progress.close()

    try:
        with resolved_service(settings) as resolved:
            return asyncio.run(play(resolved))
    except (
        DispatchError,
        aiohttp.ClientError,
        TimeoutError,
        OSError,
        RuntimeError,
    ) as exc:
        print(f"dispatcher simulate: {exc}", file=sys.stderr)
        return 1
