"""A small progress bar on stderr: steps done, the current step, and its own clock."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import TextIO

BAR_WIDTH = 24
# Redraw period: smooth enough to see a run advance, rare enough to cost nothing.
TICK_S = 0.25


def render(
    done: int,
    total: int,
    label: str,
    step_elapsed: float,
    step_s: float | None,
    elapsed: float,
) -> str:
    """One bar line, e.g. `[#####.......] 3/12 pings: wrk 4/10 s | 0:42`."""
    total = max(total, done, 1)
    filled = round(BAR_WIDTH * done / total)
    clock = f"{int(elapsed // 60)}:{int(elapsed % 60):02d}"
    step = f" {step_elapsed:.0f}/{step_s:.0f} s" if step_s else f" {step_elapsed:.0f} s"
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} {label}{step} | {clock}"


class Progress:
    """Steps are announced with `step()`; on a terminal one line is redrawn in place,
    elsewhere (CI logs) each step gets one line of its own."""

    def __init__(
        self, total: int, stream: TextIO | None = None, *, enabled: bool = True
    ) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.done = 0
        self.label = "starting"
        self.step_s: float | None = None
        self._began = time.monotonic()
        self._step_began = self._began
        self._width = 0

    def step(self, label: str, expected_s: float | None = None) -> None:
        """Start a step; the previous one counts as done."""
        if self.label != "starting":
            self.done += 1
        self.label, self.step_s = label, expected_s
        self._step_began = time.monotonic()
        if self.enabled and not self.tty:
            print(self._line(), file=self.stream, flush=True)
        self.draw()

    def draw(self) -> None:
        if not (self.enabled and self.tty):
            return
        line = self._line()
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def _line(self) -> str:
        now = time.monotonic()
        return render(
            self.done,
            self.total,
            self.label,
            now - self._step_began,
            self.step_s,
            now - self._began,
        )

    def finish(self) -> None:
        if self.label != "starting":
            self.done += 1
        self.label, self.step_s = "done", None
        if self.enabled and self.tty:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()
        elif self.enabled:
            print(self._line(), file=self.stream, flush=True)

    def note(self, message: str) -> None:
        """A message on its own line, the bar redrawn below it."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
        print(message, file=self.stream, flush=True)
        self.draw()

    @contextlib.asynccontextmanager
    async def ticking(self) -> AsyncIterator[None]:
        """Redraw every TICK_S while the body runs."""

        async def tick() -> None:
            while True:
                await asyncio.sleep(TICK_S)
                self.draw()

        task = asyncio.create_task(tick())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
