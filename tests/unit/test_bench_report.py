"""Bench report: targets, ratios, the printed table and docs/PERFORMANCE.md."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from dispatcher.bench.options import from_args
from dispatcher.bench.report import (
    Report,
    figure_row,
    format_ratio,
    format_table,
    format_value,
    machine_info,
    markdown_report,
    markdown_table,
    text_report,
)
from dispatcher.bench.results import Figure, Target


def test_targets_absolute_and_relative_to_the_ceiling() -> None:
    assert Target("≤ 25 ms", maximum=25).met(20.0, None) is True
    assert Target("≤ 25 ms", maximum=25).met(30.0, None) is False
    assert Target("≥ 50,000", minimum=50_000).met(49_999.0, None) is False
    assert Target("= 0", maximum=0).met(0.0, None) is True
    relative = Target("≥ 0.7 x ceiling", ceiling_factor=0.7)
    assert relative.met(7_000.0, 10_000.0) is True
    assert relative.met(6_999.0, 10_000.0) is False
    assert relative.met(7_000.0, None) is None
    assert Target("x", maximum=1).met(math.nan, None) is None


def test_figure_reports_the_median_and_its_ratios() -> None:
    fig = Figure(
        "pings",
        "single",
        "req/s",
        [900.0, 1000.0, 5000.0],
        ceiling=2000.0,
        naive=500.0,
        target=Target("≥ 0.7 x ceiling", ceiling_factor=0.7),
    )
    assert fig.value == 1000.0
    assert fig.vs_ceiling == 0.5
    assert fig.vs_naive == 2.0
    assert fig.met is False
    assert figure_row(fig) == [
        "pings",
        "single",
        "1,000",
        "req/s",
        "900 / 1,000 / 5,000",
        "0.50x",
        "2.00x",
        "≥ 0.7 x ceiling",
        "NOT met",
    ]


def test_value_formats() -> None:
    assert format_value(12345.6, "req/s") == "12,346"
    assert format_value(1.234, "ms") == "1.23"
    assert format_value(25.55, "ms") == "25.6"
    assert format_value(math.nan, "ms") == "n/a"
    assert format_ratio(None) == "—"


def test_format_table_aligns_numbers_right() -> None:
    table = format_table(("name", "value"), [["a", "1"], ["longer", "1,000"]])
    lines = table.splitlines()
    assert lines[0].startswith("name  ")
    assert set(lines[1]) == {"-", " "}
    assert lines[2] == "a           1"
    assert lines[3] == "longer  1,000"


def test_markdown_table_escapes_pipes() -> None:
    assert markdown_table(("a", "b"), [["x|y", "1"]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| x\\|y | 1 |",
    ]


def _report() -> Report:
    report = Report(
        datetime(2026, 11, 22, 4, 0, tzinfo=UTC),
        "python -m dispatcher.bench --quick",
        from_args(["--quick"]),
        {"CPU": "test", "cores": "2"},
    )
    report.figures.append(
        Figure(
            "pings",
            "single at 3000/s: p99",
            "ms",
            [30.0],
            5.0,
            10.0,
            Target("≤ 25 ms", maximum=25),
            notes=["answered 2,990/s of 3,000/s offered"],
        )
    )
    return report


def test_text_report_lists_figures_and_failures() -> None:
    report = _report()
    report.failed.append("scenario orders: boom")
    text = text_report(report)
    assert "single at 3000/s: p99" in text
    assert "NOT met" in text
    assert "FAILED: scenario orders: boom" in text


def test_markdown_report_has_every_section() -> None:
    text = markdown_report(_report())
    for heading in (
        "# Performance",
        "## Machine",
        "## How it is measured",
        "## Results",
        "## Targets (issue 4)",
        "## Notes",
        "## Profile",
    ):
        assert heading in text
    assert "python -m dispatcher.bench --quick" in text
    assert "py-spy record -o profile.svg --pid <ingress pid>" in text
    assert "NOT met: pings — single at 3000/s: p99: 30.0 ms (target ≤ 25 ms)" in text


def test_machine_info_names_cpu_cores_and_versions() -> None:
    info = machine_info()
    assert info["cores"].isdigit()
    for key in ("CPU", "RAM", "Python", "Ray"):
        assert info[key]
