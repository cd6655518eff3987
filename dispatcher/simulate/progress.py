"""Progress on stderr: a bar redrawn in place on a terminal, a compact line per tenth elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24
# Redraws on a terminal at most this often: enough to see it move, cheap for fast runs.
REDRAW_S = 0.2


class RunProgress:
    """`update(fraction, orders, assigned)` from the run; `close()` at the end."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.began: float | None = None  # the clock starts with the first update
        self._drawn = 0.0
        self._tenth = -1
        self._width = 0

    def update(self, fraction: float, orders: int, assigned: int) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        now = time.monotonic()
        if self.began is None:
            self.began = now
        if self.tty:
            if now - self._drawn < REDRAW_S and fraction < 1.0:
                return
            self._drawn = now
            line = self.line(fraction, orders, assigned, now - self.began)
            self.stream.write("\r" + line + " " * max(0, self._width - len(line)))
            self._width = len(line)
            self.stream.flush()
        elif int(fraction * 10) > self._tenth:
            self._tenth = int(fraction * 10)
            print(
                self.line(fraction, orders, assigned, now - self.began),
                file=self.stream,
                flush=True,
            )

    def line(self, fraction: float, orders: int, assigned: int, elapsed: float) -> str:
        filled = round(BAR_WIDTH * fraction)
        clock = f"{int(elapsed // 60)}:{int(elapsed % 60):02d}"
        return (
            f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * fraction:3.0f} % "
            f"{orders} orders, {assigned} assigned | {clock}"
        )

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
