"""Benchmark of the learned outer optimizers on tasks held out from meta-training (``moecpt lopt bench``).

Setting (Joseph et al., arXiv 2312.02204, Sec. 5): K = 8 workers, H ∈ {4, 8, 16} local steps per round, the same
number of communication rounds R for every method, 5 seeds. Methods:

* ``lagg-a``, ``lopt-a``: the learned optimizers (shipped weights by default), SGD workers (what they were
  meta-trained with).
* ``local-sgd``: ``θ ← θ + mean Δ``, SGD workers.
* ``slowmo``: SlowMo (Wang et al., ICLR 2020) with SGD workers; its grid includes ``β = 0, α = 1`` (local SGD).
* ``diloco-adamw``: DiLoCo as published (Douillard et al., arXiv 2311.08105): AdamW workers (each keeps its state
  across rounds, :mod:`moecpt.lopt.inner`), outer SGD with Nesterov momentum.
* ``diloco-sgd``: the same outer step with plain-SGD workers (what this benchmark called "DiLoCo" before).
* ``adam``, ``sgd``: data-parallel, one step per round on the union of the K·H mini-batches that the workers would
  have used (the same number of samples per round).

Tuning (:func:`grids`, :mod:`moecpt.lopt.tuning`). Every method's inner LR is tuned on the same ladder, ``{0.25,
0.5, 1, 2, 4} ×`` a base (the task's SGD LR for SGD workers, ``1e-2`` for AdamW workers), with the same budget
(R rounds, one tuning seed), as are the outer LR and momentum where a method has them. Every grid point is run on
the task's :meth:`~moecpt.lopt.tasks.Task.tuning_task` (the train split minus a validation split) with seed 1000,
and scored by the global model's loss on that validation split after round R, never by the training loss of the
reported seeds. If the best point sits on an open end of an axis, that axis is extended by one more value and the
new points are run, until the best point is inside the grid or :attr:`BenchConfig.widen_cap` widening rounds
are spent (the row then says ``cap_hit``). The chosen setting is run on the full train split with the evaluation
seeds 0..S−1, which is what the table reports. Every method of a seed starts from the same initial model.
``final train loss`` is the loss of the global model on the whole train split (64 fixed windows for the LMs) after
the last round; ``held-out loss`` on the held-out split (never used for tuning).

``--quick`` uses R = 20, 2 seeds and narrower starting grids (3 inner LRs; widening capped at 1 round), for a
fast check (wall time: ``benchmarks/README.md``). ``--inner-schedule cosine`` decays every method's inner LR over
the rounds (cosine from 1 to :data:`COSINE_FINAL` of the peak), the late-training regime of a decaying recipe; the
rows then also report how large the outer step is against the mean delta over the last tenth of the rounds. With
``--out`` every finished (task, H, method) is cached in ``bench_cache.json`` (keyed by the settings and the
learned optimizers' weight hashes), so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from moecpt.errors import MoecptError
from moecpt.lopt.baselines import nesterov_update, slowmo_update
from moecpt.lopt.inner import init_adamw_state, local_round_adamw
from moecpt.lopt.optimizers import LearnedOuterOptimizer, init_lopt_state, lopt_step
from moecpt.lopt.pretrained import load_pretrained
from moecpt.lopt.tasks import BENCH_TASKS, TASKS, Task, get_task, local_round
from moecpt.lopt.tuning import Axis, AxisKind, Grid, describe, search
from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic
from moecpt.storage.lock import FolderLock
from moecpt.storage.outputs import claim_folder

METHODS = ("lagg-a", "lopt-a", "local-sgd", "slowmo", "diloco-adamw", "diloco-sgd", "adam", "sgd")
LABELS = {"lagg-a": "LAgg-A", "lopt-a": "LOpt-A", "local-sgd": "local SGD", "slowmo": "SlowMo",
          "diloco-adamw": "DiLoCo (AdamW workers)", "diloco-sgd": "DiLoCo (SGD workers)", "adam": "Adam (DP)",
          "sgd": "SGD (DP)"}
TUNE_SEED = 1000
INNER_LADDER = (0.25, 0.5, 1.0, 2.0, 4.0)  # every method's inner LR: these multiples of its base
QUICK_LADDER = (0.5, 1.0, 2.0)
ADAMW_BASE_LR = 1e-2  # the AdamW workers' base inner LR (the SGD workers' is the task's local_lr)
COSINE_FINAL = 1e-3  # --inner-schedule cosine: the inner LR of the last round, as a fraction of the peak
LATE_FRACTION = 0.1  # the "late" rounds whose outer-step / delta ratio the rows report


class InnerSchedule(StrEnum):
    """The workers' LR over the rounds (``--inner-schedule``)."""

    CONSTANT = "constant"
    COSINE = "cosine"  # from 1 to COSINE_FINAL of the peak over the R rounds (a decaying recipe's late phase)


def lr_factor(schedule: str, r: int, rounds: int) -> float:
    """The inner-LR multiplier of round ``r`` (0-based) of ``rounds``."""
    if schedule == InnerSchedule.CONSTANT or rounds == 1:
        return 1.0
    frac = r / (rounds - 1)
    return COSINE_FINAL + (1 - COSINE_FINAL) * 0.5 * (1 + math.cos(math.pi * frac))


def grids(quick: bool) -> dict[str, Grid]:
    """Each method's starting grid (:mod:`moecpt.lopt.tuning` widens it). Inner LRs: ``lr_mult`` × the task's SGD
    LR (SGD workers) or ``inner_lr`` (AdamW workers), on the same ladder for every method."""
    ladder = QUICK_LADDER if quick else INNER_LADDER
    inner = Axis(ladder)
    adamw = Axis(tuple(ADAMW_BASE_LR * m for m in ladder))
    mom = Axis((0.0, 0.9) if quick else (0.0, 0.6, 0.9), AxisKind.MOMENTUM)
    outer = Axis((0.7, 1.4) if quick else (0.35, 0.7, 1.4))
    return {
        "lagg-a": {"lr_mult": inner},
        "lopt-a": {"lr_mult": inner},
        "local-sgd": {"lr_mult": inner},
        "slowmo": {"lr_mult": inner, "slow_lr": Axis((0.3, 1.0) if quick else (0.1, 0.3, 1.0)),
                   "beta": Axis((0.0, 0.9) if quick else (0.0, 0.5, 0.9), AxisKind.MOMENTUM)},
        "diloco-adamw": {"inner_lr": adamw, "outer_lr": outer, "momentum": mom},
        "diloco-sgd": {"lr_mult": inner, "outer_lr": outer, "momentum": mom},
        "adam": {"lr": Axis((3e-3, 1e-2, 3e-2) if quick else (1e-3, 3e-3, 1e-2, 3e-2))},
        "sgd": {"lr_mult": Axis((1.0, 2.0, 4.0))},
    }


@dataclass
class BenchConfig:
    """What to run: tasks, H values, rounds, seeds, K, weights of the learned optimizers."""

    tasks: tuple[str, ...] = BENCH_TASKS
    local_steps: tuple[int, ...] = (4, 8, 16)
    rounds: int = 60
    seeds: int = 5
    workers: int = 8
    lagg: str = "lagg-a"
    lopt: str = "lopt-a"
    quick: bool = False
    methods: tuple[str, ...] = METHODS
    grid: dict = field(default_factory=dict)
    widen_cap: int = 3
    inner_schedule: InnerSchedule = InnerSchedule.CONSTANT

    @classmethod
    def make(cls, quick: bool = False, tasks: str | None = None, local_steps: str | None = None,
             rounds: int | None = None, seeds: int | None = None, lagg: str = "lagg-a", lopt: str = "lopt-a",
             methods: str | None = None, inner_schedule: str = "constant") -> BenchConfig:
        """From CLI strings; ``quick`` changes the defaults to R = 20, 2 seeds, narrower grids, widening cap 1.

        Raises:
            MoecptError: unknown task or method, an empty ``--tasks`` / ``--local-steps`` / ``--methods`` list,
                an H, rounds or seeds count that is not a whole number >= 1 (0 is refused, not taken as the
                default), an unknown inner schedule.
        """
        names = tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks is not None else BENCH_TASKS
        if not names:
            raise MoecptError(f"--tasks {tasks!r} names no task; give comma-separated task names "
                              "(see `moecpt lopt tasks`)")
        for n in names:
            if n not in TASKS:
                get_task(n)  # raises the one-line error listing the tasks
        try:
            hs = (tuple(int(h) for h in local_steps.split(",") if h.strip()) if local_steps is not None
                  else (4, 8, 16))
        except ValueError:
            raise MoecptError(f"--local-steps takes comma-separated integers like 4,8,16, got {local_steps!r}"
                              ) from None
        if not hs or min(hs) < 1:
            raise MoecptError(f"--local-steps {local_steps!r} must list whole numbers >= 1, like 4,8,16")
        ms = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods is not None else METHODS
        if not ms:
            raise MoecptError(f"--methods {methods!r} names no method; use some of: {', '.join(METHODS)}")
        bad = [m for m in ms if m not in METHODS]
        if bad:
            hint = " (DiLoCo is now diloco-adamw, as published, or diloco-sgd)" if bad[0] == "diloco" else ""
            raise MoecptError(f"unknown bench method {bad[0]!r}; use some of: {', '.join(METHODS)}{hint}")
        if inner_schedule not in tuple(InnerSchedule):
            raise MoecptError(f"--inner-schedule {inner_schedule!r} is unknown; use one of: "
                              f"{', '.join(InnerSchedule)}")
        for flag, value in (("--rounds", rounds), ("--seeds", seeds)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MoecptError(f"{flag} {value!r} must be a whole number >= 1")
        cfg = cls(tasks=names, local_steps=hs, rounds=rounds if rounds is not None else (20 if quick else 60),
                  seeds=seeds if seeds is not None else (2 if quick else 5), lagg=lagg, lopt=lopt, quick=quick,
                  grid=grids(quick), methods=ms, widen_cap=1 if quick else 3,
                  inner_schedule=InnerSchedule(inner_schedule))
        return cfg


# ---------------------------------------------------------------------------------------------------- runner
def _col(x: Tensor, ndim: int) -> Tensor:
    return x.reshape(-1, *([1] * (ndim - 1)))


def _rms(tensors: list[Tensor]) -> Tensor:
    """Per-run RMS over all elements of ``[B, *S_i]`` tensors: ``[B]``."""
    B = tensors[0].shape[0]
    sq = sum(t.reshape(B, -1).square().sum(1) for t in tensors)
    return (sq / sum(t[0].numel() for t in tensors)).sqrt()


@torch.no_grad()
def run_method(task: Task, method: str, settings: list[dict], seeds: list[int], H: int, K: int, R: int,
               learned: dict[str, LearnedOuterOptimizer], gen: torch.Generator, schedule: str = "constant",
               validation: bool = False) -> dict[str, Tensor]:
    """Train ``len(settings) × len(seeds)`` runs of one method as one batch (setting-major).

    Args:
        settings: hyperparameters per setting (``lr_mult``, ``inner_lr``, ``outer_lr``, ``momentum``, ``slow_lr``,
            ``beta``, ``lr``, as the method takes them).
        schedule: the inner LR over the rounds (:func:`lr_factor`).
        validation: ``task`` is a :meth:`~moecpt.lopt.tasks.Task.tuning_task`; also score its ``"val"`` split,
            and skip the per-round train loss (tuning needs the final model only; the curve then holds the last
            round's loss in every row).

    Returns:
        ``{"curve": [R, B] train loss of the global model after each round, "train": [B], "heldout": [B],
        "step_rms": [R, B] RMS of the global update, "delta_rms": [R, B] RMS of the mean delta (0 for the
        data-parallel methods)}`` and, with ``validation``, ``"val": [B]``.
    """
    inits = [task.init_params(1, torch.Generator().manual_seed(s)) for s in seeds]
    params = [torch.cat([inits[j][i] for _ in settings for j in range(len(seeds))]) for i in range(len(inits[0]))]
    B = params[0].shape[0]

    def col(key: str, default: float = 0.0) -> Tensor:
        return torch.tensor([float(s.get(key, default)) for s in settings for _ in seeds])

    base_lr = col("inner_lr") if method == "diloco-adamw" else col("lr_mult", 1.0) * task.local_lr
    bufs = [torch.zeros_like(p) for p in params]
    bufs2 = [torch.zeros_like(p) for p in params]
    opt_state = None
    if method in learned:
        spec = learned[method].spec
        meta = spec.unflatten(learned[method].meta_params)
        opt_state = init_lopt_state(spec, params)
    if method == "diloco-adamw":
        inner_state = init_adamw_state(params, K)
    curve, step_rms, delta_rms = torch.zeros(R, B), torch.zeros(R, B), torch.zeros(R, B)
    for r in range(R):
        local_lr = base_lr * lr_factor(schedule, r, R)
        before = params
        if method in ("adam", "sgd"):
            batch = task.sample(B, gen, size=K * H * task.batch_size)
            _, grads = task.loss_and_grads(params, batch)
            if method == "sgd":
                params = [p - _col(local_lr, p.dim()) * g for p, g in zip(params, grads)]
            else:
                lr, b1, b2, t = col("lr") * lr_factor(schedule, r, R), 0.9, 0.999, r + 1
                new = []
                for i, (p, g) in enumerate(zip(params, grads)):
                    bufs[i] = b1 * bufs[i] + (1 - b1) * g
                    bufs2[i] = b2 * bufs2[i] + (1 - b2) * g * g
                    step = (bufs[i] / (1 - b1**t)) / ((bufs2[i] / (1 - b2**t)).sqrt() + 1e-8)
                    new.append(p - _col(lr, p.dim()) * step)
                params = new
        else:
            if method == "diloco-adamw":
                deltas, _, inner_state = local_round_adamw(task, params, K, H, local_lr, inner_state, gen)
            else:
                deltas, _ = local_round(task, params, K, H, local_lr, gen)
            mean = [d.mean(1) for d in deltas]
            delta_rms[r] = _rms(mean)
            if method in learned:
                params, opt_state = lopt_step(spec, meta, params, deltas if spec.aggregator else mean, opt_state)
            elif method == "local-sgd":
                params = [p + d for p, d in zip(params, mean)]
            elif method == "slowmo":
                new = []
                for i, (p, d) in enumerate(zip(params, mean)):
                    q, bufs[i] = slowmo_update(p, d, bufs[i], local_lr=_col(local_lr, p.dim()),
                                               slow_lr=_col(col("slow_lr"), p.dim()), beta=_col(col("beta"), p.dim()))
                    new.append(q)
                params = new
            elif method in ("diloco-adamw", "diloco-sgd"):
                new = []
                for i, (p, d) in enumerate(zip(params, mean)):
                    q, bufs[i] = nesterov_update(p, d, bufs[i], lr=_col(col("outer_lr"), p.dim()),
                                                 momentum=_col(col("momentum"), p.dim()))
                    new.append(q)
                params = new
            else:  # pragma: no cover - guarded by BenchConfig
                raise ValueError(method)
        step_rms[r] = _rms([q - p for q, p in zip(params, before)])
        if not validation or r == R - 1:
            curve[r] = task.eval_loss(params, "train")
    if validation:
        curve[:] = curve[-1]
    clip = 10 * math.log(task.num_classes)  # diverged runs count as a large finite loss

    def fix(x: Tensor) -> Tensor:
        return torch.nan_to_num(x, nan=clip, posinf=clip).clamp(max=clip)

    out = {"curve": fix(curve), "train": fix(curve[-1]), "heldout": fix(task.eval_loss(params, "heldout")),
           "step_rms": step_rms, "delta_rms": delta_rms}
    if validation:
        out["val"] = fix(task.eval_loss(params, "val"))
    return out


def tune(task: Task, method: str, grid: Grid, H: int, K: int, R: int, learned: dict[str, LearnedOuterOptimizer],
         seed_key: str, cap: int, schedule: str = "constant") -> dict:
    """Tune one method on ``task``'s validation split, widening ``grid`` until its best point is inside it.

    Args:
        task: the full task (its :meth:`~moecpt.lopt.tasks.Task.tuning_task` is what is trained here).
        seed_key: names the cell, for the mini-batch generator of each widening round.
        cap: widening rounds allowed.

    Returns:
        :func:`moecpt.lopt.tuning.search`'s dict (``val_loss``: the chosen point's validation loss).
    """
    tt = task.tuning_task()

    def score(todo: list[dict[str, float]], rnd: int) -> list[float]:
        gen = torch.Generator().manual_seed(zlib.crc32(f"tune|{seed_key}|{rnd}".encode()))
        res = run_method(tt, method, todo, [TUNE_SEED], H, K, R, learned, gen, schedule, validation=True)
        return res["val"].tolist()

    return search(grid, score, cap)


def run_bench(cfg: BenchConfig, out: str | Path | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Run the benchmark; returns ``(rows, curves)`` and, with ``out``, writes ``bench.json``, ``bench.md`` and
    ``bench_curves.png`` there.

    Rows: ``{task, H, method, label, final_train_loss_mean, final_train_loss_std, heldout_loss_mean,
    heldout_loss_std, hyperparams (the chosen point), rounds, seeds, tuning: {grid (after widening), val_loss,
    points, widened, widening_rounds, cap_hit, open_edges}, late_step_rms, late_delta_rms,
    late_step_to_delta}`` (std over seeds, unbiased; 0 with one seed; ``late_*``: mean over the last tenth of the
    rounds of the RMS of the global update and of the mean delta, and their ratio, None for the data-parallel
    methods).

    Raises:
        MoecptError: unknown task; missing, damaged or K-mismatched learned-optimizer weights.
    """
    if out is None:
        return _run_bench(cfg, None, progress)

    weights = [Path(w) for w in (cfg.lagg, cfg.lopt) if str(w).endswith(".safetensors")]
    out = claim_folder(out, "lopt bench", weights, legacy=lambda d: (d / "bench_cache.json").is_file())
    with FolderLock(out, "lopt bench"):
        return _run_bench(cfg, out, progress)


def _run_bench(cfg: BenchConfig, out: Path | None, progress: bool) -> tuple[list[dict], dict]:
    """The body of :func:`run_bench` (``out`` already claimed and locked)."""
    learned = {}
    if "lagg-a" in cfg.methods:
        learned["lagg-a"] = load_pretrained(cfg.lagg, workers=cfg.workers)
    if "lopt-a" in cfg.methods:
        learned["lopt-a"] = load_pretrained(cfg.lopt, workers=cfg.workers)
    tasks = [get_task(n) for n in cfg.tasks]
    seeds = list(range(cfg.seeds))
    rows: list[dict] = []
    curves: dict = {}
    cache_path = Path(out) / "bench_cache.json" if out is not None else None
    cache = _load_cache(cache_path) if cache_path is not None else {}
    digests = {m: hashlib.sha256(o.meta_params.numpy().tobytes()).hexdigest()[:16] for m, o in learned.items()}
    units = len(tasks) * len(cfg.local_steps) * len(cfg.methods)
    bar = tqdm(total=units, disable=not progress, desc="lopt bench", unit="run", dynamic_ncols=True)
    t0 = time.time()
    try:
        for task in tasks:
            for H in cfg.local_steps:
                for method in cfg.methods:
                    bar.set_postfix_str(f"{task.name} H={H} {method}")
                    key = json.dumps(["v2", task.name, H, method, cfg.rounds, cfg.seeds, cfg.workers,
                                      describe(cfg.grid[method]), cfg.widen_cap, cfg.inner_schedule,
                                      digests.get(method)])
                    if key in cache:
                        rows.append(cache[key]["row"])
                        curves[(task.name, H, method)] = cache[key]["curve"]
                        bar.update(1)
                        continue
                    tuned = tune(task, method, cfg.grid[method], H, cfg.workers, cfg.rounds, learned,
                                 f"{task.name}|{H}|{method}", cfg.widen_cap, cfg.inner_schedule)
                    gen = torch.Generator().manual_seed(zlib.crc32(f"{task.name}|{H}|{method}".encode()))
                    res = run_method(task, method, [tuned["best"]], seeds, H, cfg.workers, cfg.rounds, learned, gen,
                                     cfg.inner_schedule)
                    rows.append(_row(task.name, H, method, res, tuned, cfg))
                    curves[(task.name, H, method)] = res["curve"].mean(1).tolist()
                    if cache_path is not None:
                        cache[key] = {"row": rows[-1], "curve": curves[(task.name, H, method)]}
                        write_json_atomic(cache_path, cache)
                    bar.update(1)
    finally:
        bar.close()
    meta = {"seconds": time.time() - t0, "config": {"tasks": list(cfg.tasks), "H": list(cfg.local_steps),
                                                     "rounds": cfg.rounds, "seeds": cfg.seeds, "K": cfg.workers,
                                                     "quick": cfg.quick, "lagg": cfg.lagg, "lopt": cfg.lopt,
                                                     "widen_cap": cfg.widen_cap, "tune_seed": TUNE_SEED,
                                                     "tuning_criterion": "validation loss after the last round",
                                                     "inner_schedule": cfg.inner_schedule,
                                                     "starting_grids": {m: describe(cfg.grid[m]) for m in cfg.methods}}}
    if out is not None:
        outp = Path(out)
        write_json_atomic(outp / "bench.json", {"rows": rows, "summary": summarize(rows), **meta,
                                                "curves": {f"{t}|H={h}|{m}": c for (t, h, m), c in curves.items()}})
        md = "\n\n".join(["Final train loss (nats; bold: lowest)", format_matrix(rows, "final_train_loss"),
                           "Held-out loss", format_matrix(rows, "heldout_loss"),
                           "Per method: chosen setting (its validation loss) and the grid searched",
                           format_table(rows)])
        write_bytes_atomic(outp / "bench.md", (md + "\n").encode())
        plot_curves(curves, cfg, outp / "bench_curves.png")
    return rows, curves


def _row(task: str, H: int, method: str, res: dict[str, Tensor], tuned: dict, cfg: BenchConfig) -> dict:
    """One result row (see :func:`run_bench`)."""
    tr, ho = res["train"], res["heldout"]
    n = tr.numel()
    late = max(1, int(round(LATE_FRACTION * cfg.rounds)))
    d_late = res["delta_rms"][-late:].mean()
    s_late = res["step_rms"][-late:].mean()
    return {
        "task": task, "H": H, "method": method, "label": LABELS[method],
        "final_train_loss_mean": float(tr.mean()), "final_train_loss_std": float(tr.std()) if n > 1 else 0.0,
        "heldout_loss_mean": float(ho.mean()), "heldout_loss_std": float(ho.std()) if n > 1 else 0.0,
        "hyperparams": tuned["best"], "rounds": cfg.rounds, "seeds": n,
        "tuning": {"grid": describe(tuned["grid"]), "val_loss": tuned["val_loss"], "points": tuned["points"],
                   "widened": tuned["widened"], "widening_rounds": tuned["widening_rounds"],
                   "cap_hit": tuned["cap_hit"], "open_edges": tuned["open_edges"]},
        "late_step_rms": float(s_late), "late_delta_rms": float(d_late),
        "late_step_to_delta": float(s_late / d_late) if float(d_late) > 0 else None,
    }


def _load_cache(path: Path) -> dict:
    """The results cache; a damaged one is named, moved aside (``.damaged``) and the benchmark recomputed."""
    if not path.is_file():
        return {}
    try:
        cache = json.loads(path.read_text())
        if isinstance(cache, dict) and all(isinstance(v, dict) and "row" in v for v in cache.values()):
            return cache
    except (OSError, ValueError):
        pass
    aside = path.with_name(path.name + ".damaged")
    path.replace(aside)

    print(f"moecpt: {path} is damaged; moved it aside to {aside.name} and recomputing", file=sys.stderr)
    return {}


def summarize(rows: list[dict]) -> dict:
    """Per (task, H): whether LAgg-A / LOpt-A beat local SGD, SlowMo and DiLoCo on mean final train loss."""
    by = {(r["task"], r["H"], r["method"]): r["final_train_loss_mean"] for r in rows}
    out = {}
    for t, h in sorted({(r["task"], r["H"]) for r in rows}):
        for lm in ("lagg-a", "lopt-a"):
            if (t, h, lm) not in by:
                continue
            out[f"{t}|H={h}|{lm}"] = {f"beats_{b}": by[(t, h, lm)] < by[(t, h, b)]
                                      for b in METHODS[2:] if (t, h, b) in by}
    return out


def _fmt(x: float) -> str:
    """4 decimals, or 2 significant digits in scientific notation below 0.01 (losses near zero)."""
    return f"{x:.4f}" if abs(x) >= 0.01 or x == 0 else f"{x:.1e}"


def _grid_text(grid: dict[str, list[float]]) -> str:
    return "; ".join(f"{k} {{{', '.join(f'{v:g}' for v in vs)}}}" for k, vs in grid.items())


def format_table(rows: list[dict]) -> str:
    """Markdown: mean ± std of final train and held-out loss per task, H and method, the chosen setting, and the
    grid it was chosen from (after widening; ``cap hit`` when the best point was still on an edge)."""
    lines = ["| task | H | method | final train loss | held-out loss | chosen (val loss) | grid searched |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        hp = ", ".join(f"{k}={v:g}" for k, v in r["hyperparams"].items())
        tu = r.get("tuning", {})
        note = f"; cap hit at {', '.join(tu['open_edges'])}" if tu.get("cap_hit") else ""
        grid = _grid_text(tu.get("grid", {})) + (f" ({tu['points']} points, {tu['widening_rounds']} widening "
                                                  f"rounds{note})" if tu else "")
        val = f" ({_fmt(tu['val_loss'])})" if tu else ""
        lines.append(f"| {r['task']} | {r['H']} | {r.get('label', r['method'])} | {_fmt(r['final_train_loss_mean'])} ± "
                     f"{_fmt(r['final_train_loss_std'])} | {_fmt(r['heldout_loss_mean'])} ± "
                     f"{_fmt(r['heldout_loss_std'])} | {hp}{val} | {grid} |")
    return "\n".join(lines)


def format_matrix(rows: list[dict], metric: str = "final_train_loss") -> str:
    """Markdown: one row per (task, H), one column per method, ``mean ± std`` of ``metric``; bold the lowest."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    by = {(r["task"], r["H"], r["method"]): r for r in rows}
    cells = list(dict.fromkeys((r["task"], r["H"]) for r in rows))
    lines = ["| task | H | " + " | ".join(LABELS[m] for m in methods) + " |", "|---|---|" + "---|" * len(methods)]
    for t, h in cells:
        have = {m: by[(t, h, m)] for m in methods if (t, h, m) in by}
        low = min(have, key=lambda m: have[m][f"{metric}_mean"])
        out = []
        for m in methods:
            if m not in have:
                out.append("")
                continue
            txt = f"{_fmt(have[m][f'{metric}_mean'])} ± {_fmt(have[m][f'{metric}_std'])}"
            out.append(f"**{txt}**" if m == low else txt)
        lines.append(f"| {t} | {h} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict, cfg: BenchConfig, path: Path) -> None:
    """Train loss of the global model against communication rounds, one panel per (task, H), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nt, nh = len(cfg.tasks), len(cfg.local_steps)
    fig, axes = plt.subplots(nt, nh, figsize=(4.2 * nh, 3.2 * nt), squeeze=False)
    styles = {"lagg-a": ("C3", "-", 2.2), "lopt-a": ("C1", "-", 2.2), "local-sgd": ("C0", "--", 1.3),
              "slowmo": ("C2", "--", 1.3), "diloco-adamw": ("C4", "-.", 1.6), "diloco-sgd": ("C4", "--", 1.1),
              "adam": ("C5", ":", 1.3), "sgd": ("C7", ":", 1.3)}
    for i, t in enumerate(cfg.tasks):
        for j, h in enumerate(cfg.local_steps):
            ax = axes[i][j]
            for m in cfg.methods:
                c = curves.get((t, h, m))
                if c is None:
                    continue
                color, ls, lw = styles[m]
                ax.plot(range(1, len(c) + 1), c, color=color, ls=ls, lw=lw, label=LABELS[m])
            ax.set_yscale("log")
            ax.set_title(f"{t}, H={h}, K={cfg.workers}", fontsize=9)
            ax.set_xlabel("communication round")
            if j == 0:
                ax.set_ylabel(f"train loss (mean of {cfg.seeds} seeds)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
