"""The report of ``moecpt study``: findings, tables and figures of a CPT study, as ``study.json``, ``report.md`` and a
self-contained ``report.html``.

The study reproduces Thérien et al., "Continual Pre-training of MoEs: How robust is your router?" (arXiv 2503.05029,
TMLR 2025) at small scale. :func:`write_report` takes the study runner's ``results`` dict::

    results = {
      "name": str, "wall_time_s": float,
      "old_sources": ["english"], "shifts": ["code"],
      "models": {name: {"preset", "arch": "dense"|"switch"|"granular", "router": "penalty"|"sinkhorn"|"bias"|None,
                        "is_moe", "total_params", "active_params", "train_flops_per_token"}},
      "runs": {key: {"kind": "pretrain"|"cpt"|"retrain", "model", "shift", "replay", "schedule": "inf"|"rewarm"|None,
                     "parent", "parent_step", "start_tokens", "steps", "tokens", "train_flops",
                     "val": {source: [[step, tokens, loss], ...]},
                     "train_mri": [[step, mri_mean, [mri per MoE layer]], ...],
                     "final": {source: {"loss", "mri_mean"?, "mri_layers"?}},
                     "start": {source: {...}} | None}},
      "comparisons": {cpt key: {"source", "crs_layers", "crs_mean", "cvs_layers", "cvs_mean", "chance_overlap"}},
      "forgetting": {cpt key: {"forgetting": {...}, "adaptation": {...}, "mean_forgetting", "mean_adaptation",
                               "loss_before": {...}, "loss_after": {...}}},
    }

Every key may be missing (a partial study still gets a report). The outputs:

- ``study.json``: ``results`` plus ``findings`` (:func:`moecpt.analysis.findings.evaluate_findings`), ``questions``,
  ``overview``, ``tables`` (the raw numbers of every report table) and ``plots``; written atomically;
- ``plots/*.png`` (:mod:`moecpt.analysis.plots`);
- ``report.md`` and ``report.html``: both rendered from ONE list of blocks (heading / paragraph / list / table /
  image), and every number in them goes through :func:`fmt` (4 significant digits) from a value stored in
  ``study.json``, so the two documents cannot diverge and every printed number can be traced to the JSON.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moecpt.analysis import findings as fnd
from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic
from moecpt.storage.outputs import FileLedger

__all__ = ["write_report", "build_tables", "build_blocks", "render_markdown", "render_html", "fmt", "PLOTS"]


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


#: (file stem, plotting function name, caption)
PLOTS: list[tuple[str, str, str]] = [
    ("val_loss", "plot_val_loss",
     "Validation loss per source across the shift, every run (rows: models; columns: sources). CPT runs continue "
     "from their branch point (dashed line); re-training runs start from zero."),
    ("mri_shift", "plot_mri_shift",
     "Training MRI per MoE layer around the shift (finding F2): the end of pre-training, then CPT (replay 0, "
     "infinite schedule when present). The paper: penalty balancing spikes then recovers; Sinkhorn barely moves."),
    ("crs_layers", "plot_crs_layers",
     "Continual Router Saturation (and vocabulary specialization) per MoE layer between the CPT start checkpoint "
     "and the CPT result on the old source (finding F5). Lower = routing changed more; dotted: chance k/E."),
    ("forgetting_vs_replay", "plot_forgetting_vs_replay",
     "Forgetting of the old sources and final new-source loss against the replay fraction (finding F3)."),
    ("moe_vs_dense", "plot_moe_vs_dense",
     "MoE vs FLOP-matched dense model through CPT, on each old and new source (finding F1)."),
    ("coactivation", "plot_coactivation",
     "Expert co-activation CA(i, j) = N(i and j chosen) / N(i chosen) on the old source's held-out tokens, at the "
     "CPT start checkpoint and after CPT (replay 0), first and last MoE layer."),
    ("compute", "plot_compute",
     "Final mean loss (old + new) against training FLOPs: CPT runs at their own FLOPs (filled) and including the "
     "parent pre-training (hollow), re-training on the union as stars (finding F4)."),
]


# ------------------------------------------------------------------------------------------------------ tables
def _table(columns: list[str], rows: list[list[Any]]) -> dict:
    return {"columns": columns, "rows": rows}


def build_tables(results: Mapping) -> dict[str, dict]:
    """The raw numbers of every report table: ``{name: {"columns": [...], "rows": [[...], ...]}}`` (JSON-ready)."""
    runs = fnd._runs(results)
    models = fnd._models(results)
    old = list(results.get("old_sources") or [])
    tables: dict[str, dict] = {}

    tables["models"] = _table(
        ["model", "preset", "arch", "router", "MoE", "total params", "active params", "train FLOPs/token"],
        [[m, i.get("preset"), i.get("arch"), i.get("router") or "-", fnd.is_moe_model(results, m),
          i.get("total_params"), i.get("active_params"), i.get("train_flops_per_token")] for m, i in models.items()])

    all_keys = fnd.sorted_run_keys(results)
    tables["runs"] = _table(
        ["run", "kind", "model", "shift", "schedule", "replay", "steps", "tokens", "start tokens", "train FLOPs"],
        [[k, r.get("kind"), r.get("model"), r.get("shift") or "-", r.get("schedule") or "-", r.get("replay"),
          r.get("steps"), r.get("tokens"), r.get("start_tokens"), r.get("train_flops")]
         for k, r in ((k, runs[k]) for k in all_keys)])

    sources = old + [s for s in (results.get("shifts") or []) if s not in old]
    for r in runs.values():
        for s in list(r.get("final") or {}) + list(r.get("val") or {}):
            if s not in sources:
                sources.append(s)
    tables["final_losses"] = _table(
        ["run", "kind", "model", "schedule", "replay"] + [f"{s} loss" for s in sources] + ["mean (old + new)"],
        [[k, r.get("kind"), r.get("model"), r.get("schedule") or "-", r.get("replay")]
         + [fnd.final_loss(r, s) for s in sources] + [fnd.mean_final_loss(results, r)]
         for k, r in ((k, runs[k]) for k in all_keys)])

    cpt_keys = fnd.sorted_run_keys(results, "cpt")
    fg = results.get("forgetting") or {}
    rows = []
    for k in cpt_keys:
        r = runs[k]
        e = fg.get(k) if isinstance(fg.get(k), Mapping) else {}
        before = dict(e.get("loss_before") or {})
        after = dict(e.get("loss_after") or {})
        shift = r.get("shift")
        for s in old + ([shift] if shift else []):
            before.setdefault(s, fnd._start_loss(r, s))
            after.setdefault(s, fnd.final_loss(r, s))
        row = [k, r.get("model"), r.get("schedule") or "-", r.get("replay")]
        for s in old:
            row += [before.get(s), after.get(s)]
        row.append(fnd.mean_forgetting(results, k))
        nb, na = before.get(shift), after.get(shift)
        adapt = e.get("mean_adaptation")
        if adapt is None and nb is not None and na is not None:
            adapt = nb - na
        row += [shift or "-", nb, na, adapt]
        rows.append(row)
    cols = ["run", "model", "schedule", "replay"]
    for s in old:
        cols += [f"{s} before", f"{s} after"]
    cols += ["forgetting (mean old)", "new source", "new before", "new after", "adaptation"]
    tables["forgetting"] = _table(cols, rows)

    rows = []
    for k in cpt_keys:
        r = runs[k]
        if not fnd.is_moe_model(results, r.get("model")):
            continue
        st = fnd.mri_shift_stats(results, k) or {}
        for s in old:
            b = ((r.get("start") or {}).get(s) or {}).get("mri_mean")
            a = ((r.get("final") or {}).get(s) or {}).get("mri_mean")
            change = a - b if fnd._num(a) is not None and fnd._num(b) is not None else None
            rows.append([k, r.get("model"), models.get(r.get("model"), {}).get("router"), r.get("schedule") or "-",
                         r.get("replay"), s, b, a, change, st.get("pre"), st.get("peak"), st.get("final")])
    tables["mri"] = _table(["run", "model", "router", "schedule", "replay", "old source", "eval MRI before",
                            "eval MRI after", "change", "train MRI pre-shift", "train MRI peak (first 10%)",
                            "train MRI final (last 10%)"], rows)

    comps = fnd.comparisons(results)
    rows = []
    for k in cpt_keys:
        c = comps.get(k)
        if c is None:
            continue
        r = runs.get(k, {})
        layers = [v for v in (fnd._num(x) for x in c.get("crs_layers") or []) if v is not None]
        rows.append([k, r.get("model"), r.get("schedule") or "-", r.get("replay"), c.get("source"),
                     c.get("crs_mean"), layers[0] if layers else None,
                     sum(layers[1:]) / len(layers[1:]) if len(layers) > 1 else None,
                     c.get("cvs_mean"), c.get("chance_overlap")])
    tables["routing"] = _table(["run", "model", "schedule", "replay", "source", "CRS mean", "CRS first layer",
                                "CRS other layers", "CVS mean", "chance overlap"], rows)
    return tables


# ------------------------------------------------------------------------------------------------------ blocks
def _h(level: int, text: str) -> dict:
    return {"type": "heading", "level": level, "text": text}


def _p(text: str) -> dict:
    return {"type": "paragraph", "text": text}


def _figures_text(figures: Mapping) -> str:
    parts = []
    for k, v in figures.items():
        if k == "details":
            continue
        if k == "untested":
            parts.append("untested: " + ", ".join(str(x) for x in v))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            parts.append(f"{k}={fmt(v)}")
    return "; ".join(parts)


_STATUS = {True: "yes", False: "no", None: "untested"}


def build_blocks(study: Mapping, plots: Mapping[str, str | None], out_dir: Path) -> list[dict]:
    """The report as one list of blocks, rendered by :func:`render_markdown` and :func:`render_html`.

    Table blocks hold raw values (from ``study["tables"]`` / ``study["findings"]``), formatted by :func:`fmt` at
    rendering time; paragraph numbers are formatted from ``study`` values here.
    """
    tables = study.get("tables") or {}
    ov = study.get("overview") or {}
    blocks: list[dict] = [_h(1, f"moecpt study: {study.get('name', 'unnamed')}")]
    blocks.append(_p(
        "Continual pre-training (CPT) of Mixture-of-Experts language models at small scale, reproducing in direction "
        "the findings of Thérien et al., \"Continual Pre-training of MoEs: How robust is your router?\" "
        "(arXiv 2503.05029, TMLR 2025), with the dense CPT recipe of Ibrahim et al. (arXiv 2403.08763). "
        f"Old (pre-training) sources: {', '.join(study.get('old_sources') or []) or 'n/a'}; shifts: "
        f"{', '.join(study.get('shifts') or []) or 'n/a'}. Wall time: {fmt(study.get('wall_time_s'))} s."))

    blocks.append(_h(2, "What was run"))
    blocks.append(_p(f"{fmt(ov.get('models'))} models and {fmt(ov.get('runs'))} runs: {fmt(ov.get('pretrain'))} "
                     f"pre-training, {fmt(ov.get('cpt'))} CPT and {fmt(ov.get('retrain'))} full re-training runs. "
                     "CPT schedules: inf = CosineInf from the pre-anneal checkpoint; rewarm = cosine re-warm and "
                     "re-decay from the final checkpoint. Replay is compute-equivalent (a fraction of the CPT "
                     "budget)."))
    for name, caption in (("models", "Models"), ("runs", "Runs")):
        if tables.get(name, {}).get("rows"):
            blocks.append({"type": "table", "caption": caption, **tables[name]})

    blocks.append(_h(2, "The paper's three questions"))
    blocks.append({"type": "list", "items": [f"{q['question']} {q['answer']}" for q in study.get("questions") or []]})

    blocks.append(_h(2, "Findings"))
    blocks.append(_p("Each finding is decided by a direction-of-effect rule on these runs (one seed; no significance "
                     "test). 'untested' means the study has no runs that test it."))
    fs = study.get("findings") or []
    blocks.append({"type": "table", "caption": "Findings of Thérien et al. 2025",
                   "columns": ["id", "claim", "reproduced", "deciding figures"],
                   "rows": [[f["id"], f["title"], _STATUS.get(f.get("reproduced"), "untested"),
                             _figures_text(f.get("figures") or {})] for f in fs]})
    blocks.append({"type": "list", "items": [f"{f['id']}: {f['rule']}" for f in fs]})

    sections = [
        ("final_losses", "Final losses", "Dedicated end-of-run evaluation loss (nats) per run and source."),
        ("forgetting", "Forgetting and adaptation",
         "Loss (nats) at the CPT start checkpoint (before) and after CPT. Forgetting = rise of the old sources' loss; "
         "adaptation = fall of the new source's loss."),
        ("mri", "Routing balance (MRI)",
         "Maximum Routing Imbalance (max share of tokens routed to one expert) on the old source's held-out tokens "
         "at the CPT start checkpoint and after CPT, with the training-MRI statistics around the shift used by F2."),
        ("routing", "Routing change (CRS / CVS)",
         "Continual Router Saturation (mean top-k overlap per token, 1 = unchanged) and Continual Vocabulary "
         "Specialization between the CPT start checkpoint and the CPT result, on the old source."),
    ]
    for name, title, text in sections:
        blocks.append(_h(2, title))
        if tables.get(name, {}).get("rows"):
            blocks.append(_p(text))
            blocks.append({"type": "table", "caption": title, **tables[name]})
        else:
            blocks.append(_p("No data in this study."))

    blocks.append(_h(2, "Figures"))
    for stem, _fn, caption in PLOTS:
        rel = plots.get(stem)
        if rel:
            blocks.append({"type": "image", "path": str(out_dir / rel), "rel": rel, "caption": caption, "alt": stem})
        else:
            blocks.append(_p(f"({stem}: no data in this study.)"))
    return blocks


# --------------------------------------------------------------------------------------------------- renderers
def _md_cell(x: Any) -> str:
    return fmt(x).replace("|", "\\|").replace("\n", " ")


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
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding: .2em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
td.yes { background: #dff3df !important; } td.no { background: #f8dede !important; }
td.untested { background: #eee !important; color: #666; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #444; margin-top: .3em; }
"""


def render_html(blocks: list[dict], title: str = "moecpt study") -> str:
    """A self-contained HTML page: inline CSS, images embedded as base64 PNG data URIs, no external assets."""
    e = html.escape
    body: list[str] = []
    for b in blocks:
        t = b["type"]
        if t == "heading":
            body.append(f"<h{b['level']}>{e(b['text'])}</h{b['level']}>")
        elif t == "paragraph":
            body.append(f"<p>{e(b['text'])}</p>")
        elif t == "list":
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b["items"]) + "</ul>")
        elif t == "table":
            cap = f"<caption>{e(b['caption'])}</caption>" if b.get("caption") else ""
            head = "<tr>" + "".join(f"<th>{e(fmt(c))}</th>" for c in b["columns"]) + "</tr>"
            rows = []
            for row in b["rows"]:
                cells = []
                for c in row:
                    s = fmt(c)
                    cls = f' class="{s}"' if s in ("yes", "no", "untested") and isinstance(c, str) else ""
                    cells.append(f"<td{cls}>{e(s)}</td>")
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
    from moecpt.analysis import plots as plots_mod

    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    study_path, md_path, html_path = out_dir / "study.json", out_dir / "report.md", out_dir / "report.html"
    ledger = FileLedger(out_dir)
    # every file of the report is checked before any is written: a user's report.md is refused, not replaced
    ledger.check_replaceable(*report_files(out_dir))
    plot_dir.mkdir(parents=True, exist_ok=True)

    results["findings"] = fnd.evaluate_findings(results)
    results["questions"] = fnd.answer_questions(results, results["findings"])
    runs = fnd._runs(results)
    kinds = [r.get("kind") for r in runs.values()]
    results["overview"] = {"models": len(fnd._models(results)), "runs": len(runs), "pretrain": kinds.count("pretrain"),
                           "cpt": kinds.count("cpt"), "retrain": kinds.count("retrain")}
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
