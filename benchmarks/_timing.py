"""Shared helpers of the benchmark scripts: interleaved repeated timings and their medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def interleaved(variants: Mapping[str, Callable[[], object]], *, rounds: int, number: int,
                warmup: int = 50) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``rounds`` times, variants interleaved within each round.

    Interleaving puts every variant under the same background load, so ratios within one run are
    meaningful on a noisy machine even when absolute times are not.

    Example::

        times = interleaved({"a": f, "b": g}, rounds=9, number=200)
        statistics.median(times["a"])
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants.items())
        for name, fn in (order if r % 2 == 0 else order[::-1]):  # alternate: no order bias
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times[name].append((time.perf_counter() - start) / number)
    return times


def median(values: list[float]) -> float:
    """The median (a thin wrapper so scripts read the same)."""
    return statistics.median(values)


def ratio_of_medians(times: Mapping[str, list[float]], a: str, b: str) -> float:
    """median(a) / median(b)."""
    return statistics.median(times[a]) / statistics.median(times[b])


def median_of_ratios(times: Mapping[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of a/b measured in the same round (robust to load drifting between rounds)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))
