"""`--report DIR`: the summary as Markdown with three matplotlib plots (the `sim` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dispatcher.simulate.summary import RunResult, format_table, summarize

PLOTS = {
    "pickup_distance.png": "Pickup distance of each booked order",
    "time_to_assign.png": "Time from ready to booked",
    "utilisation.png": "Driver utilisation by hour of the simulated day",
}


class ReportUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReportUnavailableError(
            "--report needs matplotlib: pip install -c constraints.txt -e '.[sim]'"
        ) from None
    # No display needed: files only.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(result: RunResult, directory: Path) -> list[Path]:
    """Write README.md and the PNGs into `directory`; returns the files written."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    booked = [r for r in result.records if r.assigned_s is not None]
    distances = [r.distance_km for r in booked if r.distance_km is not None]
    waits = [r.assigned_s - r.ready_s for r in booked if r.assigned_s is not None]
    by_hour = result.utilisation.by_hour()
    written: list[Path] = []

    def save(name: str, fig: Any) -> None:
        path = directory / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(distances or [0.0], bins=40, color="#3b7dd8")
    ax.set(
        xlabel="pickup distance (km)",
        ylabel="orders",
        title=PLOTS["pickup_distance.png"],
    )
    fig.tight_layout()
    save("pickup_distance.png", fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(waits or [0.0], bins=40, color="#d8873b")
    ax.set(
        xlabel="seconds from ready to booked (0: at once)",
        ylabel="orders",
        title=PLOTS["time_to_assign.png"],
    )
    ax.set_yscale("log")
    fig.tight_layout()
    save("time_to_assign.png", fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    hours = [h for h in range(24) if by_hour[h] is not None]
    ax.bar(hours, [100.0 * (by_hour[h] or 0.0) for h in hours], color="#4a9a5b")
    ax.set(
        xlabel="hour of day",
        ylabel="busy share of on-shift time (%)",
        title=PLOTS["utilisation.png"],
    )
    ax.set_xlim(-0.5, 23.5)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    save("utilisation.png", fig)

    readme = directory / "README.md"
    readme.write_text(_markdown(result))
    written.append(readme)
    return written


def _markdown(result: RunResult) -> str:
    s = summarize(result)
    lines = [
        f"# Simulation: {result.scenario}, {result.mode}, seed {result.seed}",
        "",
        "```",
        format_table(result),
        "```",
        "",
        f"Fingerprint of the run (equal for equal runs): `{result.fingerprint()}`",
        "",
    ]
    for name, title in PLOTS.items():
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["## Utilisation by hour", "", "| hour | busy share |", "|---|---|"]
    for hour, share in enumerate(result.utilisation.by_hour()):
        if share is not None:
            lines.append(f"| {hour:02d}:00 | {100.0 * share:.1f} % |")
    lines += [
        "",
        f"Overall: {100.0 * s['utilisation']:.1f} % of on-shift time busy.",
        "",
    ]
    return "\n".join(lines)
