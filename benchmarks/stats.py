"""Median and spread of repeated measurements: what every published figure is (never the best run).

    from stats import summary
    summary([1.31, 1.25, 1.28])          # -> "1.28 (median of 3 runs, 1.25-1.31)"
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of one or more measurements."""
    if not values:
        raise ValueError("no measurements")
    return statistics.median(values), min(values), max(values)


def summary(values: Sequence[float], fmt: str = "{:.2f}", unit: str = "") -> str:
    """``median (median of N runs, min-max)`` in ``fmt``; one run says so."""
    middle, low, high = median_range(values)
    if len(values) == 1:
        return f"{fmt.format(middle)}{unit} (1 run)"
    return f"{fmt.format(middle)}{unit} (median of {len(values)} runs, {fmt.format(low)}-{fmt.format(high)}{unit})"


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s first ``model name``), else the machine type."""
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.machine()
