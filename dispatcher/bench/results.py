"""Figures: one measured quantity over repeats, its references and the issue's target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dispatcher.bench.stats import median, ratio


@dataclass(frozen=True)
class Target:
    """The issue's bar for a figure: an absolute bound, or a multiple of the ceiling."""

    text: str
    minimum: float | None = None
    maximum: float | None = None
    ceiling_factor: float | None = None

    def met(self, value: float, ceiling: float | None) -> bool | None:
        """True/False, or None when it cannot be judged (no value or no ceiling)."""
        if math.isnan(value):
            return None
        if self.ceiling_factor is not None:
            if ceiling is None or math.isnan(ceiling):
                return None
            return value >= self.ceiling_factor * ceiling
        if self.minimum is not None and value < self.minimum:
            return False
        return not (self.maximum is not None and value > self.maximum)


@dataclass
class Figure:
    """A row of the report; `values` holds one entry per repeat, the median is reported."""

    scenario: str
    name: str
    unit: str
    values: list[float]
    # The same quantity measured on the references in the same run (medians).
    ceiling: float | None = None
    naive: float | None = None
    target: Target | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def value(self) -> float:
        return median(self.values)

    @property
    def vs_ceiling(self) -> float | None:
        return ratio(self.value, self.ceiling)

    @property
    def vs_naive(self) -> float | None:
        return ratio(self.value, self.naive)

    @property
    def met(self) -> bool | None:
        return (
            None if self.target is None else self.target.met(self.value, self.ceiling)
        )
