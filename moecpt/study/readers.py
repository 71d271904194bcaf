"""Questions asked of a study's results by the findings, the report and the plots alike (one copy of each): seeds,
reading order, cells across seeds, the sources a run is judged on, final losses, forgetting, training MRI.

They take the records of :mod:`moecpt.study.results`; the ones that take a whole study also accept its ``results``
dict, which they parse (:func:`~moecpt.study.results.as_results`). A value a partial study lacks reads as None.
"""

from __future__ import annotations

from collections.abc import Mapping

from moecpt.study.numbers import finite
from moecpt.study.results import ComparisonRecord, RunKind, RunRecord, StudyResults, as_results, base_key

__all__ = [
    "is_moe_model", "study_seeds", "sorted_run_keys", "seed_groups", "run_sources", "final_loss", "start_loss",
    "mean_final_loss", "mean_forgetting", "comparisons", "parent_flops_used", "mri_series", "mri_window",
    "MRI_WINDOW_MIN", "MRI_WINDOW_DIV",
]


def is_moe_model(results: StudyResults, model: str | None) -> bool | None:
    """True for an MoE model, False for a dense one, None when the model is unknown."""
    return results.model_info(model).moe


def study_seeds(results: StudyResults | Mapping) -> list[int]:
    """The study's seeds: ``seeds``, else the seeds its runs carry (``[0]`` for one-seed results)."""
    res = as_results(results)
    if res.seeds:
        return list(dict.fromkeys(res.seeds))
    return sorted({r.seed for r in res.runs.values()})


_KIND_ORDER = {RunKind.PRETRAIN: 0, RunKind.CPT: 1, RunKind.CONTROL: 2, RunKind.RETRAIN: 3}
_SCHED_ORDER = {"inf": 0, "rewarm": 1}


def sorted_run_keys(results: StudyResults, kind: str | None = None) -> list[str]:
    """Run keys (of one ``kind``, or all) in a stable reading order: kind (pretrain, cpt, control, retrain), model
    (as listed), shift, schedule, replay, cell (:func:`base_key`), then seed (so the seeds of one cell sit
    together)."""
    runs = results.runs
    model_order = {m: i for i, m in enumerate(results.models)}

    def key(k: str) -> tuple:
        r = runs[k]
        return (_KIND_ORDER[r.kind], model_order.get(r.model, 99), r.model, str(r.shift),
                _SCHED_ORDER.get(r.schedule, 9), r.replay_or_zero, base_key(k), r.seed, k)

    return sorted((k for k in runs if kind is None or runs[k].kind == kind), key=key)


def seed_groups(results: StudyResults, kind: str | None = None) -> dict[str, list[str]]:
    """``{base key: [run keys, one per seed, by seed]}`` in reading order."""
    out: dict[str, list[str]] = {}
    for k in sorted_run_keys(results, kind):
        out.setdefault(base_key(k), []).append(k)
    return out


def run_sources(results: StudyResults, run: RunRecord) -> tuple[list[str], list[str]]:
    """(old sources, new sources) a run is judged on: the pre-training sources, and its shift; a run without a shift
    (pre-training, a no-shift control) is judged on every shift of the study, to show where CPT starts from."""
    old = list(results.old_sources)
    new = [run.shift] if run.shift else list(results.shifts)
    return old, [s for s in dict.fromkeys(new) if s not in old]


def final_loss(run: RunRecord, source: str | None) -> float | None:
    """The run's dedicated end-of-run eval loss on ``source``; else its last logged validation loss; else None."""
    fin = run.final.get(source or "")
    if fin is not None:
        return finite(fin.loss)  # a NaN / inf eval loss stays missing: never replaced by a training-time value
    curve = run.val.get(source or "") or ()
    return finite(curve[-1].loss) if curve else None


def start_loss(run: RunRecord, source: str) -> float | None:
    """The loss of the run's CPT start checkpoint on ``source`` (None without one)."""
    st = (run.start or {}).get(source)
    return finite(st.loss) if st is not None else None


def mean_final_loss(results: StudyResults, run: RunRecord) -> float | None:
    """Unweighted mean of the final losses on the old sources and the run's shift (:func:`run_sources`; None if
    any is missing)."""
    old, new = run_sources(results, run)
    vals = [final_loss(run, s) for s in old + new]
    if not vals or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


def mean_forgetting(results: StudyResults, key: str) -> float | None:
    """Mean forgetting (old-source loss rise from the CPT start checkpoint to the end) of a CPT or control run:
    ``forgetting[key].mean_forgetting``, else final - start."""
    entry = results.forgetting.get(key)
    if entry is not None and entry.mean_forgetting is not None:
        return finite(entry.mean_forgetting)
    run = results.runs.get(key)
    if run is None:
        return None
    old, _ = run_sources(results, run)
    deltas = []
    for s in old:
        a, b = final_loss(run, s), start_loss(run, s)
        if a is None or b is None:
            return None
        deltas.append(a - b)
    return sum(deltas) / len(deltas) if deltas else None


def comparisons(results: StudyResults) -> dict[str, ComparisonRecord]:
    """``comparisons`` restricted to entries of known CPT and control runs (a stale entry is ignored)."""
    runs = results.runs
    return {k: v for k, v in results.comparisons.items()
            if k in runs and runs[k].kind in (RunKind.CPT, RunKind.CONTROL)}


def parent_flops_used(results: StudyResults, run: RunRecord) -> float | None:
    """FLOPs of the parent run up to the branch point (pro rata by steps), None when unknown."""
    parent = results.runs.get(run.parent or "")
    total = finite(parent.train_flops) if parent is not None else None
    if total is None:
        return None
    steps, at = finite(parent.steps), finite(run.parent_step)
    return total * at / steps if steps and at is not None and 0 <= at <= steps else total


#: The MRI windows of the rules (docs/study-rules.md, F2): W = max(MRI_WINDOW_MIN, ceil(N / MRI_WINDOW_DIV))
#: logged steps, i.e. max(3, ceil(0.1 N)).
MRI_WINDOW_MIN, MRI_WINDOW_DIV = 3, 10


def mri_window(n: int) -> int:
    """W = max(3, ceil(0.1 n)) logged steps, in integer arithmetic (no float rounding at the integers)."""
    return max(MRI_WINDOW_MIN, -(-n // MRI_WINDOW_DIV))


def mri_series(run: RunRecord | None, upto_step: float | None = None) -> list[tuple[float, float]]:
    """[(step, mean train MRI)] of a run's training log, sorted by step, optionally cut at ``upto_step``; entries
    without a finite step or MRI are left out."""
    if run is None:
        return []
    return sorted((float(e.step), float(e.mri_mean)) for e in run.train_mri
                  if e.step is not None and e.mri_mean is not None and (upto_step is None or e.step <= upto_step))
