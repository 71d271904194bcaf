"""The study's figures, after Thérien et al., "Continual Pre-training of MoEs: How robust is your router?"
(arXiv 2503.05029, TMLR 2025) and Ibrahim et al. (arXiv 2403.08763, TMLR 2024).

Every function takes the study's ``results`` dict (schema in :mod:`moecpt.analysis.report`) and a path, writes one
PNG there (matplotlib, Agg backend, so it works without a display) and returns the path, or returns ``None`` without
writing when the results hold no data for that figure (a dense-only study has no MRI plot, a recipe without
re-training runs still gets a compute plot of its CPT runs, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from moecpt.analysis.findings import (  # noqa: E402
    _num, _replay, _runs, _models, comparisons, final_loss, is_moe_model, mean_final_loss, mean_forgetting,
    sorted_run_keys, _parent_flops_used,
)

__all__ = ["plot_coactivation", "plot_val_loss", "plot_mri_shift", "plot_crs_layers", "plot_forgetting_vs_replay", "plot_moe_vs_dense",
           "plot_compute", "DPI"]

DPI = 110
_CMAP = plt.get_cmap("tab10")


def _run_label(run: Mapping) -> str:
    kind = run.get("kind")
    if kind == "cpt":
        return f"CPT {run.get('shift')} {run.get('schedule')} replay {_replay(run):g}"
    if kind == "retrain":
        return f"retrain (union with {run.get('shift')})"
    return str(kind)


def _curve(run: Mapping, source: str, offset: float = 0.0) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for e in (run.get("val") or {}).get(source) or []:
        try:
            t, loss = _num(e[1]), _num(e[2])
        except (IndexError, TypeError):
            continue
        if t is None or loss is None:
            continue
        xs.append(offset + t)
        ys.append(loss)
    return xs, ys


def _sources(results: Mapping) -> list[str]:
    srcs = list(results.get("old_sources") or []) + list(results.get("shifts") or [])
    for r in _runs(results).values():
        for s in (r.get("val") or {}):
            if s not in srcs:
                srcs.append(s)
    return list(dict.fromkeys(srcs))


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


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
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, **kw)
    return fig, axes


def _tokens_axis(ax) -> None:
    ax.set_xlabel("tokens seen")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _style_for(run: Mapping, styles: dict) -> dict:
    """A colour per (kind, shift, schedule, replay), consistent across panels; pretrain black, retrain grey."""
    kind = run.get("kind")
    if kind == "pretrain":
        return {"color": "black", "lw": 1.6}
    if kind == "retrain":
        return {"color": "0.45", "lw": 1.3, "ls": ":"}
    key = (run.get("shift"), run.get("schedule"), _replay(run))
    if key not in styles:
        styles[key] = {"color": _CMAP(len(styles) % 10), "lw": 1.3,
                       "ls": "-" if run.get("schedule") != "rewarm" else "--"}
    return styles[key]


def plot_val_loss(results: Mapping, path: str | Path) -> Path | None:
    """Validation loss per source across the shift, for every run (the loss-curve figures of both papers).

    Grid: one row per model, one column per data source (old sources, then the shifts). x = tokens seen:
    pre-training from 0, each CPT run continuing from its ``start_tokens`` (the branch point), re-training from 0.
    A dashed vertical line marks each branch point (the distribution shift). One line per run.
    """
    runs = _runs(results)
    models = [m for m in _models(results) if any(r.get("model") == m and r.get("val") for r in runs.values())]
    models += sorted({r.get("model") for r in runs.values() if r.get("val")} - set(models), key=str)
    sources = _sources(results)
    if not models or not sources:
        return None
    fig, axes = _grid(len(models), len(sources))
    styles: dict = {}
    for i, m in enumerate(models):
        keys = [k for k in sorted_run_keys(results) if runs[k].get("model") == m]
        for j, s in enumerate(sources):
            ax = axes[i][j]
            shifts_at = set()
            for k in keys:
                r = runs[k]
                off = (_num(r.get("start_tokens")) or 0.0) if r.get("kind") == "cpt" else 0.0
                xs, ys = _curve(r, s, off)
                if xs:
                    ax.plot(xs, ys, label=_run_label(r), **_style_for(r, styles))
                if r.get("kind") == "cpt" and off:
                    shifts_at.add(off)
            for x in sorted(shifts_at):
                ax.axvline(x, color="0.3", ls="--", lw=0.8, label="shift (CPT start)")
            ax.set_title(f"{m}: {s}", fontsize=10)
            _tokens_axis(ax)
            ax.set_ylabel("validation loss (nats)")
            ax.grid(alpha=0.3)
    fig.suptitle("Validation loss across the distribution shift", fontsize=12)
    fig.tight_layout()
    _fig_legend(fig, axes.ravel())
    return _save(fig, path)


def _mri_rows(run: Mapping, upto: Any = None) -> list[tuple[float, list[float], float]]:
    cut = _num(upto)
    out = []
    for e in run.get("train_mri") or []:
        try:
            step, mean, layers = _num(e[0]), _num(e[1]), list(e[2] or [])
        except (IndexError, TypeError):
            continue
        if step is None or (cut is not None and step > cut):
            continue
        out.append((step, [_num(v) for v in layers], mean))
    out.sort(key=lambda t: t[0])
    return out


def _pick_cpt(results: Mapping, model: str) -> str | None:
    """Replay 0 + inf schedule if present, else the first CPT run of the model (reading order)."""
    runs = _runs(results)
    keys = [k for k in sorted_run_keys(results, "cpt") if runs[k].get("model") == model and runs[k].get("train_mri")]
    for k in keys:
        if _replay(runs[k]) == 0.0 and runs[k].get("schedule") == "inf":
            return k
    return keys[0] if keys else None


def _balanced_level(results: Mapping, model: str) -> float | None:
    info = _models(results).get(model, {})
    k, e = _num(info.get("top_k")), _num(info.get("num_experts"))
    return k / e if k and e else None


def plot_mri_shift(results: Mapping, path: str | Path, pre_fraction: float = 0.25) -> Path | None:
    """Per-layer Maximum Routing Imbalance over training steps around the shift, one panel per MoE model.

    The spike-and-recovery picture of Thérien et al. 2025 (finding F2): the last ``pre_fraction`` of pre-training
    before the branch point, then the CPT run (replay 0 with the infinite schedule if present, else the model's
    first CPT run), one line per MoE layer and a thick black line for the layer mean. x = global step (pre-training
    step, CPT steps continuing from the branch step); the vertical dashed line is the shift. A dotted horizontal line
    marks perfect balance k/E when the model entry gives ``top_k`` and ``num_experts`` (not in the base schema).
    """
    runs = _runs(results)
    picks = [(m, _pick_cpt(results, m)) for m in _models(results) if is_moe_model(results, m)]
    picks = [(m, k) for m, k in picks if k]
    if not picks:
        return None
    fig, axes = _grid(1, len(picks), w=5.2, h=3.6, sharey=True)  # one y scale: spikes compare across routers
    for ax, (m, k) in zip(axes[0], picks):
        r = runs[k]
        parent = runs.get(r.get("parent") or "")
        pre = _mri_rows(parent, r.get("parent_step")) if parent else []
        if pre:
            pre = pre[-max(1, int(math.ceil(pre_fraction * len(pre)))):]
        base = _num(r.get("parent_step"))
        if base is None:
            base = pre[-1][0] if pre else 0.0
        rows = _mri_rows(r)
        # CPT resets the step counter (GUIDE: CPT is an explicit mode); a log that kept the global count is used as is
        off = 0.0 if rows and base > 0 and rows[0][0] >= base else base
        cpt = [(off + s, layers, mean) for s, layers, mean in rows]
        series = pre + cpt
        n_layers = max((len(t[1]) for t in series), default=0)
        cmap = plt.get_cmap("viridis")
        for li in range(n_layers):
            xs = [t[0] for t in series if li < len(t[1]) and t[1][li] is not None]
            ys = [t[1][li] for t in series if li < len(t[1]) and t[1][li] is not None]
            ax.plot(xs, ys, color=cmap(li / max(1, n_layers - 1)), lw=0.9, alpha=0.8, label=f"MoE layer {li}")
        xs = [t[0] for t in series if t[2] is not None]
        ax.plot(xs, [t[2] for t in series if t[2] is not None], color="black", lw=1.8, label="layer mean")
        ax.axvline(base, color="red", ls="--", lw=1.0, label="shift (CPT start)")
        lvl = _balanced_level(results, m)
        if lvl is not None:
            ax.axhline(lvl, color="0.4", ls=":", lw=1.0, label="balanced k/E")
        router = _models(results)[m].get("router")
        ax.set_title(f"{m} ({router}): {_run_label(r)}", fontsize=9)
        ax.set_xlabel("training step (pre-training, then CPT)")
        ax.set_ylabel("train MRI (max expert share)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=1 if n_layers <= 6 else 2)
    fig.suptitle("Maximum routing imbalance around the shift (spike and recovery)", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_crs_layers(results: Mapping, path: str | Path) -> Path | None:
    """Continual Router Saturation (and Vocabulary Specialization when present) per MoE layer, as grouped bars,
    one bar per CPT run, one row per MoE model (Thérien et al. 2025, finding F5).

    CRS is the mean share of a token's top-k experts kept between the CPT start checkpoint and the CPT result on the
    old source's held-out tokens: 1 = unchanged routing; the dotted line is the chance overlap k/E.
    """
    runs = _runs(results)
    comps = {k: v for k, v in comparisons(results).items() if v.get("crs_layers")}
    if not comps:
        return None
    order = [k for k in sorted_run_keys(results, "cpt") if k in comps]
    models = list(dict.fromkeys(runs.get(k, {}).get("model", "?") for k in order))
    has_cvs = any(comps[k].get("cvs_layers") for k in order)
    metrics = [("crs_layers", "CRS (top-k overlap)")] + ([("cvs_layers", "CVS (vocab. specialization)")]
                                                         if has_cvs else [])
    fig, axes = _grid(len(models), len(metrics), w=6.0, h=3.4)
    for i, m in enumerate(models):
        keys = [k for k in order if runs.get(k, {}).get("model", "?") == m]
        for j, (field, name) in enumerate(metrics):
            ax = axes[i][j]
            width = 0.8 / max(1, len(keys))
            for n, k in enumerate(keys):
                vals = [_num(v) or 0.0 for v in comps[k].get(field) or []]
                xs = [li - 0.4 + width * (n + 0.5) for li in range(len(vals))]
                label = _run_label(runs[k]) if k in runs else k
                ax.bar(xs, vals, width=width, color=_CMAP(n % 10), label=label)
            chance = _num(comps[keys[0]].get("chance_overlap")) if keys else None
            if chance is not None and field == "crs_layers":
                ax.axhline(chance, color="0.3", ls=":", lw=1.0, label="chance overlap k/E")
            n_layers = max((len(comps[k].get(field) or []) for k in keys), default=0)
            ax.set_xticks(range(n_layers))
            ax.set_xlabel("MoE layer")
            ax.set_ylabel(name)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{m}: {name}", fontsize=10)
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Routing kept from the CPT start on the old source, per MoE layer", fontsize=12)
    fig.tight_layout()
    _fig_legend(fig, axes.ravel())
    return _save(fig, path)


def plot_forgetting_vs_replay(results: Mapping, path: str | Path) -> Path | None:
    """Forgetting of the old sources (left) and the new source's final loss (right) against the replay fraction,
    one line per (model, schedule) and one row per shift (Ibrahim et al. 2024; Thérien et al. 2025, finding F3).

    Forgetting is the mean rise of the old sources' validation loss from the CPT start checkpoint to the CPT result.
    """
    runs = _runs(results)
    keys = sorted_run_keys(results, "cpt")
    shifts = list(dict.fromkeys(runs[k].get("shift") for k in keys))
    lines: dict[tuple, list[tuple[float, float | None, float | None]]] = {}
    for k in keys:
        r = runs[k]
        f = mean_forgetting(results, k)
        a = final_loss(r, r.get("shift")) if r.get("shift") else None
        if f is None and a is None:
            continue
        lines.setdefault((r.get("shift"), r.get("model"), r.get("schedule")), []).append((_replay(r), f, a))
    if not lines:
        return None
    fig, axes = _grid(len(shifts), 2, w=5.0, h=3.5)
    colors = {m: _CMAP(i % 10) for i, m in enumerate(_models(results))}
    for i, sh in enumerate(shifts):
        for (s, m, sched), pts in lines.items():
            if s != sh:
                continue
            pts.sort()
            style = {"color": colors.get(m, "0.5"), "marker": "s" if sched == "rewarm" else "o",
                     "ls": "--" if sched == "rewarm" else "-"}
            for j, idx in ((0, 1), (1, 2)):
                xy = [(p[0], p[idx]) for p in pts if p[idx] is not None]
                if xy:
                    axes[i][j].plot([x for x, _ in xy], [y for _, y in xy], label=f"{m}, {sched}", **style)
        axes[i][0].set_title(f"shift to {sh}: forgetting (old sources)", fontsize=10)
        axes[i][0].set_ylabel("loss rise on old sources (nats)")
        axes[i][0].axhline(0.0, color="0.5", lw=0.7)
        axes[i][1].set_title(f"shift to {sh}: final loss on {sh}", fontsize=10)
        axes[i][1].set_ylabel(f"final {sh} loss (nats)")
        for ax in axes[i]:
            ax.set_xlabel("replay fraction of the CPT budget")
            ax.grid(alpha=0.3)
    fig.suptitle("Replay: less forgetting, slightly slower adaptation", fontsize=12)
    fig.tight_layout()
    _fig_legend(fig, axes.ravel())
    return _save(fig, path)


def plot_moe_vs_dense(results: Mapping, path: str | Path) -> Path | None:
    """Validation loss against tokens seen on each old and new source, dense vs MoE models, for one CPT variant
    (largest replay with the infinite schedule if present): finding F1 of Thérien et al. 2025. The thin faded part
    of each line is the model's pre-training up to the branch point; the solid part is CPT.
    """
    runs = _runs(results)
    dense = [m for m in _models(results) if is_moe_model(results, m) is False]
    moes = [m for m in _models(results) if is_moe_model(results, m)]
    cpt = sorted_run_keys(results, "cpt")
    dense_variants = {(runs[k].get("shift"), runs[k].get("schedule"), _replay(runs[k]))
                      for k in cpt if runs[k].get("model") in dense}
    moe_variants = {(runs[k].get("shift"), runs[k].get("schedule"), _replay(runs[k]))
                    for k in cpt if runs[k].get("model") in moes}
    common = dense_variants & moe_variants
    if not common:
        return None
    shifts = list(dict.fromkeys(v[0] for v in sorted(common, key=str)))
    chosen = {}
    for sh in shifts:
        vs = [v for v in common if v[0] == sh]
        inf = [v for v in vs if v[1] == "inf"]
        chosen[sh] = max(inf or vs, key=lambda v: (v[2], str(v[1])))
    srcs_by_shift = {sh: list(results.get("old_sources") or []) + [sh] for sh in shifts}
    ncols = max(len(v) for v in srcs_by_shift.values())
    fig, axes = _grid(len(shifts), ncols, w=4.8, h=3.4)
    colors = {m: _CMAP(i % 10) for i, m in enumerate(dense + moes)}
    for i, sh in enumerate(shifts):
        v = chosen[sh]
        keys = [k for k in cpt if (runs[k].get("shift"), runs[k].get("schedule"), _replay(runs[k])) == v]
        for j, s in enumerate(srcs_by_shift[sh]):
            ax = axes[i][j]
            for k in keys:
                r = runs[k]
                m = r.get("model")
                off = _num(r.get("start_tokens")) or 0.0
                parent = runs.get(r.get("parent") or "")
                if parent:
                    xs, ys = _curve(parent, s)
                    xy = [(x, y) for x, y in zip(xs, ys) if x <= off]
                    ax.plot([x for x, _ in xy], [y for _, y in xy], color=colors[m], lw=0.8, alpha=0.4)
                xs, ys = _curve(r, s, off)
                label = f"{m} ({'dense' if m in dense else 'MoE'})"
                ax.plot(xs, ys, color=colors[m], lw=1.6, ls="--" if m in dense else "-", label=label)
                if off:
                    ax.axvline(off, color="0.5", ls="--", lw=0.7)
            kind = "old" if s in (results.get("old_sources") or []) else "new"
            ax.set_title(f"{s} ({kind}); CPT {v[1]}, replay {v[2]:g}", fontsize=10)
            _tokens_axis(ax)
            ax.set_ylabel("validation loss (nats)")
            ax.grid(alpha=0.3)
        for j in range(len(srcs_by_shift[sh]), ncols):
            axes[i][j].axis("off")
    fig.suptitle("MoE vs FLOP-matched dense through CPT", fontsize=12)
    fig.tight_layout()
    _fig_legend(fig, axes.ravel())
    return _save(fig, path)


def plot_compute(results: Mapping, path: str | Path) -> Path | None:
    """Final mean loss (old + new sources) against training FLOPs, one panel per shift (finding F4).

    CPT runs appear twice: a filled circle at the CPT run's own FLOPs, a hollow circle at CPT + the parent's
    pre-training FLOPs up to the branch point, joined by a thin line; re-training runs on the union are stars.
    Log-scaled x.
    """
    runs = _runs(results)
    pts: dict[str, list[dict]] = {}
    for k in sorted_run_keys(results):
        r = runs[k]
        if r.get("kind") not in ("cpt", "retrain"):
            continue
        loss, flops = mean_final_loss(results, r), _num(r.get("train_flops"))
        if loss is None or not flops:
            continue
        extra = _parent_flops_used(results, r) if r.get("kind") == "cpt" else None
        pts.setdefault(r.get("shift"), []).append({"run": r, "loss": loss, "flops": flops, "extra": extra})
    if not pts:
        return None
    shifts = list(pts)
    fig, axes = _grid(1, len(shifts), w=7.0, h=4.6)
    colors = {m: _CMAP(i % 10) for i, m in enumerate(_models(results))}
    used_models: list[str] = []
    for ax, sh in zip(axes[0], shifts):
        for p in pts[sh]:
            r = p["run"]
            m = r.get("model")
            if m not in used_models:
                used_models.append(m)
            c = colors.get(m, "0.5")
            if r.get("kind") == "retrain":
                ax.scatter([p["flops"]], [p["loss"]], marker="*", s=160, color=c, edgecolor="black", zorder=3)
                continue
            mk = "o" if r.get("schedule") != "rewarm" else "s"
            ax.scatter([p["flops"]], [p["loss"]], marker=mk, color=c, s=40, zorder=3)
            if p["extra"]:
                total = p["flops"] + p["extra"]
                ax.scatter([total], [p["loss"]], marker=mk, facecolor="none", edgecolor=c, s=40, zorder=3)
                ax.plot([p["flops"], total], [p["loss"], p["loss"]], color=c, lw=0.6, alpha=0.5)
            ax.annotate(f"{r.get('schedule')} r{_replay(r):g}", (p["flops"], p["loss"]), fontsize=7,
                        xytext=(4, 3 if r.get("schedule") != "rewarm" else -9), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("final loss, mean of old + new sources")
        ax.set_title(f"shift to {sh}: loss vs compute", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors.get(m, "0.5"), marker="o", ls="", label=m) for m in used_models]
    handles += [
        Line2D([], [], color="0.3", marker="o", ls="", label="CPT inf, CPT FLOPs only"),
        Line2D([], [], color="0.3", marker="s", ls="", label="CPT rewarm, CPT FLOPs only"),
        Line2D([], [], color="0.3", marker="o", mfc="none", ls="", label="CPT + parent pre-training FLOPs"),
        Line2D([], [], color="0.3", marker="*", ms=11, mec="black", ls="", label="full re-training on the union"),
    ]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle("CPT vs full re-training: final loss against compute", fontsize=12)
    fig.tight_layout()
    return _save(fig, path)


def plot_coactivation(results: Mapping, path: str | Path) -> Path | None:
    """Expert co-activation ``CA(i, j) = N(i and j chosen) / N(i chosen)`` (k > 1) on the old source's held-out
    tokens, before and after CPT, for the first and last MoE layer of each MoE model's replay-0 CPT run (infinite
    schedule when present) (Thérien et al. 2025, Sec. 4, expert co-activation)."""
    comps = {k: v for k, v in comparisons(results).items() if v.get("coactivation_before_layers")}
    if not comps:
        return None
    runs = _runs(results)
    chosen: dict[str, str] = {}
    for k in sorted_run_keys(results, "cpt"):
        if k not in comps:
            continue
        r = runs.get(k, {})
        m = r.get("model", "?")
        score = (_replay(r) != 0, r.get("schedule") != "inf")  # prefer replay 0, then the infinite schedule
        if m not in chosen or score < chosen[m][1]:
            chosen[m] = (k, score)
    rows = [(m, k) for m, (k, _) in chosen.items()]
    fig, axes = _grid(len(rows), 4, w=3.2, h=3.0)
    for i, (m, k) in enumerate(rows):
        c = comps[k]
        layers = c["coactivation_before_layers"]
        picks = [0, len(layers) - 1] if len(layers) > 1 else [0]
        cols = [(f"layer {li}, {when}", c[f"coactivation_{when}_layers"][li])
                for li in picks for when in ("before", "after")]
        for j in range(4):
            ax = axes[i][j]
            if j >= len(cols):
                ax.axis("off")
                continue
            title, mat = cols[j]
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{m}\n{title}", fontsize=9)
            ax.set_xlabel("expert j")
            if j == 0:
                ax.set_ylabel("expert i")
        fig.colorbar(im, ax=list(axes[i]), shrink=0.8, label="CA(i, j)")
    fig.suptitle("Expert co-activation on the old source, before and after CPT (replay 0)", fontsize=12)
    return _save(fig, path)
