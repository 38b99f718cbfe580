"""How monoscope writes a number for people, in the browser, the report and the inline plots: one rule."""
from __future__ import annotations

import math
import numbers


def number(x, digits: int = 3) -> str:
    """0.0123, 1.23, 1234, 1.23e+06; counts stay exact; None, NaN and inf are a dash; text passes through."""
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1e5 or ax < 1e-3:
        return f"{x:.2e}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def percent(x: float | None) -> str:
    """A share as a percentage: 12.3%, 0.05%, 1.2e-03%."""
    if x is None or not math.isfinite(x):
        return "–"
    if x == 0:
        return "0%"
    if abs(x) < 1e-4:
        return f"{x * 100:.1e}%"
    return f"{x * 100:.3g}%"


def with_interval(value, low=None, high=None, digits: int = 2) -> str:
    """'0.82 [0.71, 0.90]'; the value alone where no interval was recorded; a dash for no value."""
    if value is None or value != value:
        return "—"
    if low is None or high is None or low != low or high != high:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
