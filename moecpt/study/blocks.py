"""The study report as one list of blocks (heading / paragraph / list / table / image): :func:`build_blocks`, from
the ``study.json`` dict (the results, read through :mod:`moecpt.study.results`, and what the report derived:
``findings``, ``questions``, ``overview``, ``tables``, ``plots``). Paragraph numbers are formatted here by
:func:`~moecpt.study.numbers.fmt`; table cells keep their raw values until :mod:`moecpt.study.render`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from moecpt.study.numbers import finite, fmt
from moecpt.study.results import StudyResults, as_results

__all__ = ["build_blocks", "headline_part", "study_name", "PLOTS"]


def headline_part(finding: Mapping) -> dict | None:
    """The part whose effect heads a finding's row: the one named by ``finding["headline"]``, else the first tested
    directional / equivalence part with a mean, else the first part with a mean."""
    parts = [p for p in finding.get("parts") or [] if isinstance(p, Mapping)]
    name = finding.get("headline")
    for p in parts:
        if name is not None and p.get("name") == name:
            return dict(p)
    tested = [p for p in parts if not p.get("untested") and finite(p.get("mean")) is not None]
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
    if finite(p.get("mean")) is None:
        return "n/a"
    s = fmt(p.get("mean"))
    s += f" [{fmt(p.get('lo'))}, {fmt(p.get('hi'))}]" if p.get("lo") is not None or p.get("hi") is not None \
        else " (no interval)"
    n = finite(p.get("n_seeds"))
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


def _sinkhorn_blocks(study: Mapping, res: StudyResults) -> list[dict]:
    """The note on the Sinkhorn router's two MRIs (docs/study-rules.md, last section), when a Sinkhorn model ran."""
    if not any(i.router == "sinkhorn" for i in res.models.values()):
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


def _intro_blocks(study: Mapping, res: StudyResults) -> list[dict]:
    """The report's title and its overview paragraph (study, models, sources, seeds, run counts, wall time)."""
    ov = study.get("overview") or {}
    models = list(res.models)
    name = study_name(res)
    blocks: list[dict] = [_h(1, f"moecpt study: {name}")]
    seeds = ov.get("seeds") or []
    shifts = list(res.shifts)
    wall = f"{fmt(res.wall_time_s)} s" + (f" ({fmt(ov['wall_time_h'])} h)" if ov.get("wall_time_h")
                                                    is not None else "")
    if ov.get("stage_time_h") is not None:  # a re-run of a cached study is short; the stages' own time is not
        wall += (f" for this invocation; the training runs took {fmt(ov['stage_time_h'])} h summed over stages "
                 f"(run {fmt(res.jobs)} at a time)")
    blocks.append(_p(
        f"This report covers the study {name}: continual pre-training (CPT) of "
        f"Mixture-of-Experts language models at small scale, reproducing in direction the findings of Thérien et "
        f"al., \"Continual Pre-training of MoEs: How robust is your router?\" (arXiv 2503.05029, TMLR 2025), with "
        f"the dense CPT recipe of Ibrahim et al. (arXiv 2403.08763). {fmt(ov.get('models'))} models "
        f"({', '.join(models) or 'n/a'}) were pre-trained on {', '.join(res.old_sources) or 'n/a'} "
        f"and continually pre-trained on {'the shift' if len(shifts) == 1 else 'the shifts'} to "
        f"{', '.join(shifts) or 'n/a'}, every stage once per seed, over {fmt(ov.get('n_seeds'))} seed(s)"
        f"{' (' + ', '.join(fmt(s) for s in seeds) + ')' if seeds else ''}: {fmt(ov.get('runs'))} training runs "
        f"in all ({fmt(ov.get('pretrain'))} pre-training, {fmt(ov.get('cpt'))} CPT, {fmt(ov.get('control'))} "
        f"no-shift control and {fmt(ov.get('retrain'))} full re-training runs) in {fmt(ov.get('cells'))} cells. "
        f"Wall time: {wall}. A no-shift control continues from the same checkpoint with the same schedule, step "
        "budget and optimizer state on the old data only, so what a CPT run does beyond its control is the shift's "
        "doing."))
    return blocks


def study_name(res: StudyResults) -> str:
    """The study's name for titles: ``unnamed`` without one."""
    return res.name if res.name is not None else "unnamed"


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
         "and the mean over the old sources and the cell's shift with its min and max over seeds. Any other "
         "source's column (another cell's shift, or evaluated data that no run trains on) is for reference: it "
         "enters no mean and no verdict."),
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
    ``study`` is the report's ``study.json`` dict: its results part is read through
    :func:`moecpt.study.results.parse_results`, what the report derived (tables, findings, ...) as it stands.

    Raises:
        MoecptError: a field of the results is missing or malformed.
    """
    res = as_results(study)
    tables = study.get("tables") or {}
    blocks = _intro_blocks(study, res)
    blocks += _questions_blocks(study)
    blocks += _findings_blocks(study)
    blocks += _runs_blocks(tables)
    blocks += _cell_tables_blocks(tables)
    blocks += _sinkhorn_blocks(study, res)
    blocks += _figures_blocks(plots, out_dir)
    blocks += _appendix_blocks(tables)
    return blocks
