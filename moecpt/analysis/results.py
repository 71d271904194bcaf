"""Reading a study's ``results`` dict: the one copy of the small readers that the findings, the report and the plots
share, and the report's number formatter :func:`fmt`.

This module imports nothing else of the package, so the dependencies run one way: ``results`` <- ``findings`` <-
``report`` and ``results`` <- ``plots`` <- ``report``.

The study runner (:mod:`moecpt.analysis.study`) writes ``results`` as::

    results = {
      "name": str, "wall_time_s": float (this invocation), "stage_time_s": float (training runs, summed),
      "jobs": int, "seeds": [0, 1, 2],
      "old_sources": ["english"], "shifts": ["code"],
      "models": {name: {"preset", "arch": "dense"|"switch"|"granular", "router": "penalty"|"sinkhorn"|"bias"|None,
                        "is_moe", "total_params", "active_params", "train_flops_per_token"}},
      "runs": {key: {"kind": "pretrain"|"cpt"|"control"|"retrain", "model", "seed", "shift", "replay",
                     "schedule": "inf"|"rewarm"|None, "control": control key | None (cpt runs),
                     "optimizer_state": "carried"|"fresh"|None, "warmup_steps",
                     "parent", "parent_step", "start_tokens", "steps", "tokens", "train_flops",
                     "val": {source: [[step, tokens, loss], ...]},
                     "train_mri": [[step, mri_mean, [mri per MoE layer]], ...],
                     "final": {source: {"loss", "mri_mean"?, "mri_layers"?}},
                     "start": {source: {...}} | None}},
      "comparisons": {cpt / control key: {"source", "crs_layers", "crs_mean", "cvs_layers", "cvs_mean",
                                          "chance_overlap"}},
      "forgetting": {cpt / control key: {"forgetting": {...}, "adaptation": {...}, "mean_forgetting",
                                         "mean_adaptation", "loss_before": {...}, "loss_after": {...}}},
    }

Run keys are prefixed by their seed (``s0/pretrain/dense``, ``s1/cpt/granular-pb/code/inf-r0.3``,
``s0/control/granular-pb/inf``); the same key without the ``sN/`` prefix (:func:`base_key`) names one cell of the
study across its seeds, which the tables and the seed bands of the plots group by (:func:`seed_groups`). Results of
the older one-seed schema (no ``seeds``, no prefixes, no controls) are read as seed 0. Every key may be missing (a
partial study still gets a report), and every reader here tolerates that.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "fmt",
    "is_moe_model",
    "base_key",
    "run_seed",
    "study_seeds",
    "sorted_run_keys",
    "seed_groups",
    "run_sources",
    "final_loss",
    "mean_final_loss",
    "mean_forgetting",
    "comparisons",
    "parent_flops_used",
    "mri_series",
    "mri_window",
    "MRI_WINDOW_MIN",
    "MRI_WINDOW_DIV",
]


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


# ------------------------------------------------------------------------------------------------ numbers
def _num(x: Any) -> float | None:
    """A finite float, or None (missing, non-numeric, NaN, inf)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _r(x: Any, sig: int = 5) -> float | None:
    """``x`` rounded to ``sig`` significant digits (None stays None)."""
    v = _num(x)
    if v is None:
        return None
    return float(f"{v:.{sig}g}")


def _mean(values: Iterable[Any]) -> float | None:
    """Mean of the finite numbers among ``values`` (None when there is none)."""
    vals = [v for v in (_num(x) for x in values) if v is not None]
    return sum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------------------- runs and models
def _runs(results: Mapping) -> dict[str, dict]:
    return {k: v for k, v in (results.get("runs") or {}).items() if isinstance(v, Mapping)}


def _models(results: Mapping) -> dict[str, dict]:
    return {k: v for k, v in (results.get("models") or {}).items() if isinstance(v, Mapping)}


def is_moe_model(results: Mapping, model: str | None) -> bool | None:
    """True for an MoE model, False for a dense one, None when the model is unknown."""
    info = _models(results).get(model or "")
    if info is None:
        return None
    if "is_moe" in info:
        return bool(info["is_moe"])
    arch = info.get("arch")
    return None if arch is None else arch != "dense"


def _replay(run: Mapping) -> float:
    return _num(run.get("replay")) or 0.0


# ------------------------------------------------------------------------------------------------- seeds
_SEED_PREFIX = re.compile(r"^s(\d+)/")


def base_key(key: str) -> str:
    """A run key without its ``sN/`` seed prefix: the study cell the run belongs to across seeds."""
    return _SEED_PREFIX.sub("", str(key), count=1)


def run_seed(key: str, run: Mapping | None = None) -> int:
    """The seed of a run: its ``seed`` field, else its key's ``sN/`` prefix, else 0 (the one-seed schema)."""
    v = _num((run or {}).get("seed"))
    if v is not None:
        return int(v)
    m = _SEED_PREFIX.match(str(key))
    return int(m.group(1)) if m else 0


def study_seeds(results: Mapping) -> list[int]:
    """The study's seeds: ``results["seeds"]``, else the seeds its runs carry (``[0]`` for one-seed results)."""
    seeds = [int(s) for s in (results.get("seeds") or []) if _num(s) is not None]
    if seeds:
        return list(dict.fromkeys(seeds))
    return sorted({run_seed(k, r) for k, r in _runs(results).items()})


_KIND_ORDER = {"pretrain": 0, "cpt": 1, "control": 2, "retrain": 3}
_SCHED_ORDER = {"inf": 0, "rewarm": 1}


def sorted_run_keys(results: Mapping, kind: str | None = None) -> list[str]:
    """Run keys (of one ``kind``, or all) in a stable reading order: kind (pretrain, cpt, control, retrain), model
    (as listed), shift, schedule, replay, cell (:func:`base_key`), then seed (so the seeds of one cell sit
    together)."""
    runs = _runs(results)
    model_order = {m: i for i, m in enumerate(_models(results))}

    def key(k: str) -> tuple:
        r = runs[k]
        return (_KIND_ORDER.get(r.get("kind"), 9), model_order.get(r.get("model"), 99), str(r.get("model")),
                str(r.get("shift")), _SCHED_ORDER.get(r.get("schedule"), 9), _replay(r), base_key(k),
                run_seed(k, r), k)

    return sorted((k for k in runs if kind is None or runs[k].get("kind") == kind), key=key)


def seed_groups(results: Mapping, kind: str | None = None) -> dict[str, list[str]]:
    """``{base key: [run keys, one per seed, by seed]}`` in reading order."""
    out: dict[str, list[str]] = {}
    for k in sorted_run_keys(results, kind):
        out.setdefault(base_key(k), []).append(k)
    return out


# ------------------------------------------------------------------------------------------------ losses
def run_sources(results: Mapping, run: Mapping) -> tuple[list[str], list[str]]:
    """(old sources, new sources) a run is judged on: the pre-training sources, and its shift; a run without a shift
    (pre-training, a no-shift control) is judged on every shift of the study, to show where CPT starts from."""
    old = list(results.get("old_sources") or [])
    shift = run.get("shift")
    new = [shift] if shift else list(results.get("shifts") or [])
    return old, [s for s in dict.fromkeys(new) if s not in old]


def final_loss(run: Mapping, source: str | None) -> float | None:
    """The run's dedicated end-of-run eval loss on ``source``; else its last logged validation loss; else None."""
    fin = (run.get("final") or {}).get(source)
    if isinstance(fin, Mapping) and "loss" in fin:
        return _num(fin["loss"])  # a NaN / inf eval loss stays missing: never replaced by a training-time value
    curve = (run.get("val") or {}).get(source) or []
    try:
        return _num(curve[-1][2]) if curve else None
    except (IndexError, TypeError):
        return None


def _start_loss(run: Mapping, source: str) -> float | None:
    st = (run.get("start") or {}).get(source)
    return _num(st.get("loss")) if isinstance(st, Mapping) else None


def mean_final_loss(results: Mapping, run: Mapping) -> float | None:
    """Unweighted mean of the final losses on the old sources and the run's shift (:func:`run_sources`; None if
    any is missing)."""
    old, new = run_sources(results, run)
    vals = [final_loss(run, s) for s in old + new]
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


def mean_forgetting(results: Mapping, key: str) -> float | None:
    """Mean forgetting (old-source loss rise from the CPT start checkpoint to the end) of a CPT or control run:
    ``results["forgetting"]``, else final - start."""
    entry = (results.get("forgetting") or {}).get(key)
    if isinstance(entry, Mapping) and _num(entry.get("mean_forgetting")) is not None:
        return _num(entry["mean_forgetting"])
    run = _runs(results).get(key)
    if run is None:
        return None
    old, _ = run_sources(results, run)
    deltas = []
    for s in old:
        a, b = final_loss(run, s), _start_loss(run, s)
        if a is None or b is None:
            return None
        deltas.append(a - b)
    return sum(deltas) / len(deltas) if deltas else None


def comparisons(results: Mapping) -> dict[str, dict]:
    """``results["comparisons"]`` restricted to entries of known CPT and control runs (a stale entry is ignored)."""
    runs = _runs(results)
    return {k: v for k, v in (results.get("comparisons") or {}).items()
            if isinstance(v, Mapping) and runs.get(k, {}).get("kind") in ("cpt", "control")}


def parent_flops_used(results: Mapping, run: Mapping) -> float | None:
    """FLOPs of the parent run up to the branch point (pro rata by steps), None when unknown."""
    parent = _runs(results).get(run.get("parent") or "")
    total = _num((parent or {}).get("train_flops"))
    if total is None:
        return None
    steps, at = _num(parent.get("steps")), _num(run.get("parent_step"))
    return total * at / steps if steps and at is not None and 0 <= at <= steps else total


# --------------------------------------------------------------------------------------------- training MRI
#: The MRI windows of the rules (docs/study-rules.md, F2): W = max(MRI_WINDOW_MIN, ceil(N / MRI_WINDOW_DIV))
#: logged steps, i.e. max(3, ceil(0.1 N)).
MRI_WINDOW_MIN, MRI_WINDOW_DIV = 3, 10


def mri_window(n: int) -> int:
    """W = max(3, ceil(0.1 n)) logged steps, in integer arithmetic (no float rounding at the integers)."""
    return max(MRI_WINDOW_MIN, -(-n // MRI_WINDOW_DIV))


def mri_series(run: Mapping | None, upto_step: Any = None) -> list[tuple[float, float]]:
    """[(step, mean train MRI)] of a run's training log, sorted by step, optionally cut at ``upto_step``."""
    out = []
    cut = _num(upto_step)
    for e in (run or {}).get("train_mri") or []:
        try:
            step, m = _num(e[0]), _num(e[1])
        except (IndexError, TypeError):
            continue
        if step is None or m is None or (cut is not None and step > cut):
            continue
        out.append((step, m))
    return sorted(out)
