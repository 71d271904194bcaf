"""``moecpt lopt meta-train``, ``moecpt lopt bench`` and ``moecpt lopt tasks``."""

from __future__ import annotations

import argparse
import json
import math

import torch

from moecpt.errors import MoecptError
from moecpt.lopt.bench import BenchConfig, format_table
from moecpt.lopt.bench import run_bench as _run
from moecpt.lopt.meta_train import MetaTrainConfig, meta_train
from moecpt.lopt.tasks import BENCH_TASKS, META_TRAIN_TASKS, TASKS


def register(subparsers: argparse._SubParsersAction) -> None:
    lopt = subparsers.add_parser("lopt", help="learned outer optimizers for local SGD (LAgg-A, LOpt-A)")
    sub = lopt.add_subparsers(dest="lopt_command", metavar="LOPT_COMMAND")
    lopt.set_defaults(func=lambda args: (lopt.print_help(), 2)[1])

    p = sub.add_parser("meta-train", help="meta-train a learned optimizer with truncated PES (resumable)")
    p.add_argument("--task", default=",".join(META_TRAIN_TASKS),
                   help="task name, or several separated by commas (a distribution; the pairs are dealt out "
                        "among them); default: the meta-training set of `moecpt lopt tasks`")
    p.add_argument("--out", required=True, help="run folder (re-running the same command resumes)")
    p.add_argument("--kind", default="lagg-a", choices=["lagg-a", "lopt-a", "lagg", "lopt"])
    p.add_argument("--workers", type=int, default=8, help="K, workers per round (default 8)")
    p.add_argument("--local-steps", type=int, default=4, help="H, local SGD steps per round (default 4)")
    p.add_argument("--iterations", type=int, default=200, help="meta-iterations (paper: 5k-10k; default 200)")
    p.add_argument("--pairs", type=int, default=8, help="antithetic pairs per meta-iteration (default 8)")
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--truncation", type=int, default=50, help="rounds unrolled per meta-iteration (default 50)")
    p.add_argument("--min-length", type=int, default=100)
    p.add_argument("--max-length", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3, help="peak meta learning rate (AdamW)")
    p.add_argument("--final-lr", type=float, default=1e-3)
    p.add_argument("--init", default="sgd-like", choices=["sgd-like", "paper"])
    p.add_argument("--step-scale", default="delta-rms", choices=["delta-rms", "fixed"],
                   help="delta-rms (default): the step in units of the mean delta's per-tensor RMS, so it shrinks "
                        "with the workers' LR; fixed: the paper's 0.001 * d * exp(0.001 m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these are many small kernels; more threads rarely help and "
                        "slow down badly on a busy machine)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (saved, resumable) after this long")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_meta_train)

    p = sub.add_parser("bench", help="LAgg-A / LOpt-A against local SGD, SlowMo, DiLoCo, Adam, SGD on held-out tasks")
    p.add_argument("--quick", action="store_true", help="a couple of minutes: fewer rounds and seeds")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.md and the loss-curve PNG")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the held-out set)")
    p.add_argument("--local-steps", default=None, help="comma-separated H values (default 4,8,16)")
    p.add_argument("--rounds", type=int, default=None, help="communication rounds (default 60; quick 20)")
    p.add_argument("--methods", default=None, help="comma-separated subset of: lagg-a, lopt-a, local-sgd, slowmo, "
                                                     "diloco-adamw, diloco-sgd, adam, sgd (default: all)")
    p.add_argument("--inner-schedule", default="constant", choices=["constant", "cosine"],
                   help="the workers' LR over the rounds: constant, or cosine to 1e-3 of the peak (a decaying "
                        "recipe's late phase; the rows then report the outer step against the deltas)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 5; quick 2)")
    p.add_argument("--lagg", default="lagg-a", help="LAgg-A weights: shipped name or .safetensors path")
    p.add_argument("--lopt", default="lopt-a", help="LOpt-A weights: shipped name or .safetensors path")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see meta-train --help)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_bench)

    p = sub.add_parser("tasks", help="list the tasks")
    p.set_defaults(func=run_tasks)


def _threads(n: int | None) -> None:
    """Set torch's CPU threads; ``--threads`` below 1 is a user error (not "use the default")."""
    if n is None:
        return
    if n < 1:
        raise MoecptError(f"--threads {n} must be a whole number >= 1")

    torch.set_num_threads(n)


def _max_seconds(minutes: float | None) -> float | None:
    """``--max-minutes`` in seconds; it must be a finite number > 0 (0 would otherwise mean "no limit")."""
    if minutes is None:
        return None
    if not math.isfinite(minutes) or minutes <= 0:
        raise MoecptError(f"--max-minutes {minutes!r} must be a finite number > 0; leave it out for no limit")
    return minutes * 60


def run_meta_train(args: argparse.Namespace) -> int:
    max_s = _max_seconds(args.max_minutes)
    cfg = MetaTrainConfig(
        kind=args.kind, workers=args.workers, tasks=tuple(t.strip() for t in args.task.split(",") if t.strip()),
        iterations=args.iterations, pairs=args.pairs, sigma=args.sigma, truncation=args.truncation,
        min_length=args.min_length, max_length=args.max_length, local_steps=args.local_steps, lr=args.lr,
        final_lr=args.final_lr, init=args.init, step_scale=args.step_scale, seed=args.seed,
        eval_every=args.eval_every,
    )
    cfg.validate()  # before the threads are set and before anything is written
    _threads(args.threads)
    print(json.dumps(meta_train(cfg, args.out, progress=not args.no_progress, max_seconds=max_s)))
    return 0


def run_bench(args: argparse.Namespace) -> int:
    cfg = BenchConfig.make(quick=args.quick, tasks=args.tasks, local_steps=args.local_steps, rounds=args.rounds,
                           seeds=args.seeds, lagg=args.lagg, lopt=args.lopt, methods=args.methods,
                           inner_schedule=args.inner_schedule)
    _threads(args.threads)
    rows, _ = _run(cfg, out=args.out, progress=not args.no_progress)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    for name in TASKS:
        tag = " (meta-training set)" if name in META_TRAIN_TASKS else (
            " (benchmark, held out)" if name in BENCH_TASKS else "")
        print(f"{name}{tag}")
    return 0
