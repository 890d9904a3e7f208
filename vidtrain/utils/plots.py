"""Plot conventions shared by every figure vidtrain writes (loss, balance, timeline, KV bytes).

Read at a glance: a title in the image, linear axes unless the values span decades, integer
ticks for counts (steps, ranks, chunks), every line labelled, no empty panels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DECADES_FOR_LOG = 2.0  # a log axis only when max/min >= 10^2 (positive values)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spans_decades(values: Sequence[float], decades: float = DECADES_FOR_LOG) -> bool:
    """True when the values are all positive and max/min >= 10^decades."""
    vals = [float(v) for v in values]
    if not vals or min(vals) <= 0:
        return False
    return max(vals) / min(vals) >= 10.0**decades


def set_value_scale(ax, values: Sequence[float]) -> None:
    """Log y only when the values span decades, else linear."""
    if spans_decades(values):
        ax.set_yscale("log")


def integer_axis(ax, axis: str = "x") -> None:
    """Ticks at whole numbers only (steps, ranks, chunks)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def nonempty(figures: dict[str, Sequence[float]]) -> dict[str, list[float]]:
    """The panels worth drawing: at least one value and not all zero."""
    return {k: list(v) for k, v in figures.items() if len(v) and any(float(x) != 0 for x in v)}


def finite_values(values: Sequence[float | None]) -> list[float]:
    """The values that can be drawn and scaled: not None, not NaN, not infinite."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]
