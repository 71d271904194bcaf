"""The raw numbers of every table of the study report (:func:`build_tables`) and its overview counts
(:func:`build_overview`), from the records of :mod:`moecpt.study.results`; stored in ``study.json`` (``tables``,
``overview``) and formatted only when rendered, so every printed number can be traced to the JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moecpt.study.numbers import finite, finite_mean
from moecpt.study.readers import (
    comparisons, final_loss, is_moe_model, mean_final_loss, mean_forgetting, mri_series, mri_window, seed_groups,
    sorted_run_keys, start_loss, study_seeds,
)
from moecpt.study.results import ForgettingRecord, RunRecord, StudyResults, as_results

__all__ = ["build_tables", "build_overview"]

#: a study's runs by key
_Runs = Mapping[str, RunRecord]


def _table(columns: list[str], rows: list[list[Any]]) -> dict:
    return {"columns": columns, "rows": rows}


def _sources(results: StudyResults) -> list[str]:
    old = list(results.old_sources)
    sources = old + [s for s in results.shifts if s not in old]
    for r in results.runs.values():
        for s in list(r.final) + list(r.val):
            if s not in sources:
                sources.append(s)
    return sources


def _spread(values: list[Any]) -> tuple[float | None, float | None, float | None]:
    vals = [v for v in (finite(x) for x in values) if v is not None]
    if not vals:
        return None, None, None
    return sum(vals) / len(vals), min(vals), max(vals)


def _train_mri_windows(results: StudyResults, key: str) -> dict[str, float | None]:
    """The F2 windows of one run's training MRI: ``pre`` (mean of the parent's last W logged steps up to the branch
    point), ``post_max`` (max of the run's first W), ``end`` (mean of its last W)."""
    runs = results.runs
    run = runs[key]
    cpt = mri_series(run)
    out: dict[str, float | None] = {"pre": None, "post_max": None, "end": None}
    if cpt:
        w = mri_window(len(cpt))
        out["post_max"] = max(m for _, m in cpt[:w])
        out["end"] = finite_mean(m for _, m in cpt[-w:])
    pre = mri_series(runs.get(run.parent or ""), run.parent_step)
    if pre:
        out["pre"] = finite_mean(m for _, m in pre[-mri_window(len(pre)):])
    return out


def _eval_mri(run: RunRecord, when: str, source: str) -> float | None:
    ev = (run.final if when == "final" else run.start or {}).get(source)
    return finite(ev.mri_mean) if ev is not None else None


def _models_table(results: StudyResults) -> dict:
    """The ``models`` table: one row per model."""
    return _table(
        ["model", "preset", "arch", "router", "MoE", "total params", "active params", "train FLOPs/token"],
        [[m, i.preset, i.arch, i.router or "-", i.moe, i.total_params, i.active_params, i.train_flops_per_token]
         for m, i in results.models.items()])


def _runs_table(runs: _Runs, all_keys: list[str]) -> dict:
    """The ``runs`` table: one row per run key."""
    return _table(
        ["run", "seed", "kind", "model", "shift", "schedule", "replay", "optimizer state", "warm-up steps",
         "control", "steps", "tokens", "start tokens", "train FLOPs"],
        [[k, r.seed, r.kind, r.model, r.shift or "-", r.schedule or "-",
          r.replay, r.optimizer_state or "-", r.warmup_steps, r.control or "-",
          r.steps, r.tokens, r.start_tokens, r.train_flops]
         for k, r in ((k, runs[k]) for k in all_keys)])


def _final_losses_table(results: StudyResults, runs: _Runs, all_keys: list[str], sources: list[str]) -> dict:
    """The ``final_losses`` table: each run's final loss per source and its mean (old + new)."""
    return _table(
        ["run", "kind", "model", "schedule", "replay"] + [f"{s} loss" for s in sources] + ["mean (old + new)"],
        [[k, r.kind, r.model, r.schedule or "-", r.replay]
         + [final_loss(r, s) for s in sources] + [mean_final_loss(results, r)]
         for k, r in ((k, runs[k]) for k in all_keys)])


def _final_losses_by_cell_table(results: StudyResults, runs: _Runs, sources: list[str]) -> dict:
    """The ``final_losses_by_cell`` table: per study cell, the seed means per source and the mean's spread."""
    rows = []
    for cell, keys in seed_groups(results).items():
        r0 = runs[keys[0]]
        m, lo, hi = _spread([mean_final_loss(results, runs[k]) for k in keys])
        rows.append([cell, r0.kind, r0.model, r0.schedule or "-", r0.replay, len(keys)]
                    + [_spread([final_loss(runs[k], s) for k in keys])[0] for s in sources] + [m, lo, hi])
    return _table(
        ["cell", "kind", "model", "schedule", "replay", "seeds"] + [f"{s} loss (mean)" for s in sources]
        + ["mean (old + new)", "min over seeds", "max over seeds"], rows)


def _forgetting_table(results: StudyResults, runs: _Runs, branch_keys: list[str], old: list[str]) -> dict:
    """The ``forgetting`` table: each branch run's losses before / after, its forgetting and its adaptation."""
    rows = []
    for k in branch_keys:
        r = runs[k]
        e = results.forgetting.get(k) or ForgettingRecord()
        before = dict(e.loss_before)
        after = dict(e.loss_after)
        shift = r.shift
        for s in old + ([shift] if shift else []):
            before.setdefault(s, start_loss(r, s))
            after.setdefault(s, final_loss(r, s))
        row = [k, r.kind, r.model, r.schedule or "-", r.replay]
        for s in old:
            row += [before.get(s), after.get(s)]
        row.append(mean_forgetting(results, k))
        nb, na = (before.get(shift), after.get(shift)) if shift else (None, None)
        adapt = e.mean_adaptation
        if adapt is None and nb is not None and na is not None:
            adapt = nb - na
        row += [shift or "-", nb, na, adapt]
        rows.append(row)
    cols = ["run", "kind", "model", "schedule", "replay"]
    for s in old:
        cols += [f"{s} before", f"{s} after"]
    cols += ["forgetting (mean old)", "new source", "new before", "new after", "adaptation"]
    return _table(cols, rows)


def _forgetting_by_cell_table(results: StudyResults, runs: _Runs, adapt_at: Mapping[str, Any]) -> dict:
    """The ``forgetting_by_cell`` table: per CPT / control cell, forgetting over seeds and the mean adaptation."""
    rows = []
    for cell, keys in seed_groups(results).items():
        r0 = runs[keys[0]]
        if r0.kind not in ("cpt", "control"):
            continue
        m, lo, hi = _spread([mean_forgetting(results, k) for k in keys])
        rows.append([cell, r0.kind, r0.model, r0.schedule or "-", r0.replay,
                     len(keys), m, lo, hi, _spread([adapt_at.get(k) for k in keys])[0]])
    return _table(["cell", "kind", "model", "schedule", "replay", "seeds",
                   "forgetting (mean)", "min over seeds", "max over seeds",
                   "adaptation (mean)"], rows)


def _mri_table(results: StudyResults, runs: _Runs, branch_keys: list[str], old: list[str]) -> dict:
    """The ``mri`` table: each MoE branch run's evaluation MRI before / after per old source, and its F2 windows."""
    rows = []
    for k in branch_keys:
        r = runs[k]
        if not is_moe_model(results, r.model):
            continue
        w = _train_mri_windows(results, k)
        for s in old:
            b, a = _eval_mri(r, "start", s), _eval_mri(r, "final", s)
            rows.append([k, r.kind, r.model, results.model_info(r.model).router,
                         r.schedule or "-", r.replay, s, b, a,
                         a - b if a is not None and b is not None else None, w["pre"], w["post_max"], w["end"]])
    return _table(["run", "kind", "model", "router", "schedule", "replay", "old source", "eval MRI before",
                   "eval MRI after", "change", "train MRI pre-shift (mean)", "train MRI first window (max)",
                   "train MRI last window (mean)"], rows)


def _routing_table(results: StudyResults, runs: _Runs, branch_keys: list[str]) -> dict:
    """The ``routing`` table: each compared branch run's CRS (mean, first layer, other layers) and CVS."""
    comps = comparisons(results)
    rows = []
    for k in branch_keys:
        c = comps.get(k)
        if c is None:
            continue
        r = runs[k]
        layers = [v for v in (finite(x) for x in c.crs_layers) if v is not None]
        rows.append([k, r.kind, r.model, r.schedule or "-", r.replay, c.source,
                     c.crs_mean, layers[0] if layers else None,
                     sum(layers[1:]) / len(layers[1:]) if len(layers) > 1 else None,
                     c.cvs_mean, c.chance_overlap])
    return _table(["run", "kind", "model", "schedule", "replay", "source", "CRS mean",
                   "CRS first layer", "CRS other layers", "CVS mean", "chance overlap"], rows)


def _sinkhorn_mri_table(results: StudyResults, runs: _Runs, old: list[str]) -> dict:
    """The ``sinkhorn_mri`` table: each MoE model's training vs evaluation MRI at the end of pre-training."""
    # training MRI (last window of pre-training) vs held-out evaluation MRI of the final pre-training checkpoint
    rows = []
    src = old[0] if old else None
    for cell, keys in seed_groups(results, "pretrain").items():
        m = runs[keys[0]].model
        if not is_moe_model(results, m) or src is None:
            continue
        train = [finite_mean(v for _, v in s[-mri_window(len(s)):]) for s in (mri_series(runs[k]) for k in keys) if s]
        ev = [_eval_mri(runs[k], "final", src) for k in keys]
        t_mean, e_mean = _spread(train)[0], _spread(ev)[0]
        if t_mean is None and e_mean is None:
            continue
        info = results.model_info(m)
        k_, e_ = finite(info.top_k), finite(info.num_experts)
        rows.append([m, info.router, len(keys), src, t_mean, e_mean,
                     e_mean - t_mean if t_mean is not None and e_mean is not None else None,
                     k_ / e_ if k_ and e_ else None])
    return _table(["model", "router", "seeds", "source", "train MRI, last window (mean)",
                   "eval MRI, held-out (mean)", "eval minus train", "balanced k/E"], rows)


def build_tables(results: StudyResults | Mapping) -> dict[str, dict]:
    """The raw numbers of every report table: ``{name: {"columns": [...], "rows": [[...], ...]}}`` (JSON-ready).

    Per-run tables (``runs``, ``final_losses``, ``forgetting``, ``mri``, ``routing``) hold one row per run key;
    ``*_by_cell`` tables hold one row per study cell (the key without its seed) with the mean, min and max over
    seeds; ``sinkhorn_mri`` holds each MoE model's training vs evaluation MRI at the end of pre-training.
    ``results`` may be the dict: it is parsed.
    """
    results = as_results(results)
    runs = results.runs
    old = list(results.old_sources)
    sources = _sources(results)
    all_keys = sorted_run_keys(results)
    tables: dict[str, dict] = {}
    tables["models"] = _models_table(results)
    tables["runs"] = _runs_table(runs, all_keys)
    tables["final_losses"] = _final_losses_table(results, runs, all_keys, sources)
    tables["final_losses_by_cell"] = _final_losses_by_cell_table(results, runs, sources)
    branch_keys = [k for k in all_keys if runs[k].kind in ("cpt", "control")]
    tables["forgetting"] = _forgetting_table(results, runs, branch_keys, old)
    adapt_at = {row[0]: row[-1] for row in tables["forgetting"]["rows"]}
    tables["forgetting_by_cell"] = _forgetting_by_cell_table(results, runs, adapt_at)
    tables["mri"] = _mri_table(results, runs, branch_keys, old)
    tables["routing"] = _routing_table(results, runs, branch_keys)
    tables["sinkhorn_mri"] = _sinkhorn_mri_table(results, runs, old)
    return tables


def build_overview(results: StudyResults | Mapping) -> dict:
    """The counts the report's overview prints (stored in ``study.json`` under ``overview``); ``results`` may be
    the dict: it is parsed."""
    results = as_results(results)
    runs = results.runs
    kinds = [r.kind for r in runs.values()]
    seeds = study_seeds(results)
    wall = finite(results.wall_time_s)
    stage = finite(results.stage_time_s)
    return {"seeds": seeds, "n_seeds": len(seeds), "models": len(results.models), "runs": len(runs),
            "cells": len(seed_groups(results)),
            "pretrain": kinds.count("pretrain"), "cpt": kinds.count("cpt"), "control": kinds.count("control"),
            "retrain": kinds.count("retrain"), "wall_time_h": None if wall is None else wall / 3600.0,
            "stage_time_h": None if stage is None else stage / 3600.0}
