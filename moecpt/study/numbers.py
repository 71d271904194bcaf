"""The study's number helpers: the report's one formatter :func:`fmt`, and finite-or-None arithmetic for values
that may be missing (a partial study) or non-finite (a diverged run)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["fmt", "finite", "round_sig", "finite_mean"]


def fmt(x: Any) -> str:
    """The one number formatter of the report: floats to 4 significant digits, ints exact with thousands
    separators, booleans yes/no, None / NaN / inf as ``n/a``; strings unchanged."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else "n/a"
    return str(x)


def finite(x: Any) -> float | None:
    """A finite float, or None (missing, non-numeric, NaN, inf)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def round_sig(x: Any, sig: int = 5) -> float | None:
    """``x`` rounded to ``sig`` significant digits (None stays None)."""
    v = finite(x)
    if v is None:
        return None
    return float(f"{v:.{sig}g}")


def finite_mean(values: Iterable[Any]) -> float | None:
    """Mean of the finite numbers among ``values`` (None when there is none)."""
    vals = [v for v in (finite(x) for x in values) if v is not None]
    return sum(vals) / len(vals) if vals else None
