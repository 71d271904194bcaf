"""``moecpt schedule``: plot a recipe's LR schedule (lr vs step, phases shaded) to a PNG, PDF or SVG.

The figure carries :data:`SIGNATURE` in its metadata (PNG ``Software``, PDF ``Creator``, SVG ``dc:creator``, each
within the file's first 64 KiB), so that a later ``moecpt schedule --out`` replaces a figure moecpt wrote and
refuses any other file (the rule of :func:`moecpt.storage.outputs.check_file_output`; see :func:`_check_out`), and
``--out`` may not be the recipe it reads. The file is rendered in memory and written atomically (temp file +
rename): an interrupted run leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from moecpt._version import __version__
from moecpt.argtypes import positive_int
from moecpt.config import load_recipe
from moecpt.errors import MoecptError
from moecpt.storage.atomic import write_bytes_atomic
from moecpt.storage.outputs import check_file_output, os_error_line
from moecpt.train.schedules import anneal_start_step, run_end_step, schedule_phases, schedule_table

#: the bytes that identify a figure written by ``moecpt schedule`` (in its metadata); not merely the command's
#: name, which any note or shell script about moecpt may contain
SIGNATURE = b"moecpt-schedule-figure"


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


def _metadata(fmt: str) -> dict[str, str]:
    """Matplotlib ``savefig`` metadata naming moecpt (the key each format keeps near its start)."""
    value = f"{SIGNATURE.decode()}, moecpt {__version__}"
    return {"png": {"Software": value}, "pdf": {"Creator": value}, "svg": {"Creator": value}}[fmt]


def func(args: argparse.Namespace) -> int:
    """Run ``moecpt schedule``.

    Raises:
        MoecptError: ``--out`` has another extension, is a folder, is the recipe, is an existing file moecpt did
            not write (it is left alone), or cannot be written (read-only, permission denied, disk full); a bad
            recipe or ``--steps``.
    """
    fmt = Path(args.out).suffix.lower().lstrip(".")
    if fmt not in ("png", "pdf", "svg"):
        raise MoecptError(f"--out {args.out!r} must end in .png, .pdf or .svg")
    if Path(args.out).is_dir():
        raise MoecptError(f"--out {args.out!r} is a folder; give a file name such as schedule.png")
    out = Path(args.out).expanduser()
    check_file_output(out, SIGNATURE, [args.recipe])

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
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120, metadata=_metadata(fmt))
    plt.close(fig)
    data = buf.getvalue()
    try:
        write_bytes_atomic(out, data)
    except OSError as exc:
        raise MoecptError(os_error_line(exc, out)) from None

    anneal = anneal_start_step(recipe.schedule, total)
    summary = f"wrote {out}: {total} steps, lr[0]={lrs[0]:.4g}, max={lrs.max():.4g}, lr[-1]={lrs[-1]:.4g}"
    if anneal is not None:
        summary += f", anneal starts at step {anneal}"
    if end < total:
        summary += f", run stops at step {end}"
    print(summary)
    return 0
