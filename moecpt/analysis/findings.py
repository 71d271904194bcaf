"""Decide, from a study's ``results`` dict, whether each finding of Thérien et al. 2025 was reproduced.

Thérien et al., "Continual Pre-training of MoEs: How robust is your router?" (arXiv 2503.05029, TMLR 2025)
list six findings that a small run should reproduce *in direction* (``/work/shared/design/PAPERS.md``, part A):

F1  MoEs keep their sample-efficiency advantage over the FLOP-matched dense model through CPT.
F2  Penalty-balanced routing shows an MRI spike right after the shift and recovers to a lower MRI than Sinkhorn;
    Sinkhorn's MRI barely moves.
F3  Replay lowers forgetting of the old distribution and slightly slows adaptation; 0% replay forgets most.
F4  The infinite schedule + replay matches full re-training on the union at about one third of its compute.
F5  Routing changes most in the early layers; 0% replay changes it most.
F6  Granular beats Switch and penalty-balanced beats Sinkhorn in final loss.

Each decision rule below is a plain direction-of-effect test, like the paper's claims, stated in one sentence in
the entry's ``"rule"``. No significance test is attempted: a small study has one seed per cell, so a reproduced
finding means "the effect points the paper's way in these runs", nothing more.

:func:`evaluate_findings` returns one entry per finding::

    {"id": "F3", "title": ..., "reproduced": True | False | None, "figures": {...}, "rule": "..."}

``reproduced`` is ``None`` when the results hold no runs that test the finding (a partial study, a recipe without
retrain runs, a dense-only study...); the ``figures`` then say what was missing (``"untested"``). When a finding has
several parts (F2, F5, F6) it is decided on the parts that can be tested, and the untested parts are listed in
``figures["untested"]``. Scalars in ``figures`` are what the report's findings table shows; per-group numbers go
under ``figures["details"]`` (kept in ``study.json``, not in the table).

:func:`answer_questions` answers the paper's three questions briefly from the findings and the results.

The ``results`` schema is the one built by the study runner (see :mod:`moecpt.analysis.report`); every key is
optional here, so a partially finished study still gets a report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "evaluate_findings",
    "answer_questions",
    "CLAIMS",
    "run_sources",
    "final_loss",
    "mean_final_loss",
    "mean_forgetting",
    "mri_shift_stats",
    "sorted_run_keys",
    "is_moe_model",
    "comparisons",
]

#: The paper's claims, as short titles (PAPERS.md part A, "Findings a small run should reproduce").
CLAIMS: dict[str, str] = {
    "F1": "MoEs keep their sample-efficiency advantage over the FLOP-matched dense model through CPT",
    "F2": "Penalty-balanced routing spikes in MRI right after the shift and recovers to a lower MRI than Sinkhorn",
    "F3": "Replay lowers forgetting of the old distribution and slightly slows adaptation",
    "F4": "Infinite schedule + replay matches full re-training on the union at a fraction of its compute",
    "F5": "Routing changes most in the early layers, and most with 0% replay",
    "F6": "Granular beats Switch and penalty-balanced beats Sinkhorn in final loss",
}

#: F4 tolerance: CPT's mean final loss may exceed the retrain baseline's by at most this fraction.
F4_TOLERANCE = 0.02
#: F2 windows: the first / last this fraction of a run's logged steps.
MRI_WINDOW = 0.10


# ----------------------------------------------------------------------------------------------- small helpers
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
    vals = [v for v in (_num(x) for x in values) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _runs(results: Mapping) -> dict[str, dict]:
    runs = results.get("runs") or {}
    return {k: v for k, v in runs.items() if isinstance(v, Mapping)}


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


def _variant(run: Mapping) -> tuple:
    """A CPT variant: (shift, schedule, replay)."""
    return (run.get("shift"), run.get("schedule"), _replay(run))


_KIND_ORDER = {"pretrain": 0, "cpt": 1, "retrain": 2}
_SCHED_ORDER = {"inf": 0, "rewarm": 1}


def sorted_run_keys(results: Mapping, kind: str | None = None) -> list[str]:
    """Run keys in a stable reading order: pretrain, cpt, retrain; by model (as listed), shift, schedule, replay."""
    runs = _runs(results)
    model_order = {m: i for i, m in enumerate(_models(results))}

    def key(k: str) -> tuple:
        r = runs[k]
        return (_KIND_ORDER.get(r.get("kind"), 9), model_order.get(r.get("model"), 99), str(r.get("model")),
                str(r.get("shift")), _SCHED_ORDER.get(r.get("schedule"), 9), _replay(r), k)

    return sorted((k for k in runs if kind is None or runs[k].get("kind") == kind), key=key)


def run_sources(results: Mapping, run: Mapping) -> tuple[list[str], list[str]]:
    """(old sources, new sources) a run is judged on: the pre-training sources, and its shift; a run without a shift
    (pre-training) is judged on every shift of the study, to show where CPT starts from."""
    old = list(results.get("old_sources") or [])
    shift = run.get("shift")
    new = [shift] if shift else list(results.get("shifts") or [])
    return old, [s for s in dict.fromkeys(new) if s not in old]


def final_loss(run: Mapping, source: str) -> float | None:
    """The run's dedicated end-of-run eval loss on ``source``; else the last logged validation loss; else None."""
    fin = (run.get("final") or {}).get(source)
    if isinstance(fin, Mapping) and "loss" in fin:
        return _num(fin["loss"])  # a NaN / inf eval loss stays missing: never replaced by a training-time value
    curve = (run.get("val") or {}).get(source) or []
    if curve:
        try:
            return _num(curve[-1][2])
        except (IndexError, TypeError):
            return None
    return None


def _start_loss(run: Mapping, source: str) -> float | None:
    st = (run.get("start") or {}).get(source)
    return _num(st.get("loss")) if isinstance(st, Mapping) else None


def mean_final_loss(results: Mapping, run: Mapping) -> float | None:
    """Unweighted mean of the final losses on the old sources and the run's shift (None if any is missing)."""
    old, new = run_sources(results, run)
    srcs = old + new
    vals = [final_loss(run, s) for s in srcs]
    if not srcs or any(v is None for v in vals):
        return None
    return sum(vals) / len(vals)


def mean_forgetting(results: Mapping, key: str) -> float | None:
    """Mean forgetting (old-source loss rise) of a CPT run: ``results["forgetting"]``, else final - start."""
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


def _window(n: int) -> int:
    return max(1, int(math.ceil(MRI_WINDOW * n)))


def _mri_series(run: Mapping | None, upto_step: Any = None) -> list[tuple[float, float]]:
    """[(step, mean MRI)] of a run's training log, sorted by step, optionally cut at ``upto_step``."""
    if not run:
        return []
    out = []
    cut = _num(upto_step)
    for e in run.get("train_mri") or []:
        try:
            step, m = _num(e[0]), _num(e[1])
        except (IndexError, TypeError):
            continue
        if step is None or m is None or (cut is not None and step > cut):
            continue
        out.append((step, m))
    out.sort()
    return out


def mri_shift_stats(results: Mapping, key: str) -> dict | None:
    """Training-MRI statistics of one CPT run around its shift (Thérien et al. 2025, Fig. on MRI vs steps).

    - ``pre``: mean train MRI over the last 10% of the parent's logged steps before the branch point;
    - ``peak``: max train MRI over the first 10% of the CPT run's logged steps;
    - ``spike``: ``peak - pre``;
    - ``final``: mean train MRI over the last 10% of the CPT run's logged steps;
    - ``recovery_steps``: CPT steps from the run's first logged step until MRI first comes back within 10% of
      the spike above ``final`` after the peak (informational; the paper: about 500 of 95k steps).

    Returns None when the run has no training MRI (dense model, or not logged). ``pre``/``spike`` are None when the
    parent's log is missing.
    """
    runs = _runs(results)
    run = runs.get(key)
    cpt = _mri_series(run)
    if not cpt:
        return None
    n = _window(len(cpt))
    head, tail = cpt[:n], cpt[-n:]
    peak_step, peak = max(head, key=lambda e: e[1])
    final = sum(m for _, m in tail) / len(tail)
    parent = runs.get(run.get("parent") or "")
    pre_series = _mri_series(parent, run.get("parent_step"))
    pre = None
    if pre_series:
        last = pre_series[-_window(len(pre_series)):]
        pre = sum(m for _, m in last) / len(last)
    recovery = None
    threshold = final + 0.1 * max(peak - final, 0.0)
    for step, m in cpt:
        if step >= peak_step and m <= threshold:
            recovery = step - cpt[0][0]
            break
    span = cpt[-1][0] - cpt[0][0]
    return {
        "pre": pre,
        "peak": peak,
        "spike": None if pre is None else peak - pre,
        "final": final,
        "recovery_steps": recovery,
        "recovery_fraction": None if recovery is None or span <= 0 else recovery / span,
    }


def comparisons(results: Mapping) -> dict[str, dict]:
    """``results["comparisons"]`` restricted to entries of known CPT runs (a stale entry is ignored)."""
    runs = _runs(results)
    return {k: v for k, v in (results.get("comparisons") or {}).items()
            if isinstance(v, Mapping) and runs.get(k, {}).get("kind") == "cpt"}


def _entry(fid: str, reproduced: bool | None, figures: dict, rule: str) -> dict:
    return {"id": fid, "title": CLAIMS[fid], "reproduced": reproduced, "figures": figures, "rule": rule}


def _cpt_by_model(results: Mapping) -> dict[str, dict[tuple, str]]:
    """{model: {variant: cpt run key}} (first key wins for a duplicated variant)."""
    out: dict[str, dict[tuple, str]] = {}
    runs = _runs(results)
    for k in sorted_run_keys(results, "cpt"):
        out.setdefault(runs[k].get("model"), {}).setdefault(_variant(runs[k]), k)
    return out


def _replay_groups(results: Mapping, models: Iterable[str] | None = None) -> dict[tuple, dict[float, str]]:
    """{(model, shift, schedule): {replay: cpt run key}}."""
    runs = _runs(results)
    wanted = None if models is None else set(models)
    out: dict[tuple, dict[float, str]] = {}
    for k in sorted_run_keys(results, "cpt"):
        r = runs[k]
        if wanted is not None and r.get("model") not in wanted:
            continue
        out.setdefault((r.get("model"), r.get("shift"), r.get("schedule")), {}).setdefault(_replay(r), k)
    return out


def _gname(g: tuple) -> str:
    return "/".join(str(x) for x in g)


# --------------------------------------------------------------------------------------------------- findings
def _f1(results: Mapping) -> dict:
    rule = ("Reproduced when, for every CPT variant (shift, schedule, replay) run by both a dense model and an MoE, "
            "each MoE's final loss on every old source and on the new source is below the dense model's.")
    models = _models(results)
    runs = _runs(results)
    dense = [m for m in models if is_moe_model(results, m) is False]
    moes = [m for m in models if is_moe_model(results, m)]
    by_model = _cpt_by_model(results)
    details, untested = [], []
    if not dense:
        untested.append("no dense model")
    if not moes:
        untested.append("no MoE model")
    n_cmp = n_lower = 0
    margins: list[float] = []
    f_dense: list[float] = []
    f_moe: list[float] = []
    for d in dense:
        for m in moes:
            for v in sorted(set(by_model.get(d, {})) & set(by_model.get(m, {})), key=str):
                kd, km = by_model[d][v], by_model[m][v]
                old, new = run_sources(results, runs[km])
                for s in old + new:
                    ld, lm = final_loss(runs[kd], s), final_loss(runs[km], s)
                    if ld is None or lm is None:
                        continue
                    n_cmp += 1
                    n_lower += lm < ld
                    margins.append(lm - ld)
                    details.append({"dense_run": kd, "moe_run": km, "source": s, "dense_loss": _r(ld),
                                    "moe_loss": _r(lm), "moe_minus_dense": _r(lm - ld)})
                fd, fm = mean_forgetting(results, kd), mean_forgetting(results, km)
                if fd is not None and fm is not None:
                    f_dense.append(fd)
                    f_moe.append(fm)
    if dense and moes and n_cmp == 0:
        untested.append("no CPT variant run by both a dense model and an MoE")
    figures: dict[str, Any] = {"comparisons": n_cmp, "moe_lower": n_lower}
    if margins:
        figures["mean_moe_minus_dense"] = _r(sum(margins) / len(margins))
        figures["worst_moe_minus_dense"] = _r(max(margins))
    if f_dense:
        figures["mean_forgetting_dense"] = _r(sum(f_dense) / len(f_dense))
        figures["mean_forgetting_moe"] = _r(sum(f_moe) / len(f_moe))
    act = {m: _num(models[m].get("active_params")) for m in dense + moes}
    if dense and moes and act.get(dense[0]) and all(act.get(m) for m in moes):
        figures["active_params_moe_over_dense"] = _r(_mean(act[m] for m in moes) / act[dense[0]], 4)
    if untested:
        figures["untested"] = untested
    figures["details"] = details
    reproduced = None if n_cmp == 0 else n_lower == n_cmp
    return _entry("F1", reproduced, figures, rule)


def _f2(results: Mapping) -> dict:
    rule = ("Over CPT runs matched by (arch, shift, schedule, replay), reproduced when the penalty-balanced runs' mean "
            "MRI spike (max train MRI in the first 10% of CPT steps minus the mean over the last 10% of pre-training "
            "steps before the branch) exceeds the Sinkhorn runs' mean spike, and their mean final MRI (last 10% of "
            "CPT steps) is lower.")
    models = _models(results)
    runs = _runs(results)
    pairs: dict[tuple, dict[str, list[dict]]] = {}
    for k in sorted_run_keys(results, "cpt"):
        r = runs[k]
        info = models.get(r.get("model"), {})
        router = info.get("router")
        if router not in ("penalty", "sinkhorn") or not is_moe_model(results, r.get("model")):
            continue
        st = mri_shift_stats(results, k)
        if st is None or st["spike"] is None:
            continue
        pairs.setdefault((info.get("arch"),) + _variant(r), {}).setdefault(router, []).append(dict(st, run=k))
    matched = {g: d for g, d in pairs.items() if "penalty" in d and "sinkhorn" in d}
    figures: dict[str, Any] = {"matched_pairs": len(matched)}
    if not matched:
        have = sorted({r for d in pairs.values() for r in d})
        figures["untested"] = [f"no matched penalty/sinkhorn CPT runs with train MRI (routers with MRI: {have})"]
        figures["details"] = []
        return _entry("F2", None, figures, rule)
    rows = []
    for g, d in matched.items():
        row = {"group": _gname(g)}
        for router, tag in (("penalty", "pb"), ("sinkhorn", "sb")):
            row[f"{tag}_spike"] = _mean(s["spike"] for s in d[router])
            row[f"{tag}_final"] = _mean(s["final"] for s in d[router])
            row[f"{tag}_recovery_fraction"] = _mean(s["recovery_fraction"] for s in d[router])
            row[f"{tag}_runs"] = [s["run"] for s in d[router]]
        rows.append(row)
    pb_spike = _mean(r["pb_spike"] for r in rows)
    sb_spike = _mean(r["sb_spike"] for r in rows)
    pb_final = _mean(r["pb_final"] for r in rows)
    sb_final = _mean(r["sb_final"] for r in rows)
    figures.update({
        "pb_spike": _r(pb_spike), "sb_spike": _r(sb_spike),
        "pb_final_mri": _r(pb_final), "sb_final_mri": _r(sb_final),
        "pairs_pb_spike_higher": sum(r["pb_spike"] > r["sb_spike"] for r in rows),
        "pairs_pb_final_lower": sum(r["pb_final"] < r["sb_final"] for r in rows),
    })
    rec = _mean(r["pb_recovery_fraction"] for r in rows)
    if rec is not None:
        figures["pb_recovery_fraction_of_cpt"] = _r(rec, 3)
    figures["details"] = [{k: (_r(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return _entry("F2", bool(pb_spike > sb_spike and pb_final < sb_final), figures, rule)


def _f3(results: Mapping) -> dict:
    rule = ("Reproduced when, for every (model, shift, schedule) run at two or more replay fractions, mean forgetting "
            "at the smallest replay is larger than at the largest replay, and the final new-source loss at the largest "
            "replay is at least the loss at the smallest replay (replay slows adaptation).")
    runs = _runs(results)
    details = []
    for g, by_replay in _replay_groups(results).items():
        if len(by_replay) < 2:
            continue
        lo, hi = min(by_replay), max(by_replay)
        klo, khi = by_replay[lo], by_replay[hi]
        f_lo, f_hi = mean_forgetting(results, klo), mean_forgetting(results, khi)
        shift = g[1]
        a_lo = final_loss(runs[klo], shift) if shift else None
        a_hi = final_loss(runs[khi], shift) if shift else None
        if None in (f_lo, f_hi, a_lo, a_hi):
            continue
        all_f = {rp: mean_forgetting(results, k) for rp, k in by_replay.items()}
        details.append({
            "group": _gname(g), "replay_min": lo, "replay_max": hi,
            "forgetting_min_replay": _r(f_lo), "forgetting_max_replay": _r(f_hi),
            "new_loss_min_replay": _r(a_lo), "new_loss_max_replay": _r(a_hi),
            "less_forgetting": f_lo > f_hi, "slower_adaptation": a_hi >= a_lo,
            "min_replay_forgets_most": all(f_lo >= v for v in all_f.values() if v is not None),
        })
    figures: dict[str, Any] = {"groups": len(details)}
    if not details:
        figures["untested"] = ["no (model, shift, schedule) with CPT runs at two replay fractions and their losses"]
        figures["details"] = []
        return _entry("F3", None, figures, rule)
    figures.update({
        "replay_min": min(d["replay_min"] for d in details),
        "replay_max": max(d["replay_max"] for d in details),
        "groups_less_forgetting": sum(d["less_forgetting"] for d in details),
        "groups_slower_adaptation": sum(d["slower_adaptation"] for d in details),
        "groups_min_replay_forgets_most": sum(d["min_replay_forgets_most"] for d in details),
        "mean_forgetting_min_replay": _r(_mean(d["forgetting_min_replay"] for d in details)),
        "mean_forgetting_max_replay": _r(_mean(d["forgetting_max_replay"] for d in details)),
        "mean_new_loss_min_replay": _r(_mean(d["new_loss_min_replay"] for d in details)),
        "mean_new_loss_max_replay": _r(_mean(d["new_loss_max_replay"] for d in details)),
        "details": details,
    })
    ok = all(d["less_forgetting"] and d["slower_adaptation"] for d in details)
    return _entry("F3", ok, figures, rule)


def _parent_flops_used(results: Mapping, run: Mapping) -> float | None:
    """FLOPs of the parent run up to the branch point (pro rata by steps), None when unknown."""
    parent = _runs(results).get(run.get("parent") or "")
    if not parent:
        return None
    total = _num(parent.get("train_flops"))
    if total is None:
        return None
    steps, at = _num(parent.get("steps")), _num(run.get("parent_step"))
    if steps and at is not None and 0 <= at <= steps:
        return total * at / steps
    return total


def _f4(results: Mapping) -> dict:
    rule = (f"Reproduced when, for every (model, shift) with a full re-training run, the infinite-schedule CPT run "
            f"with the largest replay reaches a mean (old + new sources) final loss at most "
            f"{F4_TOLERANCE:.0%} above the re-training run's; the compute ratio is that CPT run's FLOPs over the "
            f"re-training run's.")
    runs = _runs(results)
    details, untested = [], []
    retrains = sorted_run_keys(results, "retrain")
    if not retrains:
        untested.append("no retrain run")
    for rk in retrains:
        rr = runs[rk]
        cands = [k for k in sorted_run_keys(results, "cpt")
                 if runs[k].get("model") == rr.get("model") and runs[k].get("shift") == rr.get("shift")
                 and runs[k].get("schedule") == "inf"]
        if not cands:
            untested.append(f"no inf-schedule CPT run for {rr.get('model')}/{rr.get('shift')}")
            continue
        ck = max(cands, key=lambda k: _replay(runs[k]))
        cr = runs[ck]
        lc, lr = mean_final_loss(results, cr), mean_final_loss(results, rr)
        if lc is None or lr is None or lr <= 0:
            untested.append(f"missing final losses for {ck} or {rk}")
            continue
        fc, fr = _num(cr.get("train_flops")), _num(rr.get("train_flops"))
        fp = _parent_flops_used(results, cr)
        row = {"cpt_run": ck, "retrain_run": rk, "replay": _replay(cr), "cpt_mean_loss": _r(lc),
               "retrain_mean_loss": _r(lr), "relative_gap": _r(lc / lr - 1.0), "within_tolerance":
               lc <= lr * (1.0 + F4_TOLERANCE)}
        if fc is not None and fr:
            row["compute_ratio"] = _r(fc / fr, 4)
            if fp is not None:
                row["compute_ratio_with_pretrain"] = _r((fc + fp) / fr, 4)
        details.append(row)
    figures: dict[str, Any] = {"pairs": len(details)}
    if details:
        figures.update({
            "pairs_within_tolerance": sum(d["within_tolerance"] for d in details),
            "cpt_mean_loss": _r(_mean(d["cpt_mean_loss"] for d in details)),
            "retrain_mean_loss": _r(_mean(d["retrain_mean_loss"] for d in details)),
            "max_relative_gap": _r(max(d["relative_gap"] for d in details)),
            "replay": max(d["replay"] for d in details),
        })
        ratio = _mean(d.get("compute_ratio") for d in details)
        if ratio is not None:
            figures["compute_ratio"] = _r(ratio, 4)
        ratio_p = _mean(d.get("compute_ratio_with_pretrain") for d in details)
        if ratio_p is not None:
            figures["compute_ratio_with_pretrain"] = _r(ratio_p, 4)
    if untested:
        figures["untested"] = untested
    figures["details"] = details
    reproduced = all(d["within_tolerance"] for d in details) if details else None
    return _entry("F4", reproduced, figures, rule)


def _f5(results: Mapping) -> dict:
    rule = ("Reproduced when (a) averaged over the MoE CPT runs, the Continual Router Saturation of the first MoE "
            "layer is below the mean CRS of the remaining MoE layers (lower CRS = routing changed more), and (b) for "
            "every (model, shift, schedule) with two or more replay fractions, mean CRS at the smallest replay is "
            "below the mean CRS at the largest replay.")
    comps = comparisons(results)
    untested, parts = [], []
    figures: dict[str, Any] = {"runs_compared": len(comps)}
    firsts, rests = [], []
    for k in sorted(comps):
        layers = [v for v in (_num(x) for x in comps[k].get("crs_layers") or []) if v is not None]
        if len(layers) >= 2:
            firsts.append(layers[0])
            rests.append(sum(layers[1:]) / len(layers[1:]))
    if firsts:
        first, rest = sum(firsts) / len(firsts), sum(rests) / len(rests)
        figures["crs_first_layer"] = _r(first)
        figures["crs_other_layers"] = _r(rest)
        parts.append(first < rest)
    else:
        untested.append("(a) layers: no CPT comparison with two or more MoE layers")
    details = []
    crs_of = {k: _num(c.get("crs_mean")) if _num(c.get("crs_mean")) is not None else _mean(c.get("crs_layers") or [])
              for k, c in comps.items()}
    for g, by_replay in _replay_groups(results).items():
        have = {rp: crs_of[k] for rp, k in by_replay.items() if crs_of.get(k) is not None}
        if len(have) < 2:
            continue
        lo, hi = min(have), max(have)
        details.append({"group": _gname(g), "replay_min": lo, "replay_max": hi, "crs_min_replay": _r(have[lo]),
                        "crs_max_replay": _r(have[hi]), "changed_more_without_replay": have[lo] < have[hi]})
    if details:
        figures["groups"] = len(details)
        figures["groups_changed_more_without_replay"] = sum(d["changed_more_without_replay"] for d in details)
        figures["crs_min_replay"] = _r(_mean(d["crs_min_replay"] for d in details))
        figures["crs_max_replay"] = _r(_mean(d["crs_max_replay"] for d in details))
        parts.append(all(d["changed_more_without_replay"] for d in details))
    else:
        untested.append("(b) replay: no MoE (model, shift, schedule) with CRS at two replay fractions")
    if untested:
        figures["untested"] = untested
    figures["details"] = details
    return _entry("F5", all(parts) if parts else None, figures, rule)


def _pair_means(results: Mapping, a_models: list[str], b_models: list[str],
                pair_ok) -> tuple[list[float], list[float], int]:
    """Mean final losses of matched CPT runs (same variant) for every model pair (a, b) with ``pair_ok(a, b)``."""
    runs = _runs(results)
    by_model = _cpt_by_model(results)
    la, lb = [], []
    n_pairs = 0
    for a in a_models:
        for b in b_models:
            if not pair_ok(a, b):
                continue
            common = set(by_model.get(a, {})) & set(by_model.get(b, {}))
            used = False
            for v in sorted(common, key=str):
                x = mean_final_loss(results, runs[by_model[a][v]])
                y = mean_final_loss(results, runs[by_model[b][v]])
                if x is None or y is None:
                    continue
                la.append(x)
                lb.append(y)
                used = True
            n_pairs += used
    return la, lb, n_pairs


def _f6(results: Mapping) -> dict:
    rule = ("Reproduced when, on CPT runs matched by variant, (a) Granular models (paired with Switch models of the "
            "same router) have a lower mean final loss (old + new sources) than Switch, and (b) penalty-balanced "
            "models (paired with Sinkhorn models of the same architecture) have a lower mean final loss than Sinkhorn; "
            "decided on the parts that can be tested.")
    models = _models(results)
    moes = [m for m in models if is_moe_model(results, m)]
    arch = {m: models[m].get("arch") for m in moes}
    router = {m: models[m].get("router") for m in moes}
    figures: dict[str, Any] = {}
    untested, parts = [], []
    g, s, n = _pair_means(results, [m for m in moes if arch[m] == "granular"], [m for m in moes if arch[m] == "switch"],
                          lambda a, b: router[a] == router[b])
    if g:
        figures.update({"granular_mean_loss": _r(sum(g) / len(g)), "switch_mean_loss": _r(sum(s) / len(s)),
                        "arch_matched_runs": len(g), "arch_model_pairs": n})
        parts.append(sum(g) / len(g) < sum(s) / len(s))
    else:
        untested.append("(a) Granular vs Switch: needs a Granular and a Switch MoE with the same router and matching "
                        "CPT runs")
    p, k, n = _pair_means(results, [m for m in moes if router[m] == "penalty"],
                          [m for m in moes if router[m] == "sinkhorn"], lambda a, b: arch[a] == arch[b])
    if p:
        figures.update({"penalty_mean_loss": _r(sum(p) / len(p)), "sinkhorn_mean_loss": _r(sum(k) / len(k)),
                        "router_matched_runs": len(p), "router_model_pairs": n})
        parts.append(sum(p) / len(p) < sum(k) / len(k))
    else:
        untested.append("(b) penalty vs Sinkhorn: needs a penalty- and a Sinkhorn-balanced MoE of the same "
                        "architecture with matching CPT runs")
    if untested:
        figures["untested"] = untested
    return _entry("F6", all(parts) if parts else None, figures, rule)


def evaluate_findings(results: Mapping) -> list[dict]:
    """Decide F1..F6 of Thérien et al. 2025 (arXiv 2503.05029) from a study's ``results``.

    Returns:
        Six dicts, in order F1..F6: ``{"id", "title", "reproduced": True | False | None, "figures": {...},
        "rule": str}``. ``None`` means untested (no runs in ``results`` test it); ``figures["untested"]`` lists
        what was missing. Never raises on a partial ``results`` (missing keys are treated as absent runs).
    """
    return [f(results) for f in (_f1, _f2, _f3, _f4, _f5, _f6)]


# -------------------------------------------------------------------------------------------------- questions
def _mri_before_after(results: Mapping) -> list[dict]:
    """Old-source eval MRI at the CPT start checkpoint and after CPT, per MoE CPT run and old source."""
    runs = _runs(results)
    rows = []
    for k in sorted_run_keys(results, "cpt"):
        r = runs[k]
        if not is_moe_model(results, r.get("model")):
            continue
        old, _ = run_sources(results, r)
        for s in old:
            st = (r.get("start") or {}).get(s) or {}
            fi = (r.get("final") or {}).get(s) or {}
            b, a = _num(st.get("mri_mean")), _num(fi.get("mri_mean"))
            if b is not None and a is not None:
                rows.append({"run": k, "source": s, "before": b, "after": a})
    return rows


def answer_questions(results: Mapping, findings: list[dict] | None = None) -> list[dict]:
    """Brief answers to the paper's three questions, from the findings and the results.

    Returns three dicts ``{"question", "answer", "figures"}``; the answer's numbers are the ``figures`` values
    (formatted with 4 significant digits), so a report that prints them stays traceable to ``study.json``.
    """
    from moecpt.analysis.report import fmt  # one number formatter for the whole report

    fs = {f["id"]: f for f in (findings if findings is not None else evaluate_findings(results))}

    def fig(fid: str, key: str) -> Any:
        return fs.get(fid, {}).get("figures", {}).get(key)

    def status(fid: str) -> str:
        rep = fs.get(fid, {}).get("reproduced")
        return {True: "reproduced", False: "not reproduced", None: "untested"}[rep]

    out = []
    # Q1
    fd, fm = fig("F1", "mean_forgetting_dense"), fig("F1", "mean_forgetting_moe")
    q1f = {"mean_forgetting_dense": fd, "mean_forgetting_moe": fm,
           "moe_lower": fig("F1", "moe_lower"), "comparisons": fig("F1", "comparisons")}
    if fd is None or fm is None:
        a1 = "Untested: the study has no CPT variant run by both a dense model and an MoE."
    else:
        verdict = "No" if fm <= fd else "Yes"
        a1 = (f"{verdict}: on matched CPT runs, mean forgetting is {fmt(fm)} for the MoEs vs {fmt(fd)} for the dense "
              f"model; the MoEs' final loss is lower in {fmt(q1f['moe_lower'])} of {fmt(q1f['comparisons'])} "
              f"source comparisons (F1 {status('F1')}).")
    out.append({"question": "Do MoE routers make forgetting worse than in a FLOP-matched dense model?",
                "answer": a1, "figures": q1f})
    # Q2
    rows = _mri_before_after(results)
    q2f: dict[str, Any] = {"runs": len(rows)}
    if rows:
        q2f["old_mri_before"] = _r(_mean(r["before"] for r in rows))
        q2f["old_mri_after"] = _r(_mean(r["after"] for r in rows))
        q2f["old_mri_max_rise"] = _r(max(r["after"] - r["before"] for r in rows))
        kept = q2f["old_mri_after"] <= 1.1 * q2f["old_mri_before"]
        a2 = (f"{'Yes' if kept else 'Not fully'}: on the old source's held-out tokens, the mean MRI is "
              f"{fmt(q2f['old_mri_after'])} after CPT vs {fmt(q2f['old_mri_before'])} before (largest rise "
              f"{fmt(q2f['old_mri_max_rise'])}; 'yes' means a mean rise of at most 10%). "
              f"The training-MRI spike at the shift: F2 {status('F2')}.")
    else:
        a2 = f"Untested on held-out data (no MoE CPT run with old-source MRI before and after); F2 {status('F2')}."
    out.append({"question": "Do routers keep a balanced load on the previous distribution after CPT?",
                "answer": a2, "figures": q2f})
    # Q3
    q3f = {"F3": fs.get("F3", {}).get("reproduced"), "F4": fs.get("F4", {}).get("reproduced"),
           "mean_forgetting_min_replay": fig("F3", "mean_forgetting_min_replay"),
           "mean_forgetting_max_replay": fig("F3", "mean_forgetting_max_replay"),
           "max_relative_gap": fig("F4", "max_relative_gap"), "compute_ratio": fig("F4", "compute_ratio")}
    parts3 = []
    if q3f["mean_forgetting_min_replay"] is not None:
        parts3.append(f"replay changes mean forgetting from {fmt(q3f['mean_forgetting_min_replay'])} to "
                      f"{fmt(q3f['mean_forgetting_max_replay'])} (F3 {status('F3')})")
    else:
        parts3.append(f"replay: F3 {status('F3')}")
    if q3f["max_relative_gap"] is not None:
        s = (f"the infinite schedule with replay ends {fmt(q3f['max_relative_gap'])} (relative) from full re-training"
             f"{'' if q3f['compute_ratio'] is None else ' at ' + fmt(q3f['compute_ratio']) + ' of its compute'}")
        parts3.append(f"{s} (F4 {status('F4')})")
    else:
        parts3.append(f"against full re-training: F4 {status('F4')}")
    verdict3 = {True: "Yes", False: "Not fully"}.get(
        None if q3f["F3"] is None and q3f["F4"] is None else bool(q3f["F3"] is not False and q3f["F4"] is not False),
        "Untested")
    out.append({"question": "Are the dense CPT strategies (replay, re-warming, infinite schedules) enough for MoEs?",
                "answer": f"{verdict3}: " + "; ".join(parts3) + ".", "figures": q3f})
    return out
