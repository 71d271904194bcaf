"""``moecpt schedule``: plot a recipe's LR schedule (lr vs step, phases shaded) to a PNG."""

from __future__ import annotations

import argparse

from moecpt.cli import positive_int
from pathlib import Path

from moecpt.errors import MoecptError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "schedule",
        help="plot a recipe's learning-rate schedule",
        description="Draw the LR of every optimizer step of a recipe's schedule, with its phases marked.",
    )
    p.add_argument("--recipe", required=True, help="recipe TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set schedule.kind=cosine-inf (repeatable)")
    p.add_argument("--out", required=True, help="output image (PNG)")
    p.add_argument("--steps", type=positive_int, default=None, help="total steps (default: the recipe's train.steps)")
    p.set_defaults(func=func)


_PHASE_COLORS = {
    "warmup": "#f4d03f",
    "stable": "#aed6f1",
    "decay": "#f5b7b1",
    "cooldown": "#d7bde2",
    "constant": "#aed6f1",
    "anneal": "#f5b7b1",
}


def func(args: argparse.Namespace) -> int:
    from moecpt.config import load_recipe
    from moecpt.train.schedules import anneal_start_step, run_end_step, schedule_phases, schedule_table

    if Path(args.out).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise MoecptError(f"--out {args.out!r} must end in .png, .pdf or .svg")
    if Path(args.out).is_dir():
        raise MoecptError(f"--out {args.out!r} is a folder; give a file name such as schedule.png")

    recipe = load_recipe(args.recipe, args.overrides)
    total = args.steps if args.steps is not None else recipe.train.steps
    if total < 1:
        raise MoecptError(f"--steps {total}: give a positive number of steps")
    lrs = schedule_table(recipe.schedule, recipe.optim, total)
    phases = schedule_phases(recipe.schedule, total)
    end = run_end_step(recipe.schedule, total)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for ph in phases:
        ax.axvspan(ph.start, ph.end, alpha=0.35,
                   color=_PHASE_COLORS.get(ph.name, "#dddddd"), lw=0, label=f"{ph.name} [{ph.start}, {ph.end})")
    ax.plot(range(total), lrs, color="black", lw=1.5)
    if end < total:
        ax.axvline(end, color="red", ls="--", lw=1, label=f"run ends (stop_before_anneal) at {end}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{recipe.name}: {recipe.schedule.kind.value}, peak {recipe.optim.lr:g}, min {recipe.optim.min_lr:g}")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)

    anneal = anneal_start_step(recipe.schedule, total)
    summary = f"wrote {out}: {total} steps, lr[0]={lrs[0]:.4g}, max={lrs.max():.4g}, lr[-1]={lrs[-1]:.4g}"
    if anneal is not None:
        summary += f", anneal starts at step {anneal}"
    if end < total:
        summary += f", run stops at step {end}"
    print(summary)
    return 0
