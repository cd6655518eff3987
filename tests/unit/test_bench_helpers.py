"""Bench helpers: options, step plan, progress bar, metrics and profile parsing, process labels."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from dispatcher.bench.memory import (
    ZONE_LOG_LINE,
    classify,
    process_name,
    zone_of_worker,
)
from dispatcher.bench.options import DEFAULT_OUTPUT, QUICK, SCENARIOS, Sizes, from_args
from dispatcher.bench.profile import top_frames
from dispatcher.bench.progress import Progress, render
from dispatcher.bench.scenarios import (
    error_note,
    parse_assignment_metrics,
    parse_counter,
    plan_steps,
)
from dispatcher.bench.stats import RunResult


def test_defaults_are_the_issue_sizes() -> None:
    o = from_args([])
    assert o.sizes == Sizes()
    assert (o.sizes.drivers, o.sizes.lookup_drivers, o.sizes.connections) == (
        20_000,
        50_000,
        32,
    )
    assert (o.sizes.ping_rate, o.sizes.order_rate) == (3000, 200)
    assert o.scenarios == SCENARIOS
    assert o.output == DEFAULT_OUTPUT
    assert o.use_wrk and o.fsync


def test_quick_is_small_python_only_and_writes_nothing() -> None:
    o = from_args(["--quick", "--scenario", "pings"])
    assert o.sizes == QUICK
    assert o.scenarios == ("pings",)
    assert o.output is None
    assert not o.use_wrk
    assert from_args(["--quick", "--output", "x.md"]).output == Path("x.md")


def test_overrides_and_validation() -> None:
    o = from_args(["--drivers", "100", "--duration", "3", "--connections", "4"])
    assert (o.sizes.drivers, o.sizes.duration_s, o.sizes.connections) == (100, 3.0, 4)
    with pytest.raises(SystemExit):
        from_args(["--repeats", "-1"])


def test_plan_steps_counts_shared_seeding_once() -> None:
    both = plan_steps(from_args(["--quick"]))
    lookup = plan_steps(from_args(["--quick", "--scenario", "lookup"]))
    memory = plan_steps(from_args(["--quick", "--scenario", "memory"]))
    base = plan_steps(from_args(["--quick", "--scenario", "pings"])) - (
        2 + 5 * QUICK.repeats
    )
    assert both > lookup > base
    assert memory == base + 3


def test_progress_bar_render() -> None:
    line = render(3, 12, "pings: wrk", 4.2, 10.0, 62.0)
    assert line.startswith("[" + "#" * 6 + "." * 18 + "] 3/12 pings: wrk 4/10 s")
    assert line.endswith("| 1:02")
    assert "12/12" in render(13, 12, "x", 0, None, 0) or "13/13" in render(
        13, 12, "x", 0, None, 0
    )


def test_progress_without_a_terminal_prints_one_line_per_step() -> None:
    out = io.StringIO()
    progress = Progress(2, out)
    progress.step("one")
    progress.step("two", 5.0)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "0/2 one" in lines[0] and "1/2 two" in lines[1] and "2/2 done" in lines[2]


def test_parse_assignment_metrics() -> None:
    text = (
        "# HELP dispatcher_assignments_total seller-order-ready outcomes\n"
        'dispatcher_assignments_total{outcome="assigned",path="redis"} 41.0\n'
        'dispatcher_assignments_total{outcome="unassigned",path="postgres"} 2.0\n'
        'dispatcher_assignments_created{outcome="assigned",path="redis"} 1.7e+09\n'
    )
    assert parse_assignment_metrics(text) == {
        "assigned/redis": 41.0,
        "unassigned/postgres": 2.0,
    }


def test_error_note() -> None:
    clean = RunResult("p", 10, 0, 1.0, 1, 1, 1, status_counts={"204": 10})
    dirty = RunResult(
        "p", 8, 3, 1.0, 1, 1, 1, status_counts={"204": 8, "503": 2, "ClientOSError": 1}
    )
    assert error_note([clean]) is None
    assert (
        error_note([clean, dirty])
        == "errors: 3 of 21 requests (503: 2, ClientOSError: 1)"
    )


def test_top_frames_from_raw_py_spy_output() -> None:
    raw = "main (a.py:1);run (b.py:2);parse (c.py:3) 6\nmain (a.py:1);send (d.py:4) 3\nbroken line\nmain (a.py:1);parse (c.py:3) 1\n"
    frames = top_frames(raw, limit=2)
    assert frames[0] == ("parse (c.py:3)", 0.7)
    assert frames[1][0] == "send (d.py:4)"
    assert top_frames("") == []


def test_process_labels() -> None:
    assert (
        process_name(["ray::ZoneActor.apply_pings"], "python")
        == "ray::ZoneActor.apply_pings"
    )
    assert (
        process_name(
            ["/venv/bin/python3", "-u", "/x/ray/dashboard/dashboard.py", "--a"],
            "python",
        )
        == "dashboard.py"
    )
    assert (
        process_name(["/x/ray/core/src/ray/gcs/gcs_server", "--log_dir=/t"], "gcs")
        == "gcs_server"
    )
    assert process_name([], "fallback") == "fallback"
    assert classify(10, ["python"], 10) == "ingress"
    assert classify(11, ["ray::ZoneActor"], 10) == "zone actor"
    assert classify(12, ["raylet"], 10) == "ray"


def test_zone_of_worker_reads_the_actor_log(tmp_path: Path) -> None:
    logs = tmp_path / "ray" / "session_2026" / "logs"
    logs.mkdir(parents=True)
    (logs / "worker-abc-01000000-4242.err").write_text(
        "INFO zone 851f1d4bfffffff active at epoch 3 with 12 drivers\n"
    )
    assert zone_of_worker(tmp_path, 4242) == "851f1d4bfffffff"
    assert zone_of_worker(tmp_path, 4243) is None
    assert ZONE_LOG_LINE.search("zone z active at epoch 1 with 0 drivers")


def test_parse_counter_by_labels() -> None:
    text = (
        "# TYPE dispatcher_pings counter\n"
        'dispatcher_pings_total{verdict="accepted"} 1200.0\n'
        'dispatcher_pings_total{verdict="stale"} 3.0\n'
        'dispatcher_pings_created{verdict="accepted"} 1.7e+09\n'
        "dispatcher_outbox_pending 4.0\n"
    )
    assert parse_counter(text, "dispatcher_pings_total") == {
        "accepted": 1200.0,
        "stale": 3.0,
    }
    assert parse_counter(text, "dispatcher_outbox_pending") == {"": 4.0}
