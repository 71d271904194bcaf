"""The statistics behind every verdict of the study (``docs/study-rules.md``, "From seeds to a verdict"): an effect
measured once per seed, its mean with the 95% Student-t interval over seeds, and the verdict of a directional or an
equivalence part, or of an arithmetic check. Pure functions of numbers: no results, no runs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from moecpt.study.numbers import finite, round_sig

__all__ = ["effect_stats", "check_stats", "t_quantile_975", "t_interval", "sample_sd"]


#: Two-sided 95% Student-t quantiles t(0.975, df), df = 1..30 (the standard table, e.g. NIST/SEMATECH
#: e-Handbook of Statistical Methods, table 1.3.6.7.2).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def sample_sd(values: list[float]) -> float | None:
    """Sample standard deviation (n - 1 in the denominator); None below two values."""
    if len(values) < 2:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the standard table for df 1..30; beyond, the Cornish-Fisher expansion around the normal
    quantile (error below 1e-4 for df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(xs: list[float]) -> tuple[float, float | None, float | None]:
    """(mean, lo, hi) of the 95% Student-t interval; lo/hi None below two values (no interval)."""
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, None
    half = t_quantile_975(len(xs) - 1) * sample_sd(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def _agrees(e: float, kind: str, margin: float | None, one_sided: bool) -> bool:
    """Whether one seed's own effect points the paper's way."""
    if kind == "directional":
        return e > 0
    if margin is None:
        return False
    return e >= -margin if one_sided else -margin < e < margin


def _verdict(kind: str, lo: float, hi: float, margin: float | None, one_sided: bool) -> str:
    if kind == "directional":
        return "reproduced" if lo > 0 else "not reproduced" if hi < 0 else "inconclusive"
    if margin is None:  # an equivalence part without its margin cannot be decided
        return "inconclusive"
    if one_sided:
        return "reproduced" if lo >= -margin else "not reproduced" if hi < -margin else "inconclusive"
    if -margin < lo and hi < margin:
        return "reproduced"
    return "not reproduced" if lo > margin or hi < -margin else "inconclusive"


def effect_stats(per_seed: Mapping[int, float], kind: str = "directional", margin: float | None = None, *,
                 one_sided: bool = False) -> dict:
    """Mean, 95% Student-t interval, spread and verdict of one effect measured once per seed
    (``docs/study-rules.md``, "From seeds to a verdict"; Thérien et al. 2025, arXiv 2503.05029).

    ``e > 0`` is the paper's direction. ``kind="directional"``: reproduced when the interval lies above zero, not
    reproduced when below, inconclusive otherwise. ``kind="equivalence"`` with margin ``τ``: reproduced when the
    interval lies inside ``(-τ, τ)``, not reproduced when wholly outside, inconclusive otherwise; with
    ``one_sided=True`` (F4 a): reproduced when ``lo >= -τ``, not reproduced when ``hi < -τ``. With one seed there
    is no interval (``lo``/``hi`` None) and the verdict is inconclusive; with none it is untested.

    Returns ``{"kind", "verdict", "n_seeds", "mean", "lo", "hi", "min", "max", "per_seed": {"<seed>": e},
    "seeds_agreeing", "margin"}`` (numbers rounded to 5 significant digits; verdicts use the exact values).
    """
    vals = {int(s): v for s, v in ((s, finite(x)) for s, x in per_seed.items()) if v is not None}
    n = len(vals)
    out: dict[str, Any] = {"kind": kind, "verdict": "untested", "n_seeds": n, "mean": None, "lo": None, "hi": None,
                           "min": None, "max": None,
                           "per_seed": {str(s): round_sig(v) for s, v in sorted(vals.items())},
                           "seeds_agreeing": sum(_agrees(v, kind, margin, one_sided) for v in vals.values()),
                           "margin": round_sig(margin)}
    if n == 0:
        return out
    xs = list(vals.values())
    mean, lo, hi = t_interval(xs)
    out.update(mean=round_sig(mean), min=round_sig(min(xs)), max=round_sig(max(xs)), verdict="inconclusive")
    if lo is not None:
        out.update(lo=round_sig(lo), hi=round_sig(hi), verdict=_verdict(kind, lo, hi, margin, one_sided))
    return out


def check_stats(per_seed: Mapping[int, float], limit: float) -> dict:
    """An arithmetic check ``value <= limit`` (F4 b): decided on the mean over seeds, whatever their number (the
    compute ratio is fixed by the recipe, so every seed gives the same value); ``margin`` holds the limit."""
    vals = {int(s): v for s, v in ((s, finite(x)) for s, x in per_seed.items()) if v is not None}
    xs = list(vals.values())
    # 9 significant digits: float rounding in the mean of equal ratios (0.4, 0.4, 0.4) must not flip "at most"
    mean = round_sig(sum(xs) / len(xs), 9) if xs else None
    return {"kind": "check", "n_seeds": len(xs), "mean": round_sig(mean, 4), "lo": None, "hi": None,
            "min": round_sig(min(xs), 4) if xs else None, "max": round_sig(max(xs), 4) if xs else None,
            "per_seed": {str(s): round_sig(v, 4) for s, v in sorted(vals.items())},
            "seeds_agreeing": sum(v <= limit for v in xs), "margin": limit,
            "verdict": "untested" if mean is None else "reproduced" if mean <= limit else "not reproduced"}
