"""Entry point: start the stack, run references and scenarios, print the table, write the report."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import redis.asyncio as aioredis

from benchmarks.offers import (
    ModeRun,
    offers_section,
    plan_offers_steps,
    run_offers,
)
from benchmarks.options import SCENARIOS, Options, from_args
from benchmarks.progress import Progress
from benchmarks.report import Report, machine_info, markdown_report, text_report
from benchmarks.runner import LoadRunner
from benchmarks.scale import (
    OFFERS_BEGIN,
    OFFERS_END,
    STREAM_BEGIN,
    STREAM_END,
    ScaleRow,
    kept_section,
    merge_section,
    plan_scale_steps,
    run_scale,
    scale_section,
)
from benchmarks.scenarios import ADMIN_TIMEOUT, REFERENCES, Bench, plan_steps
from benchmarks.stack import SERVICE_REDIS_DB, Stack
from benchmarks.stream import (
    StreamRun,
    plan_stream_steps,
    run_stream,
    stream_section,
)
from benchmarks.wrk import find_wrk, install_hint

# Memory first, so it is measured at exactly the lookup fleet (the target: "at 50,000
# drivers"), before the other scenarios add theirs; lookup reuses that fleet.
EXECUTION_ORDER = ("memory", "lookup", "pings", "orders")


async def _server_versions(stack: Stack) -> dict[str, str]:
    conn = await asyncpg.connect(stack.database_url)
    try:
        pg = str(await conn.fetchval("SELECT current_setting('server_version')"))
        fsync = str(await conn.fetchval("SELECT current_setting('fsync')"))
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(stack.redis_url(SERVICE_REDIS_DB))
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    return {
        "PostgreSQL": f"{pg} (embedded, fsync {fsync})",
        "Redis": f"{info.get('redis_version')} (embedded)",
    }


async def _run(
    options: Options,
    stack: Stack,
    runner: LoadRunner,
    progress: Progress,
    report: Report,
) -> None:
    async with progress.ticking():
        progress.step("starting PostgreSQL and Redis")
        await asyncio.to_thread(stack.start_servers)
        progress.step("starting dispatcher serve (it starts its own Ray)")
        await asyncio.to_thread(
            stack.start_service, extra_env=dict(options.service_env)
        )
        progress.step("starting the ceiling and naive references")
        for kind in REFERENCES:
            await asyncio.to_thread(stack.start_reference, kind)
        report.machine.update(await _server_versions(stack))
        async with aiohttp.ClientSession(timeout=ADMIN_TIMEOUT) as session:
            bench = Bench(options, stack, runner, progress, session, report)
            await bench.references()
            for name in sorted(options.scenarios, key=EXECUTION_ORDER.index):
                try:
                    await getattr(bench, name)()
                except Exception as exc:
                    report.failed.append(
                        f"scenario {name}: {type(exc).__name__}: {exc}"
                    )
                    progress.note(f"scenario {name} failed:\n{traceback.format_exc()}")
                    if (
                        stack.service is not None
                        and stack.service.popen.poll() is not None
                    ):
                        progress.note(
                            f"dispatcher serve exited:\n{stack.service.tail()}"
                        )
                        return
            if options.profile:
                await bench.profile()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options = from_args(args)
    wrk = find_wrk() if options.use_wrk else None
    if options.use_wrk and wrk is None:
        print(
            f"wrk is not installed; install it with `{install_hint()}`. "
            "Using the Python load generator instead.",
            file=sys.stderr,
        )
    workdir = Path(tempfile.mkdtemp(prefix="dbench-"))
    report = Report(
        started=datetime.now(UTC).astimezone(),
        command=shlex.join(["python", "-m", "benchmarks", *args]),
        options=options,
        machine=machine_info(),
    )
    report.machine["load generator"] = (
        f"wrk ({wrk}) at saturation, Python open loop at fixed rates"
        if wrk
        else "Python (asyncio) only"
    )
    stack = Stack(workdir, fsync=options.fsync)
    scaling = options.scenarios == ("scale",)
    streaming = options.scenarios == ("stream",)
    if streaming:
        return _stream_main(options, report, stack, workdir)
    if options.scenarios == ("offers",):
        return _offers_main(options, report, stack, workdir)
    progress = Progress(plan_scale_steps(options) if scaling else plan_steps(options))
    scale_rows: list[ScaleRow] = []
    try:
        runner = LoadRunner(workdir, wrk)
        if scaling:
            scale_rows = asyncio.run(
                run_scale(options, stack, runner, progress, report)
            )
        else:
            asyncio.run(_run(options, stack, runner, progress, report))
    except KeyboardInterrupt:
        report.failed.append("interrupted")
    except Exception as exc:
        report.failed.append(f"{type(exc).__name__}: {exc}")
        progress.note(traceback.format_exc())
    finally:
        progress.step("stopping the service, references and servers")
        stack.close()
        progress.finish()
        if options.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    # Shown in the report's order, references first, whatever order they ran in.
    rank = {name: i for i, name in enumerate(("reference", *SCENARIOS))}
    report.figures.sort(key=lambda f: rank.get(f.scenario, len(rank)))
    if scaling:
        section = scale_section(scale_rows, report)
        print(section + "".join(f"FAILED: {x}\n" for x in report.failed), end="")
    else:
        print(text_report(report), end="")
    if options.output is not None:
        options.output.parent.mkdir(parents=True, exist_ok=True)
        existing = options.output.read_text() if options.output.exists() else None
        if scaling:
            text = merge_section(existing, section)
        else:
            kept = kept_section(existing)
            text = markdown_report(report) + (f"\n{kept}" if kept else "")
        options.output.write_text(text)
        print(f"wrote {options.output}")
    return 1 if report.failed else 0


def _stream_main(options: Options, report: Report, stack: Stack, workdir: Path) -> int:
    """`--scenario stream`: its own run and its own section of the report."""
    progress = Progress(plan_stream_steps())
    run: StreamRun | None = None
    try:
        run = asyncio.run(run_stream(options, stack, progress))
    except Exception as exc:
        report.failed.append(f"{type(exc).__name__}: {exc}")
        progress.note(traceback.format_exc())
    finally:
        progress.step("stopping the service and servers")
        stack.close()
        progress.finish()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if run is None:
        print("".join(f"FAILED: {x}\n" for x in report.failed), end="")
        return 1
    section = stream_section(run, report)
    print(section, end="")
    if options.output is not None:
        existing = options.output.read_text() if options.output.exists() else None
        options.output.write_text(
            merge_section(existing, section, begin=STREAM_BEGIN, end=STREAM_END)
        )
        print(f"wrote {options.output}")
    return 0


def _offers_main(options: Options, report: Report, stack: Stack, workdir: Path) -> int:
    """`--scenario offers`: auto, cascade and wave in one run; its own section."""
    progress = Progress(plan_offers_steps())
    runs: list[ModeRun] = []
    try:
        runs = asyncio.run(run_offers(options, stack, progress))
    except Exception as exc:
        report.failed.append(f"{type(exc).__name__}: {exc}")
        progress.note(traceback.format_exc())
    finally:
        progress.step("stopping the service and servers")
        stack.close()
        progress.finish()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(runs) < 3:
        print("".join(f"FAILED: {x}\n" for x in report.failed), end="")
        return 1
    section = offers_section(runs, report)
    print(section, end="")
    if options.output is not None:
        existing = options.output.read_text() if options.output.exists() else None
        options.output.write_text(
            merge_section(existing, section, begin=OFFERS_BEGIN, end=OFFERS_END)
        )
        print(f"wrote {options.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
