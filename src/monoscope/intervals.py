"""95 % intervals used by every finding: a proportion's (Wilson), a mean's over a few seeds (Student t)."""
from __future__ import annotations

import math
from typing import Sequence


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion hits / n (NaNs for n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % Student-t interval of the mean of a few values (e.g. one per seed); the
    interval is NaN for fewer than two values."""
    from scipy.stats import t

    xs = [float(v) for v in values if v is not None and v == v]
    if not xs:
        return float("nan"), float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = float(t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half
