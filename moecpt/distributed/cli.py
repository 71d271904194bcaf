"""``moecpt pretrain`` and ``moecpt cpt``: one training run, as a single process, ``K`` simulated workers
(``--simulate-workers K``) or one rank of a ``torchrun`` job.

They live here, above :mod:`moecpt.train`, because they launch: they join the job's process group
(:func:`moecpt.distributed.launch.session`) and hand the trainer its runtime
(:class:`moecpt.distributed.runtime.Distributed`); the trainer itself never imports this package
(docs/design.md, rule A2).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moecpt.argtypes import positive_int
from moecpt.config import SyncKind, load_recipe
from moecpt.distributed.launch import session
from moecpt.distributed.runtime import Distributed, check_launch
from moecpt.errors import MoecptError
from moecpt.train.callbacks import ProgressKind
from moecpt.train.trainer import Trainer


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe TOML (bundled ones: recipes/*.toml)")
    p.add_argument("--out", required=True, help="run folder (created; re-running the same command resumes)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key, validated like the file (repeatable)")
    p.add_argument("--progress", choices=[k.value for k in ProgressKind], default="auto",
                   help="auto (default): a bar on a terminal, one plain line every few steps otherwise (SLURM, "
                        "nohup); bar; lines; none")
    p.add_argument("--no-progress", action="store_true", help="same as --progress none")
    p.add_argument("--simulate-workers", type=positive_int, default=None, metavar="K",
                   help="run K data-parallel workers in this one process, with the updates of a K-process run "
                        "(docs/distributed.md); for several processes use torchrun --nproc-per-node K -m moecpt ...")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe, data and --out, print the plan (parameters, memory, steps, tokens, a "
                        "time estimate from a few timed steps) as JSON and exit; --out is not created or claimed")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="pre-train a model from scratch (resumes an interrupted run)")
    _add_run_args(p)
    p.set_defaults(func=run_pretrain)

    p = subparsers.add_parser("cpt", help="continually pre-train from a checkpoint onto a new data mixture")
    _add_run_args(p)
    p.add_argument("--from", dest="parent", required=True, help="parent checkpoint folder or run folder")
    p.set_defaults(func=run_cpt)


def check_diloco_rounds(recipe) -> None:
    """Refuse ``distributed.sync = "diloco"`` whose ``distributed.local_steps`` (H) was left unset.

    H's default, 1, is right for ``ddp`` / ``fsdp`` (they synchronise every step), but makes DiLoCo an outer
    Nesterov step after every inner AdamW step, which is not the algorithm of Douillard et al. 2023 (arXiv
    2311.08105, H = 500). An explicit ``local_steps = 1`` is accepted, as an ablation (docs/distributed.md).

    Raises:
        MoecptError: DiLoCo with ``local_steps`` unset, naming the ``--set`` that fixes it.
    """
    d, t = recipe.distributed, recipe.train
    if d.sync == SyncKind.DILOCO and "local_steps" not in d.model_fields_set:
        h = suggested_local_steps(t.eval_every, t.checkpoint_every)
        raise MoecptError("distributed.sync = 'diloco' needs distributed.local_steps (H, inner steps per round; "
                          "unset it is 1, an outer step after every inner step, which is not DiLoCo): add e.g. "
                          f"--set distributed.local_steps={h}, a divisor of train.eval_every={t.eval_every} and "
                          f"train.checkpoint_every={t.checkpoint_every}, so that evaluations and checkpoints fall on "
                          "round boundaries")


def suggested_local_steps(eval_every: int, checkpoint_every: int, most: int = 64) -> int:
    """The largest H <= ``most`` that divides both intervals (steps), so that every evaluation and checkpoint falls
    on a round boundary; 1 only when they share no other divisor."""
    g = math.gcd(eval_every, checkpoint_every)
    return max(h for h in range(1, min(g, most) + 1) if g % h == 0)


def _train(args: argparse.Namespace, parent) -> int:
    # Validate what needs no torch before importing it: a bad recipe or --from fails in a fraction of a second.
    recipe = load_recipe(args.recipe, args.set)
    check_diloco_rounds(recipe)
    if parent is not None and not Path(parent).exists():
        raise MoecptError(f"--from {str(parent)!r} does not exist; give a checkpoint or run folder")

    # under torchrun (WORLD_SIZE > 1) the session joins the job; otherwise it does nothing
    with session(recipe.distributed, recipe.train.device) as info:
        check_launch(recipe, info, args.simulate_workers)  # a layout that cannot run is refused before --out exists
        progress = ProgressKind.NONE if args.no_progress else ProgressKind(args.progress)
        trainer = Trainer(recipe, args.out, parent=parent, show_progress=progress,
                          simulate_workers=args.simulate_workers, parallel=Distributed(), dry_run=args.dry_run)
        summary = trainer.plan() if args.dry_run else trainer.run()
    if info.is_main:
        print(json.dumps(summary))
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    return _train(args, None)


def run_cpt(args: argparse.Namespace) -> int:
    return _train(args, args.parent)
