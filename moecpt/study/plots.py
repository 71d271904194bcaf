"""The study's figures, after Thérien et al., "Continual Pre-training of MoEs: How robust is your router?"
(arXiv 2503.05029, TMLR 2025) and Ibrahim et al. (arXiv 2403.08763, TMLR 2024).

Every function takes the study's results (:class:`~moecpt.study.results.StudyResults`, or the ``results`` dict,
which it parses) and a path, writes one PNG there (matplotlib, Agg backend, so it works without a display) and
returns the path, or returns ``None`` without writing when the results hold no data for that figure (a dense-only
study has no MRI plot, ...).

**Seed bands.** Runs are grouped across seeds by their key without the ``sN/`` prefix (a study *cell*). A cell is
drawn as the mean over its seeds (the line; curves of different seeds are interpolated onto one x grid over their
common range) and, with two or more seeds, the seeds' min-max as a shaded band (``fill_between``). One-seed results
(the older schema included) are drawn as plain lines. Each figure picks the cells it needs rather than every run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from moecpt.study.numbers import finite  # noqa: E402
from moecpt.study.readers import (  # noqa: E402
    comparisons, final_loss, is_moe_model, mean_final_loss, mean_forgetting, mri_series, parent_flops_used,
    seed_groups,
)
from moecpt.study.results import RunRecord, StudyResults, as_results, base_key  # noqa: E402

__all__ = ["plot_coactivation", "plot_val_loss", "plot_mri_shift", "plot_crs_layers", "plot_forgetting_vs_replay",
           "plot_moe_vs_dense", "plot_compute", "band", "DPI"]

DPI = 110
_CMAP = plt.get_cmap("tab10")
BAND_ALPHA = 0.2


# ------------------------------------------------------------------------------------------------------ helpers
def band(ax, curves: Sequence[tuple[Sequence[float], Sequence[float]]], color: Any, label: str | None = None,
         alpha: float = BAND_ALPHA, **line_kw) -> Any:
    """Draw one cell over its seeds: the mean curve as a line, the min-max over seeds shaded when 2+ seeds.

    ``curves`` holds one ``(xs, ys)`` per seed. The x grid is the longest curve's x values within the range all
    curves cover (the whole longest curve when they do not overlap); the others are linearly interpolated onto it.
    Returns the line (None when no curve has a point).
    """
    cs = []
    for xs, ys in curves:
        pts = sorted((float(x), float(y)) for x, y in zip(xs, ys) if finite(x) is not None and finite(y) is not None)
        if pts:
            cs.append((np.array([p[0] for p in pts]), np.array([p[1] for p in pts])))
    if not cs:
        return None
    grid = max(cs, key=lambda c: len(c[0]))[0]
    lo_x, hi_x = max(c[0][0] for c in cs), min(c[0][-1] for c in cs)
    inside = grid[(grid >= lo_x) & (grid <= hi_x)]
    if len(inside):
        grid = inside
    ys = np.vstack([np.interp(grid, x, y) for x, y in cs])
    (line,) = ax.plot(grid, ys.mean(axis=0), color=color, label=label, **line_kw)
    if len(cs) >= 2:
        ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=color, alpha=alpha, lw=0)
    return line


def _band_points(ax, points: Mapping[float, Sequence[float]], color: Any, label: str | None = None,
                 **line_kw) -> Any:
    """A line through the mean over seeds at each x (``points``: {x: [one value per seed]}), with the min-max band
    when some x has 2+ values."""
    xs = sorted(x for x, v in points.items() if [y for y in v if finite(y) is not None])
    if not xs:
        return None
    vals = [[float(y) for y in points[x] if finite(y) is not None] for x in xs]
    (line,) = ax.plot(xs, [sum(v) / len(v) for v in vals], color=color, label=label, **line_kw)
    if any(len(v) >= 2 for v in vals):
        ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=BAND_ALPHA, lw=0)
    return line


def _cell_label(run: RunRecord) -> str:
    kind = run.kind
    if kind == "cpt":
        return f"CPT {run.shift} {run.schedule} replay {run.replay_or_zero:g}"
    if kind == "control":
        return f"control {run.schedule} (no shift)"
    if kind == "retrain":
        return f"retrain (union with {run.shift})"
    return str(kind)


def _curve(run: RunRecord, source: str, offset: float = 0.0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for e in run.val.get(source) or ():
        t, loss = finite(e.tokens), finite(e.loss)
        if t is None or loss is None:
            continue
        xs.append(offset + t)
        ys.append(loss)
    return xs, ys


def _offset(run: RunRecord) -> float:
    return (finite(run.start_tokens) or 0.0) if run.kind in ("cpt", "control") else 0.0


def _sources(results: StudyResults) -> list[str]:
    srcs = list(results.old_sources) + list(results.shifts)
    for r in results.runs.values():
        for s in r.val:
            if s not in srcs:
                srcs.append(s)
    return list(dict.fromkeys(srcs))


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _finish(fig, axes, title: str, path: str | Path, fontsize: int = 12) -> Path:
    """Title, layout, one legend below the panels, save: the common end of the multi-panel plots."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    _fig_legend(fig, axes.ravel())
    return _save(fig, path)


def _fig_legend(fig, axes) -> None:
    """One legend for the whole figure, below the panels, with each label once."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        ncol = min(4, len(seen))
        fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=ncol, fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.035 * math.ceil(len(seen) / ncol)), frameon=False)


def _grid(nrows: int, ncols: int, w: float = 4.6, h: float = 3.2, **kw):
    return plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, **kw)


def _tokens_axis(ax) -> None:
    ax.set_xlabel("tokens seen")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _style_for(run: RunRecord, styles: dict) -> dict:
    """A colour per (kind, shift, schedule, replay), consistent across panels; pretrain black, retrain grey."""
    kind = run.kind
    if kind == "pretrain":
        return {"color": "black", "lw": 1.6}
    if kind == "retrain":
        return {"color": "0.45", "lw": 1.3, "ls": ":"}
    key = (kind, run.shift, run.schedule, run.replay_or_zero)
    if key not in styles:
        if kind == "control":
            styles[key] = {"color": "saddlebrown" if run.schedule != "rewarm" else "darkviolet", "lw": 1.3,
                           "ls": "-."}
        else:
            n = sum(1 for k in styles if k[0] == "cpt")
            styles[key] = {"color": _CMAP(n % 10), "lw": 1.3, "ls": "-" if run.schedule != "rewarm" else "--"}
    return styles[key]


def _model_cells(results: StudyResults, model: str, kind: str) -> dict[str, list[str]]:
    runs = results.runs
    return {c: ks for c, ks in seed_groups(results, kind).items() if runs[ks[0]].model == model}


def _pick_cpt_cell(results: StudyResults, model: str, ok=lambda k: True) -> str | None:
    """The model's CPT cell with the smallest replay, the infinite schedule preferred, among cells whose first
    run passes ``ok``."""
    runs = results.runs
    cells = [(c, ks) for c, ks in _model_cells(results, model, "cpt").items() if ok(ks[0])]
    if not cells:
        return None
    return min(cells, key=lambda ck: (runs[ck[1][0]].replay_or_zero, runs[ck[1][0]].schedule != "inf", ck[0]))[0]


def _control_keys(results: StudyResults, cpt_keys: list[str]) -> list[str]:
    """The no-shift controls of CPT runs (their ``control`` field), those present."""
    runs = results.runs
    return [c for c in (runs[k].control for k in cpt_keys) if c in runs]


# ------------------------------------------------------------------------------------------------------ figures
def plot_val_loss(results: StudyResults | Mapping, path: str | Path) -> Path | None:
    """Validation loss per source across the shift (the loss-curve figures of both papers), seed bands.

    Grid: one row per model, one column per data source. Per model: pre-training, the CPT cells at the smallest and
    the largest replay of each (shift, schedule), the no-shift controls and full re-training. x = tokens seen (CPT
    runs and controls continue from ``start_tokens``, the branch point; dashed vertical line).
    """
    results = as_results(results)
    runs = results.runs
    models = [m for m in results.models if any(r.model == m and r.val for r in runs.values())]
    models += sorted({r.model for r in runs.values() if r.val} - set(models), key=str)
    sources = _sources(results)
    if not models or not sources:
        return None
    fig, axes = _grid(len(models), len(sources))
    styles: dict = {}
    for i, m in enumerate(models):
        cells: list[list[str]] = list(_model_cells(results, m, "pretrain").values())
        by_variant: dict[tuple, dict[float, list[str]]] = {}
        for ks in _model_cells(results, m, "cpt").values():
            r = runs[ks[0]]
            by_variant.setdefault((r.shift, r.schedule), {})[r.replay_or_zero] = ks
        for reps in by_variant.values():
            cells += [reps[x] for x in sorted({min(reps), max(reps)})]
        cells += list(_model_cells(results, m, "control").values())
        cells += list(_model_cells(results, m, "retrain").values())
        for j, s in enumerate(sources):
            ax = axes[i][j]
            shifts_at = set()
            for ks in cells:
                r0 = runs[ks[0]]
                band(ax, [_curve(runs[k], s, _offset(runs[k])) for k in ks], label=_cell_label(r0),
                     **_style_for(r0, styles))
                if _offset(r0):
                    shifts_at.add(_offset(r0))
            for x in sorted(shifts_at):
                ax.axvline(x, color="0.3", ls="--", lw=0.8, label="branch point (CPT start)")
            ax.set_title(f"{m}: {s}", fontsize=10)
            _tokens_axis(ax)
            ax.set_ylabel("validation loss (nats)")
            ax.grid(alpha=0.3)
    return _finish(fig, axes, "Validation loss across the distribution shift (mean over seeds, band: min-max)", path)


def _balanced_level(results: StudyResults, model: str) -> float | None:
    info = results.model_info(model)
    k, e = finite(info.top_k), finite(info.num_experts)
    return k / e if k and e else None


def _branch_series(results: StudyResults, key: str) -> tuple[float, list[tuple[float, float]]]:
    """(branch step, the run's training-MRI series on the parent's step axis)."""
    r = results.runs[key]
    rows = mri_series(r)
    base = finite(r.parent_step)
    if base is None:
        pre = mri_series(results.runs.get(r.parent or ""))
        base = pre[-1][0] if pre else 0.0
    # CPT resets the step counter; a log that kept the global count is used as is
    off = 0.0 if rows and base > 0 and rows[0][0] >= base else base
    return base, [(off + s, v) for s, v in rows]


def plot_mri_shift(results: StudyResults | Mapping, path: str | Path, pre_fraction: float = 0.25) -> Path | None:
    """Training MRI (mean over the MoE layers) around the shift, one panel per MoE model (finding F2).

    The last ``pre_fraction`` of pre-training before the branch point, then the chosen CPT cell (smallest replay,
    infinite schedule preferred) and its no-shift control, each as the mean over seeds with a min-max band.
    x = global step; the dashed line is the shift. Panels share the y axis, so penalty and Sinkhorn compare. A
    dotted line marks perfect balance k/E when the model entry gives ``top_k`` and ``num_experts``.
    """
    results = as_results(results)
    runs = results.runs
    picks = []
    for m in results.models:
        if is_moe_model(results, m):
            cell = _pick_cpt_cell(results, m, lambda k: bool(mri_series(runs[k])))
            if cell:
                picks.append((m, cell))
    if not picks:
        return None
    groups = seed_groups(results, "cpt")
    fig, axes = _grid(1, len(picks), w=5.4, h=3.8, sharey=True)
    for ax, (m, cell) in zip(axes[0], picks):
        keys = groups[cell]
        pre_curves, cpt_curves, bases = [], [], []
        for k in keys:
            base, series = _branch_series(results, k)
            bases.append(base)
            cpt_curves.append(([s for s, _ in series], [v for _, v in series]))
            pre = mri_series(runs.get(runs[k].parent or ""), base)
            pre = pre[-max(1, int(math.ceil(pre_fraction * len(pre)))):] if pre else []
            pre_curves.append(([s for s, _ in pre], [v for _, v in pre]))
        band(ax, pre_curves, color="black", lw=1.5, label="pre-training (end)")
        band(ax, cpt_curves, color="tab:red", lw=1.6, label="CPT (shift)")
        ctrl = [c for c in _control_keys(results, keys) if mri_series(runs[c])]
        if ctrl:
            cc = [_branch_series(results, c)[1] for c in ctrl]
            band(ax, [([s for s, _ in c], [v for _, v in c]) for c in cc], color="tab:blue", lw=1.4, ls="-.",
                 label="no-shift control")
        ax.axvline(bases[0], color="0.3", ls="--", lw=1.0, label="shift (CPT start)")
        lvl = _balanced_level(results, m)
        if lvl is not None:
            ax.axhline(lvl, color="0.4", ls=":", lw=1.0, label="balanced k/E")
        r0 = runs[keys[0]]
        ax.set_title(f"{m} ({results.models[m].router}): {_cell_label(r0)}", fontsize=9)
        ax.set_xlabel("training step (pre-training, then CPT)")
        ax.set_ylabel("train MRI, mean over MoE layers")
        ax.grid(alpha=0.3)
    return _finish(fig, axes, "Routing imbalance around the shift: CPT vs no-shift control (mean over seeds, band: "
                   "min-max)", path, fontsize=11)


def plot_crs_layers(results: StudyResults | Mapping, path: str | Path) -> Path | None:
    """Continual Router Saturation (and Vocabulary Specialization when present) per MoE layer (finding F5): one row
    per MoE model, the CPT cells of one schedule (infinite preferred) at each replay and that schedule's no-shift
    control (dashed black), mean over seeds with min-max bands.

    CRS is the mean share of a token's top-k experts kept between the CPT start checkpoint and the end of the run on
    the old source's held-out tokens: 1 = unchanged; the dotted line is the chance overlap k/E.
    """
    results = as_results(results)
    runs = results.runs
    comps = {k: v for k, v in comparisons(results).items() if v.crs_layers}
    if not comps:
        return None
    cpt_cells = {c: [k for k in ks if k in comps] for c, ks in seed_groups(results, "cpt").items()}
    cpt_cells = {c: ks for c, ks in cpt_cells.items() if ks}
    if not cpt_cells:
        return None
    models = list(dict.fromkeys(runs[ks[0]].model for ks in cpt_cells.values()))
    has_cvs = any(comps[k].cvs_layers for ks in cpt_cells.values() for k in ks)
    metrics = [("crs_layers", "CRS (top-k overlap)")] + ([("cvs_layers", "CVS (vocab. specialization)")]
                                                         if has_cvs else [])
    fig, axes = _grid(len(models), len(metrics), w=6.0, h=3.4)
    for i, m in enumerate(models):
        mine = {c: ks for c, ks in cpt_cells.items() if runs[ks[0]].model == m}
        scheds = {runs[ks[0]].schedule for ks in mine.values()}
        sched = "inf" if "inf" in scheds else sorted(scheds, key=str)[0]
        mine = dict(sorted(((c, ks) for c, ks in mine.items() if runs[ks[0]].schedule == sched),
                           key=lambda ck: (str(runs[ck[1][0]].shift), runs[ck[1][0]].replay_or_zero)))
        ctrl = list(dict.fromkeys(c for ks in mine.values() for c in _control_keys(results, ks) if c in comps))
        for j, (field, name) in enumerate(metrics):
            ax = axes[i][j]
            n_layers = 0
            for n, ks in enumerate(mine.values()):
                curves = [(list(range(len(getattr(comps[k], field)))), getattr(comps[k], field)) for k in ks]
                n_layers = max([n_layers] + [len(c[0]) for c in curves])
                band(ax, curves, color=_CMAP(n % 10), marker="o", ms=3, lw=1.3, label=_cell_label(runs[ks[0]]))
            if ctrl:
                curves = [(list(range(len(getattr(comps[k], field)))), getattr(comps[k], field)) for k in ctrl]
                band(ax, curves, color="black", marker="s", ms=3, lw=1.2, ls="--",
                     label=f"control {sched} (no shift)")
            first = next(iter(mine.values()))[0]
            chance = finite(comps[first].chance_overlap)
            if chance is not None and field == "crs_layers":
                ax.axhline(chance, color="0.3", ls=":", lw=1.0, label="chance overlap k/E")
            ax.set_xticks(range(n_layers))
            ax.set_xlabel("MoE layer")
            ax.set_ylabel(name)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{m}, {sched} schedule: {name}", fontsize=10)
            ax.grid(alpha=0.3)
    return _finish(fig, axes, "Routing kept from the CPT start on the old source, per MoE layer (mean over seeds, "
                   "band: min-max)", path, fontsize=11)


def plot_forgetting_vs_replay(results: StudyResults | Mapping, path: str | Path) -> Path | None:
    """Forgetting of the old sources (left) and the new source's final loss (right) against the replay fraction,
    one line per (model, schedule) and one row per shift (Ibrahim et al. 2024; Thérien et al. 2025, finding F3), mean
    over seeds with min-max bands. The schedule's no-shift control (old data only, i.e. replay one) is a hollow
    marker at x = 1 on the forgetting panel, with its seeds' min-max as an error bar.
    """
    results = as_results(results)
    runs = results.runs
    lines: dict[tuple, dict[str, dict[float, list]]] = {}
    for cell, ks in seed_groups(results, "cpt").items():
        r = runs[ks[0]]
        f = [mean_forgetting(results, k) for k in ks]
        a = [final_loss(runs[k], r.shift) for k in ks] if r.shift else []
        if all(v is None for v in f + a):
            continue
        ln = lines.setdefault((r.shift, r.model, r.schedule), {"f": {}, "a": {}, "ctrl": []})
        ln["f"][r.replay_or_zero] = f
        ln["a"][r.replay_or_zero] = a
        ln["ctrl"] += [c for c in _control_keys(results, ks) if c not in ln["ctrl"]]
    if not lines:
        return None
    shifts = list(dict.fromkeys(k[0] for k in lines))
    fig, axes = _grid(len(shifts), 2, w=5.0, h=3.5)
    colors = {m: _CMAP(i % 10) for i, m in enumerate(results.models)}
    for i, sh in enumerate(shifts):
        for (s, m, sched), ln in lines.items():
            if s != sh:
                continue
            style = {"color": colors.get(m, "0.5"), "marker": "s" if sched == "rewarm" else "o",
                     "ls": "--" if sched == "rewarm" else "-"}
            _band_points(axes[i][0], ln["f"], label=f"{m}, {sched}", **style)
            _band_points(axes[i][1], ln["a"], label=f"{m}, {sched}", **style)
            cf = [v for v in (mean_forgetting(results, c) for c in ln["ctrl"]) if v is not None]
            if cf:
                mu = sum(cf) / len(cf)
                axes[i][0].errorbar([1.0], [mu], yerr=[[mu - min(cf)], [max(cf) - mu]], color=style["color"],
                                    marker=style["marker"], mfc="none", ls="", capsize=3,
                                    label="no-shift control (old data only; hollow)")
        axes[i][0].set_title(f"shift to {sh}: forgetting (old sources)", fontsize=10)
        axes[i][0].set_ylabel("loss rise on old sources (nats)")
        axes[i][0].axhline(0.0, color="0.5", lw=0.7)
        axes[i][1].set_title(f"shift to {sh}: final loss on {sh}", fontsize=10)
        axes[i][1].set_ylabel(f"final {sh} loss (nats)")
        for ax in axes[i]:
            ax.set_xlabel("replay fraction of the CPT budget")
            ax.grid(alpha=0.3)
    return _finish(fig, axes, "Replay: less forgetting, slightly slower adaptation (mean over seeds, band: min-max)",
                   path)


def plot_moe_vs_dense(results: StudyResults | Mapping, path: str | Path) -> Path | None:
    """Validation loss against tokens seen on each old and new source, dense vs MoE models, for one CPT variant per
    shift (largest replay with the infinite schedule if present): finding F1 of Thérien et al. 2025. Mean over seeds
    with min-max bands; the faded part of each line is the model's pre-training up to the branch point.
    """
    results = as_results(results)
    runs = results.runs
    dense = [m for m in results.models if is_moe_model(results, m) is False]
    moes = [m for m in results.models if is_moe_model(results, m)]
    cells = seed_groups(results, "cpt")

    def variant(ks: list[str]) -> tuple:
        r = runs[ks[0]]
        return (r.shift, r.schedule, r.replay_or_zero)

    dense_v = {variant(ks) for ks in cells.values() if runs[ks[0]].model in dense}
    moe_v = {variant(ks) for ks in cells.values() if runs[ks[0]].model in moes}
    common = dense_v & moe_v
    if not common:
        return None
    shifts = list(dict.fromkeys(v[0] for v in sorted(common, key=str)))
    chosen = {}
    for sh in shifts:
        vs = [v for v in common if v[0] == sh]
        inf = [v for v in vs if v[1] == "inf"]
        chosen[sh] = max(inf or vs, key=lambda v: (v[2], str(v[1])))
    srcs_by_shift = {sh: list(results.old_sources) + [sh] for sh in shifts}
    ncols = max(len(v) for v in srcs_by_shift.values())
    fig, axes = _grid(len(shifts), ncols, w=4.8, h=3.4)
    colors = {m: _CMAP(i % 10) for i, m in enumerate(dense + moes)}
    for i, sh in enumerate(shifts):
        v = chosen[sh]
        mine = [ks for ks in cells.values() if variant(ks) == v and runs[ks[0]].model in colors]
        for j, s in enumerate(srcs_by_shift[sh]):
            ax = axes[i][j]
            for ks in mine:
                m = runs[ks[0]].model
                off = _offset(runs[ks[0]])
                pre = []
                for k in ks:
                    parent = runs.get(runs[k].parent or "")
                    if parent:
                        xs, ys = _curve(parent, s)
                        pre.append(([x for x in xs if x <= off], [y for x, y in zip(xs, ys) if x <= off]))
                band(ax, pre, color=colors[m], lw=0.8, alpha=0.1)
                band(ax, [_curve(runs[k], s, off) for k in ks], color=colors[m], lw=1.6,
                     ls="--" if m in dense else "-", label=f"{m} ({'dense' if m in dense else 'MoE'})")
                if off:
                    ax.axvline(off, color="0.5", ls="--", lw=0.7)
            kind = "old" if s in results.old_sources else "new"
            ax.set_title(f"{s} ({kind}); CPT {v[1]}, replay {v[2]:g}", fontsize=10)
            _tokens_axis(ax)
            ax.set_ylabel("validation loss (nats)")
            ax.grid(alpha=0.3)
        for j in range(len(srcs_by_shift[sh]), ncols):
            axes[i][j].axis("off")
    return _finish(fig, axes, "MoE vs FLOP-matched dense through CPT (mean over seeds, band: min-max)", path)


def plot_compute(results: StudyResults | Mapping, path: str | Path) -> Path | None:
    """Final mean loss (old + new sources) against training FLOPs, one panel per shift (finding F4).

    One marker per study cell at the mean over seeds, with the seeds' min-max as an error bar. CPT cells appear
    twice: filled at the CPT run's own FLOPs, hollow at CPT + the parent's pre-training FLOPs up to the branch
    point, joined by a thin line; re-training cells on the union are stars. Log-scaled x.
    """
    results = as_results(results)
    runs = results.runs
    pts: dict[str, list[dict]] = {}
    for cell, ks in seed_groups(results).items():
        r = runs[ks[0]]
        if r.kind not in ("cpt", "retrain"):
            continue
        losses = [v for v in (mean_final_loss(results, runs[k]) for k in ks) if v is not None]
        flops = [v for v in (finite(runs[k].train_flops) for k in ks) if v]
        if not losses or not flops:
            continue
        extra = [parent_flops_used(results, runs[k]) for k in ks] if r.kind == "cpt" else []
        extra = [e for e in extra if e]
        pts.setdefault(r.shift, []).append(
            {"run": r, "loss": sum(losses) / len(losses), "lo": min(losses), "hi": max(losses),
             "flops": sum(flops) / len(flops), "extra": sum(extra) / len(extra) if extra else None})
    if not pts:
        return None
    shifts = list(pts)
    fig, axes = _grid(1, len(shifts), w=7.0, h=4.6)
    colors = {m: _CMAP(i % 10) for i, m in enumerate(results.models)}
    used_models: list[str] = []
    for ax, sh in zip(axes[0], shifts):
        for p in pts[sh]:
            r = p["run"]
            m = r.model
            if m not in used_models:
                used_models.append(m)
            c = colors.get(m, "0.5")
            yerr = [[p["loss"] - p["lo"]], [p["hi"] - p["loss"]]]
            if r.kind == "retrain":
                ax.errorbar([p["flops"]], [p["loss"]], yerr=yerr, color=c, ls="", capsize=3, zorder=2)
                ax.scatter([p["flops"]], [p["loss"]], marker="*", s=160, color=c, edgecolor="black", zorder=3)
                continue
            mk = "o" if r.schedule != "rewarm" else "s"
            ax.errorbar([p["flops"]], [p["loss"]], yerr=yerr, color=c, ls="", capsize=3, zorder=2)
            ax.scatter([p["flops"]], [p["loss"]], marker=mk, color=c, s=40, zorder=3)
            if p["extra"]:
                total = p["flops"] + p["extra"]
                ax.scatter([total], [p["loss"]], marker=mk, facecolor="none", edgecolor=c, s=40, zorder=3)
                ax.plot([p["flops"], total], [p["loss"], p["loss"]], color=c, lw=0.6, alpha=0.5)
            ax.annotate(f"{r.schedule} r{r.replay_or_zero:g}", (p["flops"], p["loss"]), fontsize=7,
                        xytext=(4, 3 if r.schedule != "rewarm" else -9), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("final loss, mean of old + new sources")
        ax.set_title(f"shift to {sh}: loss vs compute", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], color=colors.get(m, "0.5"), marker="o", ls="", label=m) for m in used_models]
    handles += [
        Line2D([], [], color="0.3", marker="o", ls="", label="CPT inf, CPT FLOPs only"),
        Line2D([], [], color="0.3", marker="s", ls="", label="CPT rewarm, CPT FLOPs only"),
        Line2D([], [], color="0.3", marker="o", mfc="none", ls="", label="CPT + parent pre-training FLOPs"),
        Line2D([], [], color="0.3", marker="*", ms=11, mec="black", ls="", label="full re-training on the union"),
    ]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle("CPT vs full re-training: final loss against compute (mean over seeds, bars: min-max)", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_coactivation(results: StudyResults | Mapping, path: str | Path) -> Path | None:
    """Expert co-activation ``CA(i, j) = N(i and j chosen) / N(i chosen)`` (k > 1) on the old source's held-out
    tokens, before and after CPT, for the first and last MoE layer of each MoE model's CPT cell with the smallest
    replay (infinite schedule preferred), first seed (Thérien et al. 2025, Sec. 4, expert co-activation)."""
    results = as_results(results)
    comps = {k: v for k, v in comparisons(results).items() if v.coactivation_before_layers}
    if not comps:
        return None
    runs = results.runs
    rows = []
    for m in results.models:
        cell = _pick_cpt_cell(results, m, lambda k: k in comps)
        if cell:
            k = next(k for k in seed_groups(results, "cpt")[cell] if k in comps)
            rows.append((m, k))
    known = {m for m, _ in rows}
    for k in comps:  # runs of a model the results do not list
        m = runs[k].model  # comparisons() keeps entries of known runs only
        if m not in known and runs[k].kind == "cpt":
            known.add(m)
            rows.append((m, k))
    if not rows:
        return None
    fig, axes = _grid(len(rows), 4, w=3.2, h=3.0)
    for i, (m, k) in enumerate(rows):
        c = comps[k]
        layers = c.coactivation_before_layers
        picks = [0, len(layers) - 1] if len(layers) > 1 else [0]
        cols = [(f"layer {li}, {when}", getattr(c, f"coactivation_{when}_layers")[li])
                for li in picks for when in ("before", "after")]
        im = None
        for j in range(4):
            ax = axes[i][j]
            if j >= len(cols):
                ax.axis("off")
                continue
            title, mat = cols[j]
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{m} ({base_key(k).split('/')[-1]})\n{title}", fontsize=9)
            ax.set_xlabel("expert j")
            if j == 0:
                ax.set_ylabel("expert i")
        if im is not None:
            fig.colorbar(im, ax=list(axes[i]), shrink=0.8, label="CA(i, j)")
    fig.suptitle("Expert co-activation on the old source, before and after CPT (smallest replay, first seed)",
                 fontsize=12)
    return _save(fig, path)
