"""Decide, from a study's ``results`` dict, whether each finding of Thérien et al. 2025 was reproduced.

Thérien et al., "Continual Pre-training of MoEs: How robust is your router?" (arXiv 2503.05029, TMLR 2025) list
six findings that a small run should reproduce. The decision rules are those of ``docs/study-rules.md``, written
before any real run; this module implements them exactly and nothing looser:

F1  MoEs keep their advantage over the FLOP-matched dense model through CPT.
F2  Penalty-balanced routing spikes in MRI after the shift, recovers, and ends below Sinkhorn; Sinkhorn barely moves.
F3  Replay lowers forgetting and slightly slows adaptation; 0% replay forgets most.
F4  The infinite schedule with replay matches full re-training at about a third of its compute.
F5  Routing changes most in the early layers, and most with 0% replay.
F6  Granular beats Switch and penalty-balanced beats Sinkhorn in final loss.

**From seeds to a verdict** (``docs/study-rules.md``, "From seeds to a verdict"). Every part of a rule is an effect
``e`` computed once per seed (runs of one seed are compared with runs of the same seed only), signed so that
``e > 0`` is the paper's direction. Over the ``n`` seeds the figure is the mean of ``e`` with its 95% Student-t
interval ``mean ± t(0.975, n-1) · sd / sqrt(n)`` (:func:`effect_stats`, :func:`t_quantile_975`), the spread
(min to max) and the number of seeds agreeing (whose own ``e`` points the paper's way).

- A *directional* part is reproduced when the interval lies above zero, not reproduced when it lies below zero,
  inconclusive otherwise.
- An *equivalence* part has a margin ``τ``: reproduced when the interval lies inside ``(-τ, τ)``, not reproduced
  when it lies wholly outside, inconclusive otherwise. F4 (a) is one-sided: reproduced when the lower end is at
  least ``-τ``, not reproduced when the upper end is below ``-τ``.
- A *check* (F4 b, the compute ratio) is arithmetic, not a seed statistic: reproduced or not.
- With one seed there is no interval: every directional / equivalence part is inconclusive.
- A finding is reproduced when all its tested parts are, not reproduced when any part is not, inconclusive
  otherwise, and untested when no part could be tested (the untested parts are named).

:func:`evaluate_findings` returns one entry per finding::

    {"id", "title", "verdict": "reproduced" | "not reproduced" | "inconclusive" | "untested",
     "reproduced": True | False | None, "rule", "evidence", "n_seeds",
     "parts": [{"name", "title", "kind", "verdict", "n_seeds", "mean", "lo", "hi", "min", "max", "per_seed",
                "seeds_agreeing", "margin", "untested"}],
     "figures": {flat scalars for the findings table ..., "untested": [...]?, "details": [rows]}}

:func:`answer_questions` answers the paper's three questions by the rules of ``docs/study-rules.md``.

The results are read as the records of :mod:`moecpt.study.results` (the schema; a ``results`` dict given to a
public function here is parsed first), through the readers the report and the plots share
(:mod:`moecpt.study.readers`). A partially finished study still gets a report; a study without no-shift controls
leaves the parts that need one untested.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moecpt.study.numbers import finite, finite_mean, fmt, round_sig
from moecpt.study.readers import (
    comparisons, final_loss, is_moe_model, mean_final_loss, mean_forgetting, mri_series, mri_window,
    parent_flops_used, run_sources, sorted_run_keys, start_loss,
)
from moecpt.study.results import ComparisonRecord, RunRecord, StudyResults, as_results
from moecpt.study.stats import check_stats, effect_stats, sample_sd, t_interval, t_quantile_975

__all__ = [
    "evaluate_findings",
    "answer_questions",
    "effect_stats",
    "t_quantile_975",
    "CLAIMS",
    "run_sources",
    "final_loss",
    "mean_final_loss",
    "mean_forgetting",
    "mri_shift_stats",
    "sorted_run_keys",
    "is_moe_model",
    "comparisons",
    "control_key",
]

#: The paper's claims, as short titles (docs/study-rules.md, "The rules").
CLAIMS: dict[str, str] = {
    "F1": "MoEs keep their advantage over the FLOP-matched dense model through CPT",
    "F2": "Penalty-balanced routing spikes in MRI after the shift, recovers, and ends below Sinkhorn; "
          "Sinkhorn barely moves",
    "F3": "Replay lowers forgetting and slightly slows adaptation; 0% replay forgets most",
    "F4": "The infinite schedule with replay matches full re-training at about a third of its compute",
    "F5": "Routing changes most in the early layers, and most with 0% replay",
    "F6": "Granular beats Switch and penalty-balanced beats Sinkhorn in final loss",
}

#: F4 (a): the equivalence margin is the re-training loss's relative sd over seeds, at most this (and this with
#: one seed); F4 (b): CPT FLOPs over re-training FLOPs must be at most this.
F4_TAU_MAX, F4_COMPUTE_MAX = 0.01, 0.4
#: Question 2: the old-source eval MRI may rise above the control's by at most this fraction of the control's.
Q2_MRI_FRACTION = 0.10


# ----------------------------------------------------------------------------------------------- small helpers
def _variant(run: RunRecord) -> tuple:
    """A CPT variant: (shift, schedule, replay)."""
    return (run.shift, run.schedule, run.replay_or_zero)


def control_key(results: StudyResults | Mapping, key: str) -> str | None:
    """The no-shift control of a CPT run: its ``"control"`` entry, else the control run of the same seed, model and
    schedule (old results have neither: None). ``results`` may be the dict: it is parsed."""
    results = as_results(results)
    runs = results.runs
    run = runs.get(key)
    if run is None:
        return None
    ck = run.control
    if ck is not None:
        return ck if ck in runs and runs[ck].kind == "control" else None
    for k in sorted_run_keys(results, "control"):
        c = runs[k]
        if (c.seed, c.model, c.schedule) == (run.seed, run.model, run.schedule):
            return k
    return None


def _final_mri(run: RunRecord, source: str) -> float | None:
    fin = run.final.get(source)
    return finite(fin.mri_mean) if fin is not None else None


def _old_final_loss(results: StudyResults, run: RunRecord) -> float | None:
    """Mean final loss over the old sources (None if any is missing)."""
    old, _ = run_sources(results, run)
    vals = [final_loss(run, s) for s in old]
    return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)


def mri_shift_stats(results: StudyResults | Mapping, key: str) -> dict | None:
    """Training-MRI windows of one CPT or control run around the shift (F2 of ``docs/study-rules.md``; Thérien et
    al. 2025, arXiv 2503.05029, MRI against steps).

    ``W = max(3, ceil(0.1 N))`` logged steps, ``N`` the run's logged steps; ``pre`` = the parent's last ``W``
    logged steps up to the branch point (``parent_step``, in the parent's steps), ``post`` = the run's first ``W``,
    ``end`` = its last ``W``. Returns ``{"window", "n_logged", "pre_mean", "pre_max", "post_mean", "post_max",
    "end_mean", "end_max", "spike": max(post) - max(pre), "noise": 2 sd(pre)}`` plus the aliases ``pre``
    (= pre_mean), ``peak`` (= post_max) and ``final`` (= end_mean). The pre-window values, spike and noise are None
    when the parent logged fewer than ``W`` steps before the branch (the windows must be equal). Returns None when
    the run logged fewer than ``W`` steps (a dense model, or MRI not logged). ``results`` may be the dict: it is
    parsed.
    """
    runs = as_results(results).runs
    run = runs.get(key)
    series = [m for _, m in mri_series(run)]
    n = len(series)
    w = mri_window(n)
    if n < w:
        return None
    post, end = series[:w], series[-w:]
    parent = runs.get(run.parent or "")
    pre = [m for _, m in mri_series(parent, run.parent_step)][-w:]
    have_pre = len(pre) == w
    out = {
        "window": w, "n_logged": n,
        "pre_mean": sum(pre) / w if have_pre else None, "pre_max": max(pre) if have_pre else None,
        "post_mean": sum(post) / w, "post_max": max(post),
        "end_mean": sum(end) / w, "end_max": max(end),
        "spike": max(post) - max(pre) if have_pre else None,
        "noise": 2.0 * sample_sd(pre) if have_pre else None,
    }
    out.update(pre=out["pre_mean"], peak=out["post_max"], final=out["end_mean"])
    return out


# ------------------------------------------------------------------------------------------------- statistics

def _collect(acc: dict[int, list[float]], seed: int, value: float | None) -> None:
    if value is not None:
        acc.setdefault(seed, []).append(value)


def _seed_means(acc: Mapping[int, list[float]]) -> dict[int, float]:
    """One effect per seed: the mean over that seed's groups / runs."""
    return {s: sum(v) / len(v) for s, v in sorted(acc.items()) if v}


def _part(name: str, title: str, kind: str, acc: Mapping[int, list[float]], untested: str, *,
          margin: float | None = None, one_sided: bool = False, limit: float | None = None) -> dict:
    """One part of a rule: its per-seed effect decided by :func:`effect_stats` (or :func:`_check_stats` for a
    check). ``untested`` is the reason shown when no seed has the effect."""
    per_seed = _seed_means(acc)
    st = (check_stats(per_seed, limit) if kind == "check"
          else effect_stats(per_seed, kind, margin, one_sided=one_sided))
    st = {"name": name, "title": title, **st, "untested": None}
    if st["verdict"] == "untested":
        st["untested"] = untested
    return st


def _combine(verdicts: list[str]) -> str:
    """All tested parts reproduced -> reproduced; any not reproduced -> not reproduced; no tested part -> untested;
    else inconclusive."""
    tested = [v for v in verdicts if v != "untested"]
    if not tested:
        return "untested"
    if "not reproduced" in tested:
        return "not reproduced"
    return "reproduced" if all(v == "reproduced" for v in tested) else "inconclusive"


def _stat_text(p: Mapping) -> str:
    """A part's figure as text: mean [lo, hi] (spread min to max below 3 seeds), seeds agreeing."""
    if p["verdict"] == "untested":
        return f"untested ({p['untested']})"
    if p["kind"] == "check":
        return f"{fmt(p['mean'])} (limit {fmt(p['margin'])})"
    if p["n_seeds"] == 1:
        way = "the paper's way" if p["seeds_agreeing"] else "against the paper"
        return f"{fmt(p['mean'])}, one seed: no interval, it points {way}"
    txt = f"{fmt(p['mean'])} [{fmt(p['lo'])}, {fmt(p['hi'])}]"
    if p["n_seeds"] < 3:
        txt += f" (spread {fmt(p['min'])} to {fmt(p['max'])})"
    if p["margin"] is not None:
        txt += f", margin {fmt(p['margin'])}"
    return f"{txt}, {fmt(p['seeds_agreeing'])}/{fmt(p['n_seeds'])} seeds"


def _entry(fid: str, rule: str, parts: list[dict], extra: Mapping[str, Any], details: list[dict]) -> dict:
    """A finding: its verdict combined from the parts, a one-sentence evidence and flat figures."""
    verdict = _combine([p["verdict"] for p in parts])
    figures: dict[str, Any] = {}
    for p in parts:
        if p["verdict"] == "untested":
            continue
        n = p["name"]
        figures.update({f"{n}_mean": p["mean"], f"{n}_lo": p["lo"], f"{n}_hi": p["hi"],
                        f"{n}_seeds_agreeing": p["seeds_agreeing"]})
        if p["margin"] is not None:
            figures[f"{n}_margin"] = p["margin"]
    figures.update(extra)
    untested = [f"({p['name']}) {p['untested']}" for p in parts if p["verdict"] == "untested"]
    if untested:
        figures["untested"] = untested
    figures["details"] = details
    seeds = {s for p in parts for s in p["per_seed"]}
    return {"id": fid, "title": CLAIMS[fid], "verdict": verdict,
            "reproduced": True if verdict == "reproduced" else False if verdict == "not reproduced" else None,
            "rule": rule, "evidence": "; ".join(f"({p['name']}) {p['title']} {_stat_text(p)}" for p in parts) + ".",
            "n_seeds": len(seeds), "parts": parts, "figures": figures}


def _round_row(row: Mapping) -> dict:
    return {k: (round_sig(v) if isinstance(v, float) else v) for k, v in row.items()}


def _cpt_index(results: StudyResults) -> dict[tuple, str]:
    """{(seed, model, variant): cpt run key} (first key wins for a duplicated cell)."""
    runs = results.runs
    out: dict[tuple, str] = {}
    for k in sorted_run_keys(results, "cpt"):
        out.setdefault((runs[k].seed, runs[k].model, _variant(runs[k])), k)
    return out


def _replay_groups(results: StudyResults) -> dict[tuple, dict[float, str]]:
    """{(seed, model, shift, schedule): {replay: cpt run key}}."""
    runs = results.runs
    out: dict[tuple, dict[float, str]] = {}
    for k in sorted_run_keys(results, "cpt"):
        r = runs[k]
        out.setdefault((r.seed, r.model, r.shift, r.schedule), {}).setdefault(r.replay_or_zero, k)
    return out


def _gname(g: tuple) -> str:
    return "/".join(str(x) for x in g)


# --------------------------------------------------------------------------------------------------- findings
def _f1(results: StudyResults) -> dict:
    rule = ("e = the dense model's final loss minus the MoE's, averaged over every (MoE, CPT variant, source) with a "
            "dense run of the same variant and seed; sources are the old sources and the shift. Directional: "
            "reproduced when the 95% t-interval over seeds lies above zero, not reproduced when below, inconclusive "
            "otherwise (one seed: inconclusive). The same difference at the CPT start is reported beside it.")
    runs, index = results.runs, _cpt_index(results)
    models = results.models
    dense = [m for m in models if is_moe_model(results, m) is False]
    moes = [m for m in models if is_moe_model(results, m)]
    acc: dict[int, list[float]] = {}
    acc_start: dict[int, list[float]] = {}
    details = []
    for (seed, m, v), km in index.items():
        if m not in moes:
            continue
        for d in dense:
            kd = index.get((seed, d, v))
            if kd is None:
                continue
            old, new = run_sources(results, runs[km])
            for s in old + new:
                ld, lm = final_loss(runs[kd], s), final_loss(runs[km], s)
                if ld is None or lm is None:
                    continue
                _collect(acc, seed, ld - lm)
                sd_, sm = start_loss(runs[kd], s), start_loss(runs[km], s)
                _collect(acc_start, seed, None if sd_ is None or sm is None else sd_ - sm)
                details.append(_round_row({"seed": seed, "dense_run": kd, "moe_run": km, "source": s,
                                           "dense_loss": ld, "moe_loss": lm, "e": ld - lm}))
    why = ("no dense model" if not dense else "no MoE model" if not moes
           else "no CPT variant run by both a dense model and an MoE")
    part = _part("a", "dense final loss above the MoE's", "directional", acc, why)
    start = effect_stats(_seed_means(acc_start))
    return _entry("F1", rule, [part], {"start_mean": start["mean"], "start_lo": start["lo"],
                                      "start_hi": start["hi"]}, details)


def _f2(results: StudyResults) -> dict:
    rule = ("Training-MRI windows: W = max(3, ceil(0.1 N)) logged steps (N = the CPT run's); pre = the parent's last "
            "W steps up to the branch point, post = the run's first W, end = its last W; spike = max(post) - "
            "max(pre), noise = 2 sd(pre). (a) penalty spike above the control: e = spike(cpt) - spike(control) over "
            "the penalty-balanced CPT runs, directional. (b) penalty spike above the noise: e = spike(cpt) - "
            "noise(cpt), directional. (c) Sinkhorn barely moves: e = spike(cpt) - spike(control) over the Sinkhorn "
            "CPT runs, equivalence with margin = their mean noise. (d) penalty recovers: e = spike/2 - (mean(end) - "
            "mean(pre)), directional. (e) penalty ends below Sinkhorn: e = mean(end) of the Sinkhorn run minus that "
            "of the penalty run of the same architecture, variant and seed, directional. Directional: the 95% "
            "t-interval over seeds above zero; equivalence: inside the margin; one seed: inconclusive.")
    runs = results.runs
    acc: dict[str, dict[int, list[float]]] = {p: {} for p in "abcde"}
    sb_noise: list[float] = []
    ends: dict[tuple, dict[str, float]] = {}
    details = []
    for k in sorted_run_keys(results, "cpt"):
        r = runs[k]
        info = results.model_info(r.model)
        router = info.router
        if router not in ("penalty", "sinkhorn") or not is_moe_model(results, r.model):
            continue
        st = mri_shift_stats(results, k)
        if st is None or st["spike"] is None:
            continue
        seed = r.seed
        ck = control_key(results, k)
        cst = mri_shift_stats(results, ck) if ck else None
        cspike = cst["spike"] if cst else None
        shift_vs_control = None if cspike is None else st["spike"] - cspike
        if router == "penalty":
            _collect(acc["a"], seed, shift_vs_control)
            _collect(acc["b"], seed, st["spike"] - st["noise"])
            _collect(acc["d"], seed, st["spike"] / 2 - (st["end_mean"] - st["pre_mean"]))
        else:
            _collect(acc["c"], seed, shift_vs_control)
            if shift_vs_control is not None:
                sb_noise.append(st["noise"])
        ends.setdefault((seed, info.arch) + _variant(r), {}).setdefault(router, st["end_mean"])
        details.append(_round_row({"seed": seed, "run": k, "router": router, "control": ck,
                                   "window": st["window"], "pre_mean": st["pre_mean"], "pre_max": st["pre_max"],
                                   "post_max": st["post_max"], "end_mean": st["end_mean"], "spike": st["spike"],
                                   "noise": st["noise"], "control_spike": cspike}))
    for g, d in ends.items():
        if "penalty" in d and "sinkhorn" in d:
            _collect(acc["e"], g[0], d["sinkhorn"] - d["penalty"])
    tau = finite_mean(sb_noise)
    parts = [
        _part("a", "penalty spike above the control", "directional", acc["a"],
              "no penalty-balanced CPT run with train MRI and a no-shift control with train MRI"),
        _part("b", "penalty spike above the noise", "directional", acc["b"],
              "no penalty-balanced CPT run with train MRI (and its parent's before the branch)"),
        _part("c", "Sinkhorn barely moves", "equivalence", acc["c"],
              "no Sinkhorn CPT run with train MRI and a no-shift control with train MRI", margin=tau),
        _part("d", "penalty recovers", "directional", acc["d"],
              "no penalty-balanced CPT run with train MRI (and its parent's before the branch)"),
        _part("e", "penalty ends below Sinkhorn", "directional", acc["e"],
              "no penalty and Sinkhorn CPT runs of the same architecture and variant with train MRI"),
    ]
    return _entry("F2", rule, parts, {}, details)


def _f3(results: StudyResults) -> dict:
    rule = ("Groups: (model, shift, schedule) with two or more replay fractions, per seed; forgetting = the old "
            "sources' mean loss rise from the CPT start checkpoint to the end of CPT. (a) the smallest replay "
            "forgets most: e = forgetting at the smallest replay minus the largest forgetting among the other "
            "replays, averaged over groups, directional. (b) replay slows adaptation: e = the shift's final loss at "
            "the largest replay minus at the smallest, averaged over groups, directional. Directional: the 95% "
            "t-interval over seeds above zero; one seed: inconclusive.")
    runs = results.runs
    acc_a: dict[int, list[float]] = {}
    acc_b: dict[int, list[float]] = {}
    details = []
    for g, by_replay in _replay_groups(results).items():
        if len(by_replay) < 2:
            continue
        seed, shift = g[0], g[2]
        forg = {rp: f for rp, f in ((rp, mean_forgetting(results, k)) for rp, k in by_replay.items())
                if f is not None}
        e_a = None
        if len(forg) >= 2:
            lo = min(forg)
            e_a = forg[lo] - max(v for rp, v in forg.items() if rp != lo)
        lo, hi = min(by_replay), max(by_replay)
        a_lo = final_loss(runs[by_replay[lo]], shift) if shift else None
        a_hi = final_loss(runs[by_replay[hi]], shift) if shift else None
        e_b = None if a_lo is None or a_hi is None else a_hi - a_lo
        _collect(acc_a, seed, e_a)
        _collect(acc_b, seed, e_b)
        details.append(_round_row({"seed": seed, "group": _gname(g[1:]), "replay_min": lo, "replay_max": hi,
                                   "forgetting_min_replay": forg.get(lo), "forgetting_max_replay": forg.get(hi),
                                   "new_loss_min_replay": a_lo, "new_loss_max_replay": a_hi,
                                   "e_a": e_a, "e_b": e_b}))
    why = "no (model, shift, schedule) with CPT runs at two replay fractions and their losses"
    parts = [_part("a", "the smallest replay forgets most", "directional", acc_a, why),
             _part("b", "replay slows adaptation", "directional", acc_b, why)]
    return _entry("F3", rule, parts, {"groups": len(details)}, details)


def _f4(results: StudyResults) -> dict:
    rule = ("Pairs: (model, shift, seed) with a re-training run and inf CPT runs; the CPT run with the largest replay "
            "is taken. (a) matches: e = -(L_cpt / L_retrain - 1) on the mean final loss (e > 0: CPT better), "
            "averaged over pairs; one-sided equivalence: reproduced when the 95% t-interval's lower end is at least "
            f"-τ, not reproduced when its upper end is below -τ, inconclusive otherwise (one seed: inconclusive); "
            f"τ = the seeds' relative sd of the re-training loss, at most {F4_TAU_MAX:.0%} ({F4_TAU_MAX:.0%} with "
            f"one seed). (b) compute: CPT FLOPs over re-training FLOPs at most {F4_COMPUTE_MAX:g} (the paper: about "
            "one third); an arithmetic check on the mean ratio, reproduced or not.")
    runs = results.runs
    acc_a: dict[int, list[float]] = {}
    acc_b: dict[int, list[float]] = {}
    acc_bp: dict[int, list[float]] = {}
    retrain_loss: dict[int, list[float]] = {}
    details = []
    cpts = sorted_run_keys(results, "cpt")
    for rk in sorted_run_keys(results, "retrain"):
        rr = runs[rk]
        seed = rr.seed
        cands = [k for k in cpts if runs[k].schedule == "inf" and runs[k].seed == seed
                 and (runs[k].model, runs[k].shift) == (rr.model, rr.shift)]
        if not cands:
            continue
        ck = max(cands, key=lambda k: runs[k].replay_or_zero)  # max keeps the first of equal replays
        cr = runs[ck]
        lc, lr = mean_final_loss(results, cr), mean_final_loss(results, rr)
        e = None if lc is None or lr is None or lr <= 0 else -(lc / lr - 1.0)
        fc, fr = finite(cr.train_flops), finite(rr.train_flops)
        ratio = fc / fr if fc is not None and fr else None
        fp = parent_flops_used(results, cr)
        _collect(acc_a, seed, e)
        _collect(retrain_loss, seed, lr if e is not None else None)
        _collect(acc_b, seed, ratio)
        _collect(acc_bp, seed, None if ratio is None or fp is None else (fc + fp) / fr)
        details.append(_round_row({"seed": seed, "cpt_run": ck, "retrain_run": rk, "replay": cr.replay_or_zero,
                                   "cpt_mean_loss": lc, "retrain_mean_loss": lr, "e_a": e, "compute_ratio": ratio}))
    per_seed_retrain = list(_seed_means(retrain_loss).values())
    tau = F4_TAU_MAX
    if len(per_seed_retrain) >= 2:
        tau = min(F4_TAU_MAX, sample_sd(per_seed_retrain) / abs(sum(per_seed_retrain) / len(per_seed_retrain)))
    parts = [_part("a", "matches", "equivalence", acc_a,
                   "no (model, shift) with a re-training run and an inf CPT run with final losses",
                   margin=tau, one_sided=True),
             _part("b", "compute", "check", acc_b, "no re-training / inf CPT pair with training FLOPs",
                   limit=F4_COMPUTE_MAX)]
    with_pre = finite_mean(_seed_means(acc_bp).values())
    return _entry("F4", rule, parts, {"pairs": len(details), "compute_ratio_with_pretrain": round_sig(with_pre, 4)},
                  details)


def _crs_layers(comp: ComparisonRecord | None) -> list[float] | None:
    if comp is None:
        return None
    layers = [finite(x) for x in comp.crs_layers]
    return None if not layers or any(v is None for v in layers) else layers


def _crs_mean(comp: ComparisonRecord | None) -> float | None:
    if comp is None:
        return None
    m = finite(comp.crs_mean)
    return m if m is not None else finite_mean(comp.crs_layers)


def _f5(results: StudyResults) -> dict:
    rule = ("Routing change = the Continual Router Saturation (CRS) on the old source's held-out tokens between the "
            "CPT start checkpoint and the end of the run; lower CRS = more change. (a) early layers: per MoE layer "
            "the shift's share of the change is CRS(control) - CRS(cpt); e = its mean over the first half of the "
            "MoE layers minus its mean over the second half (odd count: the middle layer left out), averaged over "
            "the MoE CPT runs, directional. (b) 0% replay: e = CRS at the largest replay minus CRS at the smallest, "
            "per (model, shift, schedule) group, averaged over groups, directional. Directional: the 95% t-interval "
            "over seeds above zero; one seed: inconclusive.")
    runs = results.runs
    comps = comparisons(results)
    acc_a: dict[int, list[float]] = {}
    acc_b: dict[int, list[float]] = {}
    details = []
    for k in sorted_run_keys(results, "cpt"):
        if not is_moe_model(results, runs[k].model):
            continue
        ck = control_key(results, k)
        cpt_l, ctl_l = _crs_layers(comps.get(k)), _crs_layers(comps.get(ck) if ck else None)
        if cpt_l is None or ctl_l is None or len(cpt_l) != len(ctl_l) or len(cpt_l) < 2:
            continue
        share = [c - x for c, x in zip(ctl_l, cpt_l)]
        h = len(share) // 2
        e = sum(share[:h]) / h - sum(share[-h:]) / h
        _collect(acc_a, runs[k].seed, e)
        details.append(_round_row({"part": "a", "seed": runs[k].seed, "run": k, "control": ck,
                                   "share_layers": [round_sig(x) for x in share], "e": e}))
    for g, by_replay in _replay_groups(results).items():
        if not is_moe_model(results, g[1]):
            continue
        have = {rp: c for rp, c in ((rp, _crs_mean(comps.get(k))) for rp, k in by_replay.items()) if c is not None}
        if len(have) < 2:
            continue
        lo, hi = min(have), max(have)
        _collect(acc_b, g[0], have[hi] - have[lo])
        details.append(_round_row({"part": "b", "seed": g[0], "group": _gname(g[1:]), "replay_min": lo,
                                   "replay_max": hi, "crs_min_replay": have[lo], "crs_max_replay": have[hi],
                                   "e": have[hi] - have[lo]}))
    parts = [_part("a", "early layers", "directional", acc_a,
                   "no MoE CPT run with per-layer CRS (two or more layers) and a no-shift control with CRS"),
             _part("b", "0% replay", "directional", acc_b,
                   "no MoE (model, shift, schedule) with CRS at two replay fractions")]
    return _entry("F5", rule, parts, {}, details)


def _pair_effects(results: StudyResults, pair_ok, label: str) -> tuple[dict[int, list[float]], list[dict]]:
    """e = mean final loss of model a minus model b on CPT runs of the same seed and variant, for every MoE pair
    (a, b) with ``pair_ok(info_a, info_b)``."""
    runs, index = results.runs, _cpt_index(results)
    models = results.models
    acc: dict[int, list[float]] = {}
    details = []
    for (seed, a, v), ka in index.items():
        if not is_moe_model(results, a):
            continue
        for b in models:
            kb = index.get((seed, b, v))
            if kb is None or not is_moe_model(results, b) or not pair_ok(models[a], models[b]):
                continue
            la, lb = mean_final_loss(results, runs[ka]), mean_final_loss(results, runs[kb])
            if la is None or lb is None:
                continue
            _collect(acc, seed, la - lb)
            details.append(_round_row({"part": label, "seed": seed, "worse_run": ka, "better_run": kb,
                                       "worse_loss": la, "better_loss": lb, "e": la - lb}))
    return acc, details


def _f6(results: StudyResults) -> dict:
    rule = ("On CPT runs matched by variant and seed: (a) e = Switch's mean final loss minus Granular's (same "
            "router), directional; (b) e = Sinkhorn's mean final loss minus the penalty-balanced model's (same "
            "architecture), directional. Directional: the 95% t-interval over seeds above zero; one seed: "
            "inconclusive.")
    acc_a, det_a = _pair_effects(results, lambda a, b: a.arch == "switch" and b.arch == "granular"
                                 and a.router == b.router, "a")
    acc_b, det_b = _pair_effects(results, lambda a, b: a.router == "sinkhorn" and b.router == "penalty"
                                 and a.arch == b.arch, "b")
    parts = [_part("a", "Granular beats Switch", "directional", acc_a,
                   "needs a Granular and a Switch MoE with the same router and matching CPT runs"),
             _part("b", "penalty-balanced beats Sinkhorn", "directional", acc_b,
                   "needs a penalty- and a Sinkhorn-balanced MoE of the same architecture with matching CPT runs")]
    return _entry("F6", rule, parts, {}, det_a + det_b)


def evaluate_findings(results: StudyResults | Mapping) -> list[dict]:
    """Decide F1..F6 of Thérien et al. 2025 (arXiv 2503.05029) from a study's ``results``, by the rules of
    ``docs/study-rules.md`` (per-seed effects, 95% Student-t intervals over seeds; see the module docstring).

    Returns:
        Six dicts, in order F1..F6: ``{"id", "title", "verdict", "reproduced": True | False | None, "rule",
        "evidence", "n_seeds", "parts": [...], "figures": {...}}``; ``reproduced`` is True only for "reproduced",
        False only for "not reproduced". Untested parts carry their reason and are listed in
        ``figures["untested"]``. A partial study is fine (what is missing counts as absent runs).

    Raises:
        MoecptError: ``results`` is a dict with a field missing or malformed
            (:func:`moecpt.study.results.parse_results`).
    """
    res = as_results(results)
    return [f(res) for f in (_f1, _f2, _f3, _f4, _f5, _f6)]


# -------------------------------------------------------------------------------------------------- questions
def _q1_effects(results: StudyResults) -> dict[int, list[float]]:
    """e = (MoE final old loss - its control's) - (dense's - its control's), matched by seed and variant."""
    runs, index = results.runs, _cpt_index(results)

    def vs_control(k: str) -> float | None:
        ck = control_key(results, k)
        a = _old_final_loss(results, runs[k])
        b = _old_final_loss(results, runs[ck]) if ck else None
        return None if a is None or b is None else a - b

    acc: dict[int, list[float]] = {}
    for (seed, m, v), km in index.items():
        if not is_moe_model(results, m):
            continue
        fm = vs_control(km)
        for (s2, d, v2), kd in index.items():
            if (s2, v2) == (seed, v) and is_moe_model(results, d) is False and fm is not None:
                fd = vs_control(kd)
                _collect(acc, seed, None if fd is None else fm - fd)
    return acc


def _q2_effects(results: StudyResults) -> tuple[dict[int, list[float]], list[float]]:
    """e = old-source eval MRI after CPT minus the control's, per MoE CPT run; and the controls' MRI."""
    runs = results.runs
    acc: dict[int, list[float]] = {}
    ctl_mri: list[float] = []
    for k in sorted_run_keys(results, "cpt"):
        r = runs[k]
        ck = control_key(results, k)
        if not is_moe_model(results, r.model) or ck is None:
            continue
        old, _ = run_sources(results, r)
        a = [_final_mri(r, s) for s in old]
        b = [_final_mri(runs[ck], s) for s in old]
        if not old or any(x is None for x in a + b):
            continue
        _collect(acc, r.seed, sum(a) / len(a) - sum(b) / len(b))
        ctl_mri.append(sum(b) / len(b))
    return acc, ctl_mri


def _interval_text(st: Mapping) -> str:
    if st["n_seeds"] == 1:
        return f"{fmt(st['mean'])} (one seed: no interval)"
    return f"{fmt(st['mean'])} [{fmt(st['lo'])}, {fmt(st['hi'])}] (95% t-interval over {fmt(st['n_seeds'])} seeds)"


def _answer_q1(results: StudyResults) -> dict:
    st = effect_stats(_seed_means(_q1_effects(results)))
    figures = {k: st[k] for k in ("mean", "lo", "hi", "min", "max", "n_seeds", "seeds_agreeing")}
    verdict = {"reproduced": "yes", "not reproduced": "no"}.get(st["verdict"], st["verdict"])
    if verdict == "untested":
        answer = ("Untested: needs MoE and dense CPT runs of the same variant and seed, each with its no-shift "
                  "control.")
    else:
        answer = (f"{verdict.capitalize()}: the MoE's forgetting against its no-shift control minus the dense "
                  f"model's is {_interval_text(st)} nats per token; {fmt(st['seeds_agreeing'])} of "
                  f"{fmt(st['n_seeds'])} seeds above zero (worse for the MoE).")
    return {"question": "Do MoE routers make forgetting worse than in a FLOP-matched dense model?",
            "verdict": verdict, "answer": answer, "figures": figures}


def _answer_q2(results: StudyResults) -> dict:
    acc, ctl_mri = _q2_effects(results)
    per_seed = _seed_means(acc)
    st = effect_stats(per_seed)
    ctl = finite_mean(ctl_mri)
    thr = None if ctl is None else Q2_MRI_FRACTION * ctl
    figures = {k: st[k] for k in ("mean", "lo", "hi", "min", "max", "n_seeds")}
    figures.update(control_mri=round_sig(ctl), threshold=round_sig(thr),
                   seeds_agreeing=sum(v <= thr for v in per_seed.values()) if thr is not None else 0)
    if st["verdict"] == "untested" or thr is None:
        verdict = "untested"
        answer = "Untested: needs MoE CPT runs with old-source eval MRI and their no-shift controls."
    else:
        _, lo, hi = t_interval(list(per_seed.values()))  # exact ends; one seed: none, inconclusive
        verdict = ("inconclusive" if lo is None else "yes" if hi <= thr else "no" if lo > thr else "inconclusive")
        answer = (f"{verdict.capitalize()}: the old source's eval MRI after CPT minus the control's is "
                  f"{_interval_text(st)}, against a limit of {fmt(figures['threshold'])} (10% of the control's "
                  f"{fmt(figures['control_mri'])}); {fmt(figures['seeds_agreeing'])} of {fmt(st['n_seeds'])} seeds "
                  f"within it.")
    return {"question": "Do routers keep a balanced load on the previous distribution after CPT?",
            "verdict": verdict, "answer": answer, "figures": figures}


def _answer_q3(fs: Mapping[str, Mapping]) -> dict:
    def part(fid: str, name: str) -> Mapping:
        return next((p for p in fs.get(fid, {}).get("parts", []) if p["name"] == name), {})

    v3, v4 = fs.get("F3", {}).get("verdict", "untested"), fs.get("F4", {}).get("verdict", "untested")
    f3a, f4a, f4b = part("F3", "a"), part("F4", "a"), part("F4", "b")
    figures = {"F3": v3, "F4": v4, "F3a_mean": f3a.get("mean"), "F3a_lo": f3a.get("lo"), "F3a_hi": f3a.get("hi"),
               "F3a_seeds_agreeing": f3a.get("seeds_agreeing"), "F3a_n_seeds": f3a.get("n_seeds"),
               "F4a_mean": f4a.get("mean"), "F4a_lo": f4a.get("lo"), "F4a_hi": f4a.get("hi"),
               "F4a_seeds_agreeing": f4a.get("seeds_agreeing"), "F4a_n_seeds": f4a.get("n_seeds"),
               "compute_ratio": f4b.get("mean")}
    if v3 == "untested" and v4 == "untested":
        verdict = "untested"
    elif "not reproduced" in (v3, v4):
        verdict = "no"
    else:
        verdict = "yes" if v3 == v4 == "reproduced" else "inconclusive"

    def ab(p: Mapping, fid: str, what: str) -> str:
        if not p or p.get("verdict") == "untested":
            return f"F{fid} untested"
        iv = f" [{fmt(p['lo'])}, {fmt(p['hi'])}]" if p.get("lo") is not None else " (one seed: no interval)"
        return (f"F{fid} {fs[f'F{fid}']['verdict']} ({what} {fmt(p['mean'])}{iv}, {fmt(p['seeds_agreeing'])} of "
                f"{fmt(p['n_seeds'])} seeds agreeing)")

    ratio = "" if f4b.get("mean") is None else f", compute ratio {fmt(f4b['mean'])}"
    answer = (f"{verdict.capitalize()}: {ab(f3a, '3', 'the smallest replay forgets more by')}; "
              f"{ab(f4a, '4', 'CPT vs re-training relative loss gain')}{ratio}.")
    return {"question": "Are the dense CPT strategies (replay, re-warming, infinite schedules) enough for MoEs?",
            "verdict": verdict, "answer": answer, "figures": figures}


def answer_questions(results: StudyResults | Mapping, findings: list[dict] | None = None) -> list[dict]:
    """The paper's three questions (Thérien et al. 2025, arXiv 2503.05029), by ``docs/study-rules.md``:

    1. Do MoE routers make forgetting worse than in a FLOP-matched dense model? ``e`` = the MoE's final old-source
       loss minus its control's, minus the same for the dense model, matched by variant and seed: yes when the
       95% t-interval lies above zero, no when below, inconclusive otherwise.
    2. Do routers keep a balanced load on the previous distribution? ``e`` = the old-source eval MRI after CPT
       minus the control's, over the MoE CPT runs: yes when the interval's upper end is at most 10% of the
       control's MRI, no when its lower end is above it, inconclusive otherwise.
    3. Are the dense CPT strategies enough for MoEs? Yes when F3 and F4 are reproduced, no when either is not
       reproduced, inconclusive otherwise (untested when both are).

    One seed gives no interval: inconclusive. Returns three dicts ``{"question", "verdict": "yes" | "no" |
    "inconclusive" | "untested", "answer", "figures"}``; every number in ``answer`` is a ``figures`` value
    formatted by :func:`moecpt.study.numbers.fmt`. ``results`` may be the dict: it is parsed.
    """
    res = as_results(results)
    fs = {f["id"]: f for f in (findings if findings is not None else evaluate_findings(res))}
    return [_answer_q1(res), _answer_q2(res), _answer_q3(fs)]
