"""The report of ``moecpt study``: findings, tables and figures of a CPT study, as ``study.json``, ``report.md`` and a
self-contained ``report.html``.

The study reproduces Thérien et al., "Continual Pre-training of MoEs: How robust is your router?" (arXiv 2503.05029,
TMLR 2025) at small scale, every stage once per seed, with a no-shift control per CPT schedule; the decision rules
are in ``docs/study-rules.md``. :func:`write_report` takes the study runner's ``results`` dict, whose schema,
and the readers the report, the findings and the plots share (seed helpers, losses, training MRI, :func:`fmt`), are
in :mod:`moecpt.analysis.results`. Runs are grouped across seeds by their key without the ``sN/`` prefix
(:func:`base_key`): a study *cell*. Results of the older one-seed schema are read as seed 0; every key may be
missing (a partial study still gets a report).

The findings (:func:`moecpt.analysis.findings.evaluate_findings`) come per finding as ``{"id", "title", "verdict",
"reproduced", "rule", "evidence", "n_seeds", "parts": [{"name", "title", "kind", "verdict", "n_seeds", "mean",
"lo", "hi", "min", "max", "per_seed", "seeds_agreeing", "margin", "untested"}], "figures"}``; the headline effect of
a finding is its first tested part (or the part named by an optional ``"headline"``). Findings of the older format
(``reproduced`` and ``figures`` only) still render.

The outputs:

- ``study.json``: ``results`` plus ``findings``, ``questions`` (:func:`moecpt.analysis.findings.answer_questions`),
  ``overview``, ``tables`` (the raw numbers of every report table, and every number the report derives) and
  ``plots``; written atomically;
- ``plots/*.png`` (:mod:`moecpt.analysis.plots`): seed means as lines, the seeds' min-max as shaded bands;
- ``report.md`` and ``report.html``: both rendered from ONE list of blocks (heading / paragraph / list / table /
  image), and every number in them goes through :func:`fmt` (4 significant digits) from a value stored in
  ``study.json``, so the two documents cannot diverge and every printed number can be traced to the JSON.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moecpt.analysis import findings as fnd
from moecpt.analysis.results import (  # noqa: F401  (some only re-exported: see __all__)
    _mean, _models, _num, _runs, _start_loss, base_key, comparisons, final_loss, fmt, is_moe_model,
    mean_final_loss, mean_forgetting, mri_series, mri_window, parent_flops_used, run_seed, seed_groups,
    sorted_run_keys, study_seeds,
)
from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic
from moecpt.storage.outputs import FileLedger

__all__ = ["write_report", "build_tables", "build_blocks", "render_markdown", "render_html", "fmt", "PLOTS",
           "report_files", "base_key", "run_seed", "study_seeds", "seed_groups", "headline_part"]


def _router(results: Mapping, model: str | None) -> str | None:
    return _models(results).get(model or "", {}).get("router")


def headline_part(finding: Mapping) -> dict | None:
    """The part whose effect heads a finding's row: the one named by ``finding["headline"]``, else the first tested
    directional / equivalence part with a mean, else the first part with a mean."""
    parts = [p for p in finding.get("parts") or [] if isinstance(p, Mapping)]
    name = finding.get("headline")
    for p in parts:
        if name is not None and p.get("name") == name:
            return dict(p)
    tested = [p for p in parts if not p.get("untested") and _num(p.get("mean")) is not None]
    for p in tested:
        if p.get("kind") in ("directional", "equivalence"):
            return dict(p)
    return dict(tested[0]) if tested else None


#: (file stem, plotting function name, caption)
PLOTS: list[tuple[str, str, str]] = [
    ("val_loss", "plot_val_loss",
     "Validation loss per source across the shift (rows: models; columns: sources): pre-training, the CPT runs at "
     "the smallest and largest replay of each schedule, the no-shift controls and full re-training. Lines are the "
     "mean over seeds, shaded bands the seeds' min-max; CPT and controls continue from their branch point (dashed "
     "line), re-training starts from zero."),
    ("mri_shift", "plot_mri_shift",
     "Training MRI (mean over MoE layers) around the shift, per MoE model (finding F2): the end of pre-training, "
     "then the CPT run (smallest replay, infinite schedule when present) and its no-shift control from the same "
     "checkpoint. Lines: mean over seeds; bands: the seeds' min-max. The paper: penalty balancing spikes above its "
     "control then recovers; Sinkhorn barely moves."),
    ("crs_layers", "plot_crs_layers",
     "Continual Router Saturation per MoE layer on the old source between the CPT start checkpoint and the end of "
     "the run (finding F5), CPT runs at each replay and their no-shift control (dashed). Lower = routing changed "
     "more; the gap to the control is the shift's share. Mean over seeds, bands the seeds' min-max; dotted: chance."),
    ("forgetting_vs_replay", "plot_forgetting_vs_replay",
     "Forgetting of the old sources and final loss on the new source against the replay fraction (finding F3). "
     "The hollow marker at replay one is the no-shift control (old data only). Mean over seeds, bands min-max."),
    ("moe_vs_dense", "plot_moe_vs_dense",
     "MoE vs FLOP-matched dense model through CPT, on each old and new source (finding F1), for one CPT variant "
     "(largest replay, infinite schedule when present). Mean over seeds, bands the seeds' min-max; the faded part "
     "is the pre-training up to the branch point."),
    ("coactivation", "plot_coactivation",
     "Expert co-activation CA(i, j) = N(i and j chosen) / N(i chosen) on the old source's held-out tokens, at the "
     "CPT start checkpoint and after CPT (smallest replay), first and last MoE layer, first seed."),
    ("compute", "plot_compute",
     "Final mean loss (old + new) against training FLOPs: CPT runs at their own FLOPs (filled) and including the "
     "parent pre-training (hollow), re-training on the union as stars (finding F4). Markers: mean over seeds; "
     "error bars: the seeds' min-max."),
]


# ------------------------------------------------------------------------------------------------------ tables
def _table(columns: list[str], rows: list[list[Any]]) -> dict:
    return {"columns": columns, "rows": rows}


def _sources(results: Mapping) -> list[str]:
    old = list(results.get("old_sources") or [])
    sources = old + [s for s in (results.get("shifts") or []) if s not in old]
    for r in _runs(results).values():
        for s in list(r.get("final") or {}) + list(r.get("val") or {}):
            if s not in sources:
                sources.append(s)
    return sources


def _spread(values: list[Any]) -> tuple[float | None, float | None, float | None]:
    vals = [v for v in (_num(x) for x in values) if v is not None]
    if not vals:
        return None, None, None
    return sum(vals) / len(vals), min(vals), max(vals)


def _train_mri_windows(results: Mapping, key: str) -> dict[str, float | None]:
    """The F2 windows of one run's training MRI: ``pre`` (mean of the parent's last W logged steps up to the branch
    point), ``post_max`` (max of the run's first W), ``end`` (mean of its last W)."""
    runs = _runs(results)
    run = runs.get(key) or {}
    cpt = mri_series(run)
    out: dict[str, float | None] = {"pre": None, "post_max": None, "end": None}
    if cpt:
        w = mri_window(len(cpt))
        out["post_max"] = max(m for _, m in cpt[:w])
        out["end"] = _mean(m for _, m in cpt[-w:])
    pre = mri_series(runs.get(run.get("parent") or ""), run.get("parent_step"))
    if pre:
        out["pre"] = _mean(m for _, m in pre[-mri_window(len(pre)):])
    return out


def _eval_mri(run: Mapping, when: str, source: str) -> float | None:
    return _num(((run.get(when) or {}).get(source) or {}).get("mri_mean"))


def _models_table(results: Mapping, models: Mapping) -> dict:
    """The ``models`` table: one row per model."""
    return _table(
        ["model", "preset", "arch", "router", "MoE", "total params", "active params", "train FLOPs/token"],
        [[m, i.get("preset"), i.get("arch"), i.get("router") or "-", is_moe_model(results, m),
          i.get("total_params"), i.get("active_params"), i.get("train_flops_per_token")] for m, i in models.items()])


def _runs_table(runs: Mapping, all_keys: list[str]) -> dict:
    """The ``runs`` table: one row per run key."""
    return _table(
        ["run", "seed", "kind", "model", "shift", "schedule", "replay", "optimizer state", "warm-up steps",
         "control", "steps", "tokens", "start tokens", "train FLOPs"],
        [[k, run_seed(k, r), r.get("kind"), r.get("model"), r.get("shift") or "-", r.get("schedule") or "-",
          r.get("replay"), r.get("optimizer_state") or "-", r.get("warmup_steps"), r.get("control") or "-",
          r.get("steps"), r.get("tokens"), r.get("start_tokens"), r.get("train_flops")]
         for k, r in ((k, runs[k]) for k in all_keys)])


def _final_losses_table(results: Mapping, runs: Mapping, all_keys: list[str], sources: list[str]) -> dict:
    """The ``final_losses`` table: each run's final loss per source and its mean (old + new)."""
    return _table(
        ["run", "kind", "model", "schedule", "replay"] + [f"{s} loss" for s in sources] + ["mean (old + new)"],
        [[k, r.get("kind"), r.get("model"), r.get("schedule") or "-", r.get("replay")]
         + [final_loss(r, s) for s in sources] + [mean_final_loss(results, r)]
         for k, r in ((k, runs[k]) for k in all_keys)])


def _final_losses_by_cell_table(results: Mapping, runs: Mapping, sources: list[str]) -> dict:
    """The ``final_losses_by_cell`` table: per study cell, the seed means per source and the mean's spread."""
    rows = []
    for cell, keys in seed_groups(results).items():
        r0 = runs[keys[0]]
        m, lo, hi = _spread([mean_final_loss(results, runs[k]) for k in keys])
        rows.append([cell, r0.get("kind"), r0.get("model"), r0.get("schedule") or "-", r0.get("replay"), len(keys)]
                    + [_spread([final_loss(runs[k], s) for k in keys])[0] for s in sources] + [m, lo, hi])
    return _table(
        ["cell", "kind", "model", "schedule", "replay", "seeds"] + [f"{s} loss (mean)" for s in sources]
        + ["mean (old + new)", "min over seeds", "max over seeds"], rows)


def _forgetting_table(results: Mapping, runs: Mapping, branch_keys: list[str], old: list[str]) -> dict:
    """The ``forgetting`` table: each branch run's losses before / after, its forgetting and its adaptation."""
    fg = results.get("forgetting") or {}
    rows = []
    for k in branch_keys:
        r = runs[k]
        e = fg.get(k) if isinstance(fg.get(k), Mapping) else {}
        before = dict(e.get("loss_before") or {})
        after = dict(e.get("loss_after") or {})
        shift = r.get("shift")
        for s in old + ([shift] if shift else []):
            before.setdefault(s, _start_loss(r, s))
            after.setdefault(s, final_loss(r, s))
        row = [k, r.get("kind"), r.get("model"), r.get("schedule") or "-", r.get("replay")]
        for s in old:
            row += [before.get(s), after.get(s)]
        row.append(mean_forgetting(results, k))
        nb, na = (before.get(shift), after.get(shift)) if shift else (None, None)
        adapt = e.get("mean_adaptation")
        if adapt is None and nb is not None and na is not None:
            adapt = nb - na
        row += [shift or "-", nb, na, adapt]
        rows.append(row)
    cols = ["run", "kind", "model", "schedule", "replay"]
    for s in old:
        cols += [f"{s} before", f"{s} after"]
    cols += ["forgetting (mean old)", "new source", "new before", "new after", "adaptation"]
    return _table(cols, rows)


def _forgetting_by_cell_table(results: Mapping, runs: Mapping, adapt_at: Mapping[str, Any]) -> dict:
    """The ``forgetting_by_cell`` table: per CPT / control cell, forgetting over seeds and the mean adaptation."""
    rows = []
    for cell, keys in seed_groups(results).items():
        r0 = runs[keys[0]]
        if r0.get("kind") not in ("cpt", "control"):
            continue
        m, lo, hi = _spread([mean_forgetting(results, k) for k in keys])
        rows.append([cell, r0.get("kind"), r0.get("model"), r0.get("schedule") or "-", r0.get("replay"),
                     len(keys), m, lo, hi, _spread([adapt_at.get(k) for k in keys])[0]])
    return _table(["cell", "kind", "model", "schedule", "replay", "seeds",
                   "forgetting (mean)", "min over seeds", "max over seeds",
                   "adaptation (mean)"], rows)


def _mri_table(results: Mapping, runs: Mapping, branch_keys: list[str], old: list[str]) -> dict:
    """The ``mri`` table: each MoE branch run's evaluation MRI before / after per old source, and its F2 windows."""
    rows = []
    for k in branch_keys:
        r = runs[k]
        if not is_moe_model(results, r.get("model")):
            continue
        w = _train_mri_windows(results, k)
        for s in old:
            b, a = _eval_mri(r, "start", s), _eval_mri(r, "final", s)
            rows.append([k, r.get("kind"), r.get("model"), _router(results, r.get("model")),
                         r.get("schedule") or "-", r.get("replay"), s, b, a,
                         a - b if a is not None and b is not None else None, w["pre"], w["post_max"], w["end"]])
    return _table(["run", "kind", "model", "router", "schedule", "replay", "old source", "eval MRI before",
                   "eval MRI after", "change", "train MRI pre-shift (mean)", "train MRI first window (max)",
                   "train MRI last window (mean)"], rows)


def _routing_table(results: Mapping, runs: Mapping, branch_keys: list[str]) -> dict:
    """The ``routing`` table: each compared branch run's CRS (mean, first layer, other layers) and CVS."""
    comps = comparisons(results)
    rows = []
    for k in branch_keys:
        c = comps.get(k)
        if c is None:
            continue
        r = runs[k]
        layers = [v for v in (_num(x) for x in c.get("crs_layers") or []) if v is not None]
        rows.append([k, r.get("kind"), r.get("model"), r.get("schedule") or "-", r.get("replay"), c.get("source"),
                     c.get("crs_mean"), layers[0] if layers else None,
                     sum(layers[1:]) / len(layers[1:]) if len(layers) > 1 else None,
                     c.get("cvs_mean"), c.get("chance_overlap")])
    return _table(["run", "kind", "model", "schedule", "replay", "source", "CRS mean",
                   "CRS first layer", "CRS other layers", "CVS mean", "chance overlap"], rows)


def _sinkhorn_mri_table(results: Mapping, runs: Mapping, models: Mapping, old: list[str]) -> dict:
    """The ``sinkhorn_mri`` table: each MoE model's training vs evaluation MRI at the end of pre-training."""
    # training MRI (last window of pre-training) vs held-out evaluation MRI of the final pre-training checkpoint
    rows = []
    src = old[0] if old else None
    for cell, keys in seed_groups(results, "pretrain").items():
        m = runs[keys[0]].get("model")
        if not is_moe_model(results, m) or src is None:
            continue
        train = [_mean(v for _, v in s[-mri_window(len(s)):]) for s in (mri_series(runs[k]) for k in keys) if s]
        ev = [_eval_mri(runs[k], "final", src) for k in keys]
        t_mean, e_mean = _spread(train)[0], _spread(ev)[0]
        if t_mean is None and e_mean is None:
            continue
        info = models.get(m, {})
        k_, e_ = _num(info.get("top_k")), _num(info.get("num_experts"))
        rows.append([m, _router(results, m), len(keys), src, t_mean, e_mean,
                     e_mean - t_mean if t_mean is not None and e_mean is not None else None,
                     k_ / e_ if k_ and e_ else None])
    return _table(["model", "router", "seeds", "source", "train MRI, last window (mean)",
                   "eval MRI, held-out (mean)", "eval minus train", "balanced k/E"], rows)


def build_tables(results: Mapping) -> dict[str, dict]:
    """The raw numbers of every report table: ``{name: {"columns": [...], "rows": [[...], ...]}}`` (JSON-ready).

    Per-run tables (``runs``, ``final_losses``, ``forgetting``, ``mri``, ``routing``) hold one row per run key;
    ``*_by_cell`` tables hold one row per study cell (the key without its seed) with the mean, min and max over
    seeds; ``sinkhorn_mri`` holds each MoE model's training vs evaluation MRI at the end of pre-training.
    """
    runs = _runs(results)
    models = _models(results)
    old = list(results.get("old_sources") or [])
    sources = _sources(results)
    all_keys = sorted_run_keys(results)
    tables: dict[str, dict] = {}
    tables["models"] = _models_table(results, models)
    tables["runs"] = _runs_table(runs, all_keys)
    tables["final_losses"] = _final_losses_table(results, runs, all_keys, sources)
    tables["final_losses_by_cell"] = _final_losses_by_cell_table(results, runs, sources)
    branch_keys = [k for k in all_keys if runs[k].get("kind") in ("cpt", "control")]
    tables["forgetting"] = _forgetting_table(results, runs, branch_keys, old)
    adapt_at = {row[0]: row[-1] for row in tables["forgetting"]["rows"]}
    tables["forgetting_by_cell"] = _forgetting_by_cell_table(results, runs, adapt_at)
    tables["mri"] = _mri_table(results, runs, branch_keys, old)
    tables["routing"] = _routing_table(results, runs, branch_keys)
    tables["sinkhorn_mri"] = _sinkhorn_mri_table(results, runs, models, old)
    return tables


def build_overview(results: Mapping) -> dict:
    """The counts the report's overview prints (stored in ``study.json`` under ``overview``)."""
    runs = _runs(results)
    kinds = [r.get("kind") for r in runs.values()]
    seeds = study_seeds(results)
    wall = _num(results.get("wall_time_s"))
    return {"seeds": seeds, "n_seeds": len(seeds), "models": len(_models(results)), "runs": len(runs),
            "cells": len(seed_groups(results)),
            "pretrain": kinds.count("pretrain"), "cpt": kinds.count("cpt"), "control": kinds.count("control"),
            "retrain": kinds.count("retrain"), "wall_time_h": None if wall is None else wall / 3600.0,
            "stage_time_h": None if _num(results.get("stage_time_s")) is None
            else _num(results.get("stage_time_s")) / 3600.0}


# ------------------------------------------------------------------------------------------------------ blocks
def _h(level: int, text: str) -> dict:
    return {"type": "heading", "level": level, "text": text}


def _p(text: str) -> dict:
    return {"type": "paragraph", "text": text}


def _figures_text(figures: Mapping) -> str:
    """Old-format findings: their scalar ``figures`` as ``name=value; ...``."""
    parts = []
    for k, v in figures.items():
        if k == "details":
            continue
        if k == "untested":
            parts.append("untested: " + ", ".join(str(x) for x in v))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            parts.append(f"{k}={fmt(v)}")
    return "; ".join(parts)


_OLD_STATUS = {True: "reproduced", False: "not reproduced", None: "untested"}


def _verdict(f: Mapping) -> str:
    v = f.get("verdict")
    return str(v) if v else _OLD_STATUS.get(f.get("reproduced"), "untested")


def _effect(p: Mapping) -> str:
    """``mean [lo, hi]`` of a part, with ``spread min to max`` beside it when it has fewer than three seeds."""
    if _num(p.get("mean")) is None:
        return "n/a"
    s = fmt(p.get("mean"))
    s += f" [{fmt(p.get('lo'))}, {fmt(p.get('hi'))}]" if p.get("lo") is not None or p.get("hi") is not None \
        else " (no interval)"
    n = _num(p.get("n_seeds"))
    if (n is None or n < 3) and p.get("min") is not None and p.get("max") is not None:
        s += f", spread {fmt(p.get('min'))} to {fmt(p.get('max'))}"
    return s


def _agreeing(p: Mapping | None) -> str:
    if not p or p.get("seeds_agreeing") is None or p.get("n_seeds") is None:
        return "n/a"
    return f"{fmt(p['seeds_agreeing'])}/{fmt(p['n_seeds'])}"


def _part_line(p: Mapping) -> str:
    if p.get("untested"):
        return f"{p.get('name')}: untested ({p['untested']})"
    return f"{p.get('name')}: {p.get('verdict', 'n/a')}, {_effect(p)}"


def _findings_blocks(study: Mapping) -> list[dict]:
    fs = [f for f in study.get("findings") or [] if isinstance(f, Mapping)]
    n = (study.get("overview") or {}).get("n_seeds")
    blocks = [_h(2, "Findings")]
    blocks.append(_p("One row per finding of Thérien et al. 2025. The headline effect is the finding's first tested "
                     "part, signed so that a positive effect points the paper's way: the mean over seeds and its "
                     "95% Student-t interval [lo, hi] (with the seeds' spread, min to max, when there are fewer than "
                     "three seeds). Seeds agreeing: the seeds whose own effect points the paper's way. The rules are "
                     "those of docs/study-rules.md, fixed before any run was looked at."))
    if n is None or n < 3:
        why = ("With one seed there is no interval: every finding is inconclusive by rule (docs/study-rules.md), "
               "and the report shows the direction of each effect." if n is None or n < 2 else
               "With two seeds the 95% interval is very wide (the t quantile is over six times the normal "
               "one), so most parts come out inconclusive; a "
               "verdict needs three or more seeds to mean much.")
        blocks.append(_p(f"**Caveat.** This study has {fmt(n)} seed(s), fewer than three. {why} Read the effects "
                         "below as directions, not results."))
    rows = []
    for f in fs:
        parts = [p for p in f.get("parts") or [] if isinstance(p, Mapping)]
        head = headline_part(f)
        if parts or "verdict" in f:
            effect = f"{head.get('name')}: {_effect(head)}" if head else "n/a"
            rows.append([f"{f.get('id')}: {f.get('title')}", _verdict(f), effect, _agreeing(head),
                         [_part_line(p) for p in parts] or ["n/a"]])
        else:  # the older findings format: scalar figures only
            rows.append([f"{f.get('id')}: {f.get('title')}", _verdict(f), "n/a", "n/a",
                         [_figures_text(f.get("figures") or {}) or "n/a"]])
    blocks.append({"type": "table", "caption": "Findings of Thérien et al. 2025",
                   "columns": ["finding", "verdict", "headline effect", "seeds agreeing", "parts"], "rows": rows})

    blocks.append(_h(2, "How each verdict is decided"))
    blocks.append(_p("A directional part is reproduced when its interval lies above zero and not reproduced when it "
                     "lies below; an equivalence part is reproduced when its interval lies inside its margin and not "
                     "reproduced when it lies wholly outside. A finding is reproduced when all its tested parts are, "
                     "not reproduced when any part is not, inconclusive otherwise, and untested without runs."))
    for f in fs:
        blocks.append(_h(3, f"{f.get('id')}: {f.get('title')} ({_verdict(f)})"))
        text = f"**Rule.** {f.get('rule') or 'n/a'}"
        if f.get("evidence"):
            text += f" **Evidence.** {f['evidence']}"
        blocks.append(_p(text))
        items = []
        for p in f.get("parts") or []:
            if not isinstance(p, Mapping):
                continue
            if p.get("untested"):
                items.append(f"({p.get('name')}) {p.get('title') or ''}: untested ({p['untested']}).")
                continue
            s = f"({p.get('name')}) {p.get('title') or ''} [{p.get('kind') or 'n/a'}]: {p.get('verdict')}, {_effect(p)}"
            if p.get("margin") is not None:
                s += f"; margin {fmt(p['margin'])}"
            per = p.get("per_seed") or {}
            if isinstance(per, Mapping) and per:
                s += "; per seed: " + ", ".join(f"seed {sd} {fmt(v)}" for sd, v in per.items())
            items.append(s + ".")
        if items:
            blocks.append({"type": "list", "items": items})
    return blocks


def _sinkhorn_blocks(study: Mapping) -> list[dict]:
    """The note on the Sinkhorn router's two MRIs (docs/study-rules.md, last section), when a Sinkhorn model ran."""
    models = _models(study)
    if not any(i.get("router") == "sinkhorn" for i in models.values()):
        return []
    table = (study.get("tables") or {}).get("sinkhorn_mri") or {}
    rows = table.get("rows") or []
    blocks = [_h(2, "Why the Sinkhorn model's evaluation MRI differs from its training MRI")]
    blocks.append(_p(
        "The training MRI is measured on the experts the router actually chose during training. A Sinkhorn-balanced "
        "router chooses them from the Sinkhorn-normalised routing matrix, which spreads every batch evenly across the "
        "experts by construction, so its training MRI is held down towards perfect balance (k/E), though not to it. "
        "At evaluation and "
        "inference the paper's Sinkhorn router takes plain top-k of the raw router logits instead. Sinkhorn routing "
        "has no auxiliary balancing loss, so nothing ever pushed those raw logits towards balance, and their plain "
        "top-k is much less balanced. The two numbers measure two different selection rules; neither is wrong, and "
        "the held-out evaluation MRI is the one that describes the deployed model."))
    sentences = []
    for m, router, n, src, train, ev, _diff, _bal in rows:
        if router != "sinkhorn":
            continue
        sentences.append(f"{m} (mean of {fmt(n)} seed(s)): training MRI {fmt(train)} over the last logged window of "
                         f"pre-training, held-out evaluation MRI {fmt(ev)} on {src} at the end of pre-training.")
    blocks.append(_p("Measured here: " + " ".join(sentences) if sentences
                     else "Measured here: no Sinkhorn pre-training run with both MRIs in this study."))
    if rows:
        blocks.append({"type": "table", "caption": "Training vs evaluation MRI at the end of pre-training, every "
                                                   "MoE model (mean over seeds)", **table})
    return blocks


def _intro_blocks(study: Mapping) -> list[dict]:
    """The report's title and its overview paragraph (study, models, sources, seeds, run counts, wall time)."""
    ov = study.get("overview") or {}
    models = list(_models(study))
    blocks: list[dict] = [_h(1, f"moecpt study: {study.get('name', 'unnamed')}")]
    seeds = ov.get("seeds") or []
    shifts = study.get("shifts") or []
    wall = f"{fmt(study.get('wall_time_s'))} s" + (f" ({fmt(ov['wall_time_h'])} h)" if ov.get("wall_time_h")
                                                    is not None else "")
    if ov.get("stage_time_h") is not None:  # a re-run of a cached study is short; the stages' own time is not
        wall += (f" for this invocation; the training runs took {fmt(ov['stage_time_h'])} h summed over stages "
                 f"(run {fmt(study.get('jobs'))} at a time)")
    blocks.append(_p(
        f"This report covers the study {study.get('name', 'unnamed')}: continual pre-training (CPT) of "
        f"Mixture-of-Experts language models at small scale, reproducing in direction the findings of Thérien et "
        f"al., \"Continual Pre-training of MoEs: How robust is your router?\" (arXiv 2503.05029, TMLR 2025), with "
        f"the dense CPT recipe of Ibrahim et al. (arXiv 2403.08763). {fmt(ov.get('models'))} models "
        f"({', '.join(models) or 'n/a'}) were pre-trained on {', '.join(study.get('old_sources') or []) or 'n/a'} "
        f"and continually pre-trained on {'the shift' if len(shifts) == 1 else 'the shifts'} to "
        f"{', '.join(shifts) or 'n/a'}, every stage once per seed, over {fmt(ov.get('n_seeds'))} seed(s)"
        f"{' (' + ', '.join(fmt(s) for s in seeds) + ')' if seeds else ''}: {fmt(ov.get('runs'))} training runs "
        f"in all ({fmt(ov.get('pretrain'))} pre-training, {fmt(ov.get('cpt'))} CPT, {fmt(ov.get('control'))} "
        f"no-shift control and {fmt(ov.get('retrain'))} full re-training runs) in {fmt(ov.get('cells'))} cells. "
        f"Wall time: {wall}. A no-shift control continues from the same checkpoint with the same schedule, step "
        "budget and optimizer state on the old data only, so what a CPT run does beyond its control is the shift's "
        "doing."))
    return blocks


def _questions_blocks(study: Mapping) -> list[dict]:
    """The section answering the paper's three questions, each verdict word in bold."""
    blocks = [_h(2, "The paper's three questions")]
    items = []
    for q in study.get("questions") or []:
        v, answer = q.get("verdict"), str(q.get("answer") or "")
        if v:  # the verdict word in bold, once: an answer that opens with it ("No: ...") loses that opening
            m = re.match(rf"\s*{re.escape(str(v))}\s*[:.]\s*", answer, flags=re.I)
            if m and answer[m.end():]:
                answer = answer[m.end():]
                answer = answer[0].upper() + answer[1:]
            items.append(f"{q.get('question')} **{str(v).capitalize()}.** {answer}")
        else:
            items.append(f"{q.get('question')} {answer}")
    blocks.append({"type": "list", "items": items} if items else _p("No answers in this study."))
    return blocks


def _runs_blocks(tables: Mapping) -> list[dict]:
    """The ``Runs`` section: its explanation and the models and runs tables."""
    blocks = [_h(2, "Runs")]
    blocks.append(_p("Every run of the study, seed by seed. CPT schedules: inf = CosineInf from the pre-anneal "
                     "checkpoint, continuing the parent's optimizer state (carried); rewarm = cosine re-warm and "
                     "re-decay from the final checkpoint with a fresh optimizer state, its re-warm being that state's "
                     "warm-up. Replay is compute-equivalent (a fraction of the CPT budget). Control: the run's "
                     "no-shift control."))
    for name, caption in (("models", "Models"), ("runs", "Runs")):
        if tables.get(name, {}).get("rows"):
            blocks.append({"type": "table", "caption": caption, **tables[name]})
    return blocks


def _table_sections(tables: Mapping, level: int, sections: tuple[tuple[str, str, str], ...]) -> list[dict]:
    """One section per ``(table name, title, text)``: heading, text and table, or "No data" without rows."""
    blocks = []
    for name, title, text in sections:
        blocks.append(_h(level, title))
        if tables.get(name, {}).get("rows"):
            blocks.append(_p(text))
            blocks.append({"type": "table", "caption": title, **tables[name]})
        else:
            blocks.append(_p("No data in this study."))
    return blocks


def _cell_tables_blocks(tables: Mapping) -> list[dict]:
    """The sections of the over-seeds tables: final losses and forgetting per study cell."""
    return _table_sections(tables, 2, (
        ("final_losses_by_cell", "Final losses over seeds",
         "Held-out loss (nats per token) of the final checkpoints, per study cell: the mean over seeds per source, "
         "and the mean over the old sources and the shift with its min and max over seeds."),
        ("forgetting_by_cell", "Forgetting over seeds",
         "Forgetting = the old sources' mean loss rise from the CPT start checkpoint to the end of the run; "
         "adaptation = the fall of the shift's loss. Controls see no shift: their forgetting is what continued "
         "training alone does."),
    ))


def _figures_blocks(plots: Mapping[str, str | None], out_dir: Path) -> list[dict]:
    """The ``Figures`` section: one image per plot drawn, a "no data" line for the others."""
    blocks = [_h(2, "Figures")]
    for stem, _fn, caption in PLOTS:
        rel = plots.get(stem)
        if rel:
            blocks.append({"type": "image", "path": str(out_dir / rel), "rel": rel, "caption": caption, "alt": stem})
        else:
            blocks.append(_p(f"({stem}: no data in this study.)"))
    return blocks


def _appendix_blocks(tables: Mapping) -> list[dict]:
    """The appendix: the per-run tables (final losses, forgetting, MRI, routing change)."""
    return [_h(2, "Appendix: per-run tables")] + _table_sections(tables, 3, (
        ("final_losses", "Final losses", "Dedicated end-of-run evaluation loss (nats) per run and source."),
        ("forgetting", "Forgetting and adaptation",
         "Loss (nats) at the CPT start checkpoint (before) and at the end of the run (after), CPT runs and controls."),
        ("mri", "Routing balance (MRI)",
         "Maximum Routing Imbalance (max share of tokens routed to one expert) on the old source's held-out tokens "
         "at the CPT start checkpoint and at the end of the run, with the training-MRI windows of rule F2."),
        ("routing", "Routing change (CRS / CVS)",
         "Continual Router Saturation (mean top-k overlap per token, one = unchanged) and Continual Vocabulary "
         "Specialization between the CPT start checkpoint and the end of the run, on the old source."),
    ))


def build_blocks(study: Mapping, plots: Mapping[str, str | None], out_dir: Path) -> list[dict]:
    """The report as one list of blocks, rendered by :func:`render_markdown` and :func:`render_html`.

    Table blocks hold raw values (from ``study["tables"]``), formatted by :func:`fmt` at rendering time; paragraph
    and findings-table numbers are formatted from ``study`` values here (``**bold**`` is the one inline markup).
    """
    tables = study.get("tables") or {}
    blocks = _intro_blocks(study)
    blocks += _questions_blocks(study)
    blocks += _findings_blocks(study)
    blocks += _runs_blocks(tables)
    blocks += _cell_tables_blocks(tables)
    blocks += _sinkhorn_blocks(study)
    blocks += _figures_blocks(plots, out_dir)
    blocks += _appendix_blocks(tables)
    return blocks


# --------------------------------------------------------------------------------------------------- renderers
def _cell_text(x: Any) -> list[str]:
    """A table cell as its lines: a list value is one line per item, anything else one :func:`fmt` line."""
    return [fmt(v) for v in x] if isinstance(x, list) else [fmt(x)]


def _md_cell(x: Any) -> str:
    return "<br>".join(s.replace("|", "\\|").replace("\n", " ") for s in _cell_text(x))


def render_markdown(blocks: list[dict]) -> str:
    """Markdown (GitHub tables); images referenced by their path relative to the report."""
    out: list[str] = []
    for b in blocks:
        t = b["type"]
        if t == "heading":
            out.append("#" * b["level"] + " " + b["text"])
        elif t == "paragraph":
            out.append(b["text"])
        elif t == "list":
            out.append("\n".join(f"- {item}" for item in b["items"]))
        elif t == "table":
            lines = ["| " + " | ".join(_md_cell(c) for c in b["columns"]) + " |",
                     "|" + "|".join("---" for _ in b["columns"]) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b["rows"]]
            out.append("\n".join(lines))
        elif t == "image":
            out.append(f"![{b['alt']}]({b['rel']})\n\n*{b['caption']}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 1.8em; }
h3 { margin-top: 1.2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding: .2em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
td.yes, td.reproduced { background: #dff3df !important; } td.no, td.not-reproduced { background: #f8dede !important; }
td.inconclusive { background: #fbf3d5 !important; }
td.untested { background: #eee !important; color: #666; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #444; margin-top: .3em; }
"""

_VERDICT_CLASSES = ("yes", "no", "untested", "reproduced", "not reproduced", "inconclusive")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str) -> str:
    """HTML of a text: escaped, with ``**bold**`` as ``<strong>``."""
    return _BOLD.sub(r"<strong>\1</strong>", html.escape(text))


def render_html(blocks: list[dict], title: str = "moecpt study") -> str:
    """A self-contained HTML page: inline CSS, images embedded as base64 PNG data URIs, no external assets."""
    e = html.escape
    body: list[str] = []
    for b in blocks:
        t = b["type"]
        if t == "heading":
            body.append(f"<h{b['level']}>{e(b['text'])}</h{b['level']}>")
        elif t == "paragraph":
            body.append(f"<p>{_inline(b['text'])}</p>")
        elif t == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b["items"]) + "</ul>")
        elif t == "table":
            cap = f"<caption>{e(b['caption'])}</caption>" if b.get("caption") else ""
            head = "<tr>" + "".join(f"<th>{e(fmt(c))}</th>" for c in b["columns"]) + "</tr>"
            rows = []
            for row in b["rows"]:
                cells = []
                for c in row:
                    lines = _cell_text(c)
                    s = lines[0] if len(lines) == 1 else ""
                    cls = (f' class="{s.replace(" ", "-")}"' if s in _VERDICT_CLASSES and isinstance(c, str) else "")
                    cells.append(f"<td{cls}>{'<br>'.join(e(x) for x in lines)}</td>")
                rows.append("<tr>" + "".join(cells) + "</tr>")
            body.append(f"<table>{cap}<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>")
        elif t == "image":
            data = base64.b64encode(Path(b["path"]).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{e(b["alt"])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(b['caption'])}</figcaption></figure>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------------------------ driver
def _json_clean(x: Any) -> Any:
    """JSON-ready copy: tuples to lists, non-finite floats to None, mapping keys to str."""
    if isinstance(x, Mapping):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy / torch scalars and arrays
        return _json_clean(x.tolist())
    return x


def report_files(out_dir: str | Path) -> list[Path]:
    """Every file :func:`write_report` may write or replace in ``out_dir``."""
    out_dir = Path(out_dir)
    return [out_dir / "study.json", out_dir / "report.md", out_dir / "report.html",
            *(out_dir / "plots" / f"{stem}.png" for stem, _, _ in PLOTS)]


def write_report(results: dict, out_dir: str | Path) -> dict:
    """Write the study report into ``out_dir``: ``study.json``, ``plots/*.png``, ``report.md``, ``report.html``.

    Adds ``findings``, ``questions``, ``overview``, ``tables`` and ``plots`` to ``results`` (in place) and writes
    the whole dict to ``study.json`` atomically (temp file + rename). A plot without data is skipped.

    Returns:
        ``{"study_json": Path, "report_md": Path, "report_html": Path, "plots": {stem: Path | None},
        "findings": [...]}``.
    """
    from moecpt.analysis import plots as plots_mod  # here, not at the top: matplotlib only when drawing

    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    study_path, md_path, html_path = out_dir / "study.json", out_dir / "report.md", out_dir / "report.html"
    ledger = FileLedger(out_dir)
    # every file of the report is checked before any is written: a user's report.md is refused, not replaced
    ledger.check_replaceable(*report_files(out_dir))
    plot_dir.mkdir(parents=True, exist_ok=True)

    results["findings"] = fnd.evaluate_findings(results)
    results["questions"] = fnd.answer_questions(results, results["findings"])
    results["overview"] = build_overview(results)
    results["tables"] = build_tables(results)

    plot_paths: dict[str, Path | None] = {}
    for stem, fn, _caption in PLOTS:
        target = plot_dir / f"{stem}.png"
        try:
            plot_paths[stem] = getattr(plots_mod, fn)(results, target)
        finally:
            import matplotlib.pyplot as plt
            plt.close("all")
        if plot_paths[stem] is None:
            ledger.remove(target)  # a stale figure of an earlier run must not be shown
        else:
            ledger.record(target)
    results["plots"] = {s: (f"plots/{p.name}" if p else None) for s, p in plot_paths.items()}

    study = _json_clean(results)
    write_json_atomic(study_path, study)
    ledger.record(study_path)

    blocks = build_blocks(study, study["plots"], out_dir)
    write_bytes_atomic(md_path, render_markdown(blocks).encode("utf-8"))
    title = f"moecpt study: {study.get('name', 'unnamed')}"
    write_bytes_atomic(html_path, render_html(blocks, title).encode("utf-8"))
    ledger.record(md_path, html_path)
    return {"study_json": study_path, "report_md": md_path, "report_html": html_path, "plots": plot_paths,
            "findings": results["findings"]}
