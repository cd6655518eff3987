"""wrk support: the generated Lua script, the command line and reading wrk's result line."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.bench.wrk import (
    WRK_MARKER,
    install_hint,
    lua_script,
    parse_wrk_output,
    wrk_command,
)


def test_lua_script_reads_the_request_file_with_one_stride_per_thread() -> None:
    script = lua_script(Path("/tmp/x/001-pings.requests"), threads=2)
    assert "local DATA = [==[/tmp/x/001-pings.requests]==]" in script
    assert "local THREADS = 2" in script
    for hook in (
        "function setup(thread)",
        "function init(args)",
        "function request()",
        "function done(summary, latency, requests)",
    ):
        assert hook in script
    assert 'thread:set("tid", next_tid)' in script
    assert "index % THREADS == mine" in script
    # Tab and the header separator \x1f as Lua escapes, not raw characters.
    assert '"\\t"' in script and "[^\\31]+" in script
    assert "\t" not in script
    assert WRK_MARKER.strip() in script


def test_lua_script_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        lua_script(Path("/tmp/a]==]b"), threads=1)
    with pytest.raises(ValueError):
        lua_script(Path("/tmp/a"), threads=0)


def test_wrk_command() -> None:
    cmd = wrk_command(
        "/usr/bin/wrk", Path("/tmp/s.lua"), "http://127.0.0.1:1", 32, 10.0, 2
    )
    assert cmd == [
        "/usr/bin/wrk",
        "-t2",
        "-c32",
        "-d10s",
        "--timeout=10s",
        "-s",
        "/tmp/s.lua",
        "http://127.0.0.1:1",
    ]


def test_parse_wrk_output_reads_the_marker_line() -> None:
    out = (
        "Running 10s test @ http://127.0.0.1:1\n  2 threads and 32 connections\n"
        f'{WRK_MARKER}{{"requests":1000,"duration_us":2000000,"connect":0,"read":1,"write":0,'
        '"status":10,"timeout":2,"p50_us":1500,"p99_us":9000,"max_us":20000}\n'
        "Requests/sec: 500\n"
    )
    result = parse_wrk_output(out)
    assert result.generator == "wrk"
    assert result.ok == 990
    assert result.errors == 13
    assert result.duration_s == 2.0
    assert (result.p50_ms, result.p99_ms, result.max_ms) == (1.5, 9.0, 20.0)
    assert result.throughput == 495.0
    assert result.status_counts == {"wrk-read": 1, "wrk-status": 10, "wrk-timeout": 2}


def test_parse_wrk_output_without_marker_fails() -> None:
    with pytest.raises(ValueError, match="no result line"):
        parse_wrk_output("unable to connect\n")


def test_install_hint_names_the_package() -> None:
    assert install_hint().endswith("apt-get install -y wrk")
