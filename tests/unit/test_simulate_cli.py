"""`dispatcher simulate`: argument errors exit 2, offline runs print their summary, reports are PNGs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dispatcher.cli import main as dispatcher_main
from dispatcher.simulate.cli import main
from dispatcher.simulate.report import PLOTS

BAD_ARGUMENTS = [
    (["--scenario", "paris"], "invalid choice"),
    (["--seed", "abc"], "invalid int value"),
    (["--offline", "--hours", "0"], "must be a positive number"),
    (["--offline", "--hours", "nan"], "must be a positive number"),
    (["--minutes", "-1"], "must be a positive number"),
    (["--drivers", "0"], "must be at least 1"),
    (["--start-hour", "24"], "must be in [0, 24)"),
    (["--offline", "--url", "http://127.0.0.1:8080"], "only apply to live runs"),
    (["--offline", "--minutes", "5"], "only apply to live runs"),
    (["--hours", "3"], "--hours applies to --offline runs"),
    (["--url", "ftp://example.org"], "must be an http(s) URL"),
    (["--receiver-port", "9999"], "--receiver-port applies to --url runs"),
    (["--offline", "--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "usage: dispatcher simulate" in err


def test_url_without_secrets_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DISPATCHER_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("DISPATCHER_INBOUND_SECRET", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://127.0.0.1:1"])
    assert exc.value.code == 2
    assert "DISPATCHER_ADMIN_TOKEN" in capsys.readouterr().err


def test_the_top_level_cli_routes_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        dispatcher_main(["simulate", "--scenario", "paris"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        dispatcher_main(["simulate", "--help"])
    assert exc.value.code == 0
    assert "--offline" in capsys.readouterr().out


def test_an_offline_run_ends_with_its_summary_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--offline", "--hours", "4", "--seed", "3", "--drivers", "80"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("scenario")
    assert "manhattan (offline, auto mode, seed 3)" in out
    for row in (
        "orders",
        "assigned",
        "pickup distance",
        "time to assign",
        "offers per order",
        "driver utilisation",
    ):
        assert row in out


def test_offline_cli_runs_repeat_and_the_seed_matters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def table(seed: str) -> str:
        assert (
            main(
                [
                    "--offline",
                    "--scenario",
                    "manhattan",
                    "--hours",
                    "2",
                    "--start-hour",
                    "18",
                    "--seed",
                    seed,
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        return "\n".join(
            line for line in out.splitlines() if not line.startswith("wall time")
        )

    assert table("5") == table("5")
    assert table("5") != table("6")


def test_the_report_holds_markdown_and_valid_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "report"
    assert (
        main(
            ["--offline", "--hours", "24", "--drivers", "200", "--report", str(out_dir)]
        )
        == 0
    )
    readme = (out_dir / "README.md").read_text()
    assert "# Simulation: manhattan, offline, seed 1" in readme
    assert "Fingerprint of the run" in readme
    for name in PLOTS:
        path = out_dir / name
        assert f"]({name})" in readme
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert (
                image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 200
            )
            # Not a blank canvas: a plot has more than a couple of colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 24) or ()) > 10


def test_a_url_that_does_not_answer_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    from dispatcher.embedded import free_port
    from dispatcher.webhooks.signing import new_secret

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = main(
        [
            "--url",
            url,
            "--admin-token",
            "adm_x",
            "--inbound-secret",
            new_secret(),
            "--minutes",
            "0.1",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert f"the service at {url} failed" in err


def test_the_same_seed_gives_the_same_fingerprint_in_separate_processes(
    tmp_path: Path,
) -> None:
    """Bit for bit across processes too: string hashing differs between them, so no
    result may depend on the order of a set of driver ids."""
    import os
    import subprocess
    import sys

    fingerprints = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        argv = [
            sys.executable,
            "-m",
            "dispatcher.cli",
            "simulate",
            "--offline",
            "--hours",
            "6",
            "--start-hour",
            "10",
            "--seed",
            "3",
            "--report",
            str(out),
        ]
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr
        line = next(
            x
            for x in (out / "README.md").read_text().splitlines()
            if x.startswith("Fingerprint")
        )
        fingerprints.append(line)
    assert fingerprints[0] == fingerprints[1]
