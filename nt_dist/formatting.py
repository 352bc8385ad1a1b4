"""How figures are written in reports (``nt-dist report``, ``nt-dist audit``): two decimals,
a typographic minus, the sample spread over seeds."""

from __future__ import annotations

import statistics

MISSING = "–"


def signed(value: float | None) -> str:
    """``+1.23`` / ``−1.23`` (U+2212); ``–`` when there is no value."""
    return MISSING if value is None else f"{value:+.2f}".replace("-", "−")


def mean_spread(values: list[float] | None) -> str:
    """``mean ± sample std`` over seeds (the mean alone for one value); ``–`` for none."""
    if not values:
        return MISSING
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{spread}"
