"""The scale-out section of docs/PERFORMANCE.md: its table and how it merges into the report."""

from __future__ import annotations

from dispatcher.bench.scale import (
    ANALYSIS_BEGIN,
    ANALYSIS_END,
    BEGIN,
    END,
    ScaleRow,
    kept_section,
    merge_section,
    scale_table,
)

SECTION = f"{BEGIN}\n## Scale-out (issue 5)\n\nnew figures\n{END}\n"


def test_table_gives_each_count_its_ratio_to_one_node() -> None:
    rows = [
        ScaleRow(1, (190.0, 210.0), (10_000.0, 10_000.0), 0, (8,)),
        ScaleRow(2, (300.0, 299.0, 350.0), (9_000.0,), 0, (4, 4)),
    ]
    table = scale_table(rows)
    assert table[0] == [
        "1",
        "200",
        "190 / 210",
        "1.00",
        "10,000",
        "10,000 / 10,000",
        "1.00",
        "8",
        "0",
    ]
    assert table[1] == [
        "2",
        "300",
        "300 / 299 / 350",
        "1.50",
        "9,000",
        "9,000",
        "0.90",
        "4/4",
        "0",
    ]


def test_a_scale_run_replaces_only_its_own_section() -> None:
    existing = f"# Performance\n\n## Results\n\nold results\n\n{BEGIN}\nold scale\n{END}\n\n## Profile\n"
    merged = merge_section(existing, SECTION)
    assert "old results" in merged and "## Profile" in merged
    assert "old scale" not in merged and "new figures" in merged
    assert merged.count(BEGIN) == 1


def test_a_scale_run_appends_its_section_when_there_is_none() -> None:
    merged = merge_section("# Performance\n\nresults\n", SECTION)
    assert merged.startswith("# Performance\n\nresults\n") and merged.endswith(SECTION)
    assert merge_section(None, SECTION).endswith(SECTION)


def test_a_full_run_keeps_the_scale_section_of_the_old_file() -> None:
    assert kept_section(f"x\n{SECTION}y") == SECTION
    assert kept_section("no section here") is None
    assert kept_section(None) is None


def test_a_full_run_keeps_the_hand_written_analysis_first() -> None:
    analysis = f"{ANALYSIS_BEGIN}\n## Analysis\n\nwhy\n{ANALYSIS_END}\n"
    assert kept_section(f"x\n{SECTION}y\n{analysis}z") == f"{analysis}\n{SECTION}"
