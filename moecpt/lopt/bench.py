"""Benchmark of the learned outer optimizers on tasks held out from meta-training (``moecpt lopt bench``).

Setting (Joseph et al., arXiv 2312.02204, Sec. 5; docs/references.md): K = 8 workers, H ∈ {4, 8, 16} local SGD
steps per round, the same number of communication rounds R for every method, 5 seeds. Methods:

* ``lagg-a``, ``lopt-a``: the shipped learned optimizers; the workers' local LR is tuned over ``{0.5, 1, 2} ×``
  the task's (0.5 for the MLPs), like every baseline's.
* ``local-sgd``: ``θ ← θ + mean Δ``; local LR tuned over ``{0.25, 0.5, 1, 2} ×`` the task's.
* ``slowmo``: slow momentum 0.95, slow LR ``{0.05, 0.1, 0.2}`` × local LR ``{0.2, 1} ×`` the task's.
* ``diloco``: Nesterov outer SGD (momentum 0.9), outer LR ``{0.3, 0.7, 1.0}``, local LR the task's.
* ``adam``, ``sgd``: data-parallel, one step per round on the union of the K·H mini-batches that the workers would
  have used (the same number of samples per round); Adam LR ``{1e-3, 3e-3, 1e-2, 3e-2}``, SGD LR
  ``{1, 2, 4} ×`` the task's.

Tuning: every grid point runs on one separate seed (1000) for the full R rounds; the setting with the lowest final
training loss is then run on the 5 evaluation seeds (0-4), which are what the table reports. Every method of a
seed starts from the same initial model. ``final train loss`` is the loss of the global model on the whole train
split (64 fixed windows for the LMs) after the last round; ``held-out loss`` on the held-out split.

``--quick`` uses R = 20, 2 seeds and smaller grids (the learned optimizers at the task's local LR), for a fast
check (wall time: ``benchmarks/README.md``). With ``--out`` every finished (task, H, method) is cached in
``bench_cache.json`` (keyed by the settings and the learned optimizers' weight hashes), so an interrupted run
resumes.
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
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from moecpt.errors import MoecptError
from moecpt.lopt.baselines import nesterov_update, slowmo_update
from moecpt.lopt.optimizers import LearnedOuterOptimizer, init_lopt_state, lopt_step
from moecpt.lopt.pretrained import load_pretrained
from moecpt.lopt.tasks import BENCH_TASKS, TASKS, Task, get_task, local_round
from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic
from moecpt.storage.lock import FolderLock
from moecpt.storage.outputs import claim_folder

METHODS = ("lagg-a", "lopt-a", "local-sgd", "slowmo", "diloco", "adam", "sgd")
TUNE_SEED = 1000


def grids(quick: bool) -> dict[str, list[dict[str, float]]]:
    """Hyperparameter grids; local / SGD LRs are multiples of the task's local LR (``lr_mult``)."""
    if quick:
        return {
            "lagg-a": [{"lr_mult": 1.0}],
            "lopt-a": [{"lr_mult": 1.0}],
            "local-sgd": [{"lr_mult": m} for m in (0.5, 1.0, 2.0)],
            "slowmo": [{"lr_mult": m, "slow_lr": a, "beta": 0.95} for m in (0.2, 1.0) for a in (0.1,)],
            "diloco": [{"lr_mult": 1.0, "outer_lr": a, "momentum": 0.9} for a in (0.7,)],
            "adam": [{"lr": a} for a in (3e-3, 1e-2)],
            "sgd": [{"lr_mult": m} for m in (1.0, 4.0)],
        }
    return {
        "lagg-a": [{"lr_mult": m} for m in (0.5, 1.0, 2.0)],
        "lopt-a": [{"lr_mult": m} for m in (0.5, 1.0, 2.0)],
        "local-sgd": [{"lr_mult": m} for m in (0.25, 0.5, 1.0, 2.0)],
        "slowmo": [{"lr_mult": m, "slow_lr": a, "beta": 0.95} for m in (0.2, 1.0) for a in (0.05, 0.1, 0.2)],
        "diloco": [{"lr_mult": 1.0, "outer_lr": a, "momentum": 0.9} for a in (0.3, 0.7, 1.0)],
        "adam": [{"lr": a} for a in (1e-3, 3e-3, 1e-2, 3e-2)],
        "sgd": [{"lr_mult": m} for m in (1.0, 2.0, 4.0)],
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

    @classmethod
    def make(cls, quick: bool = False, tasks: str | None = None, local_steps: str | None = None,
             rounds: int | None = None, seeds: int | None = None, lagg: str = "lagg-a", lopt: str = "lopt-a",
             methods: str | None = None) -> BenchConfig:
        """From CLI strings; ``quick`` changes the defaults to R = 25, 2 seeds, small grids.

        Raises:
            MoecptError: unknown task or method, an empty ``--tasks`` / ``--local-steps`` / ``--methods`` list,
                an H, rounds or seeds count that is not a whole number >= 1 (0 is refused, not taken as the
                default).
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
            raise MoecptError(f"--local-steps takes comma-separated integers like 4,8,16, got {local_steps!r}") from None
        if not hs or min(hs) < 1:
            raise MoecptError(f"--local-steps {local_steps!r} must list whole numbers >= 1, like 4,8,16")
        ms = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods is not None else METHODS
        if not ms:
            raise MoecptError(f"--methods {methods!r} names no method; use some of: {', '.join(METHODS)}")
        bad = [m for m in ms if m not in METHODS]
        if bad:
            raise MoecptError(f"unknown bench method {bad[0]!r}; use some of: {', '.join(METHODS)}")
        for flag, value in (("--rounds", rounds), ("--seeds", seeds)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MoecptError(f"{flag} {value!r} must be a whole number >= 1")
        cfg = cls(tasks=names, local_steps=hs, rounds=rounds if rounds is not None else (20 if quick else 60),
                  seeds=seeds if seeds is not None else (2 if quick else 5), lagg=lagg, lopt=lopt, quick=quick,
                  grid=grids(quick), methods=ms)
        return cfg


# ---------------------------------------------------------------------------------------------------- runner
def _col(x: Tensor, ndim: int) -> Tensor:
    return x.reshape(-1, *([1] * (ndim - 1)))


@torch.no_grad()
def run_method(task: Task, method: str, settings: list[dict], seeds: list[int], H: int, K: int, R: int,
               learned: dict[str, LearnedOuterOptimizer], gen: torch.Generator) -> dict[str, Tensor]:
    """Train ``len(settings) × len(seeds)`` runs of one method as one batch (setting-major).

    Returns:
        ``{"curve": [R, B] train loss of the global model after each round, "train": [B], "heldout": [B]}``.
    """
    inits = [task.init_params(1, torch.Generator().manual_seed(s)) for s in seeds]
    params = [torch.cat([inits[j][i] for _ in settings for j in range(len(seeds))]) for i in range(len(inits[0]))]
    B = params[0].shape[0]

    def col(key: str, default: float = 0.0) -> Tensor:
        return torch.tensor([float(s.get(key, default)) for s in settings for _ in seeds])

    local_lr = col("lr_mult", 1.0) * task.local_lr
    bufs = [torch.zeros_like(p) for p in params]
    bufs2 = [torch.zeros_like(p) for p in params]
    opt_state = None
    if method in learned:
        spec = learned[method].spec
        meta = spec.unflatten(learned[method].meta_params)
        opt_state = init_lopt_state(spec, params)
    curve = torch.zeros(R, B)
    for r in range(R):
        if method in ("adam", "sgd"):
            batch = task.sample(B, gen, size=K * H * task.batch_size)
            _, grads = task.loss_and_grads(params, batch)
            if method == "sgd":
                params = [p - _col(local_lr, p.dim()) * g for p, g in zip(params, grads)]
            else:
                lr, b1, b2, t = col("lr"), 0.9, 0.999, r + 1
                new = []
                for i, (p, g) in enumerate(zip(params, grads)):
                    bufs[i] = b1 * bufs[i] + (1 - b1) * g
                    bufs2[i] = b2 * bufs2[i] + (1 - b2) * g * g
                    step = (bufs[i] / (1 - b1**t)) / ((bufs2[i] / (1 - b2**t)).sqrt() + 1e-8)
                    new.append(p - _col(lr, p.dim()) * step)
                params = new
        else:
            deltas, _ = local_round(task, params, K, H, local_lr, gen)
            if method in learned:
                if not spec.aggregator:
                    deltas = [d.mean(1) for d in deltas]
                params, opt_state = lopt_step(spec, meta, params, deltas, opt_state)
            elif method == "local-sgd":
                params = [p + d.mean(1) for p, d in zip(params, deltas)]
            elif method == "slowmo":
                new = []
                for i, (p, d) in enumerate(zip(params, deltas)):
                    q, bufs[i] = slowmo_update(p, d.mean(1), bufs[i], local_lr=_col(local_lr, p.dim()),
                                               slow_lr=_col(col("slow_lr"), p.dim()), beta=_col(col("beta"), p.dim()))
                    new.append(q)
                params = new
            elif method == "diloco":
                new = []
                for i, (p, d) in enumerate(zip(params, deltas)):
                    q, bufs[i] = nesterov_update(p, d.mean(1), bufs[i], lr=_col(col("outer_lr"), p.dim()),
                                                 momentum=_col(col("momentum"), p.dim()))
                    new.append(q)
                params = new
            else:  # pragma: no cover - guarded by BenchConfig
                raise ValueError(method)
        curve[r] = task.eval_loss(params, "train")
    clip = 10 * math.log(task.num_classes)  # diverged runs count as a large finite loss
    fix = lambda x: torch.nan_to_num(x, nan=clip, posinf=clip).clamp(max=clip)
    return {"curve": fix(curve), "train": fix(curve[-1]), "heldout": fix(task.eval_loss(params, "heldout"))}


def run_bench(cfg: BenchConfig, out: str | Path | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Run the benchmark; returns ``(rows, curves)`` and, with ``out``, writes ``bench.json``, ``bench.md`` and
    ``bench_curves.png`` there.

    Rows: ``{task, H, method, final_train_loss_mean, final_train_loss_std, heldout_loss_mean, heldout_loss_std,
    hyperparams, rounds, seeds}`` (std over seeds, unbiased; 0 with one seed).

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
                    key = json.dumps([task.name, H, method, cfg.rounds, cfg.seeds, cfg.workers, cfg.grid[method],
                                      digests.get(method)])
                    if key in cache:
                        rows.append(cache[key]["row"])
                        curves[(task.name, H, method)] = cache[key]["curve"]
                        bar.update(1)
                        continue
                    gen = torch.Generator().manual_seed(zlib.crc32(f"{task.name}|{H}|{method}".encode()))
                    settings = cfg.grid[method]
                    best = settings[0]
                    if len(settings) > 1:
                        tune = run_method(task, method, settings, [TUNE_SEED], H, cfg.workers, cfg.rounds, learned,
                                          gen)
                        best = settings[int(torch.argmin(tune["train"]))]
                    res = run_method(task, method, [best], seeds, H, cfg.workers, cfg.rounds, learned, gen)
                    tr, ho = res["train"], res["heldout"]
                    rows.append({
                        "task": task.name, "H": H, "method": method,
                        "final_train_loss_mean": float(tr.mean()),
                        "final_train_loss_std": float(tr.std()) if len(seeds) > 1 else 0.0,
                        "heldout_loss_mean": float(ho.mean()),
                        "heldout_loss_std": float(ho.std()) if len(seeds) > 1 else 0.0,
                        "hyperparams": best, "rounds": cfg.rounds, "seeds": len(seeds),
                    })
                    curves[(task.name, H, method)] = res["curve"].mean(1).tolist()
                    if cache_path is not None:
                        cache[key] = {"row": rows[-1], "curve": curves[(task.name, H, method)]}
                        write_json_atomic(cache_path, cache)
                    bar.update(1)
    finally:
        bar.close()
    meta = {"seconds": time.time() - t0, "config": {"tasks": list(cfg.tasks), "H": list(cfg.local_steps),
                                                     "rounds": cfg.rounds, "seeds": cfg.seeds, "K": cfg.workers,
                                                     "quick": cfg.quick, "lagg": cfg.lagg, "lopt": cfg.lopt}}
    if out is not None:
        outp = Path(out)
        write_json_atomic(outp / "bench.json", {"rows": rows, "summary": summarize(rows), **meta,
                                                "curves": {f"{t}|H={h}|{m}": c for (t, h, m), c in curves.items()}})
        write_bytes_atomic(outp / "bench.md", (format_table(rows) + "\n").encode())
        plot_curves(curves, cfg, outp / "bench_curves.png")
    return rows, curves


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
                                      for b in ("local-sgd", "slowmo", "diloco", "adam", "sgd") if (t, h, b) in by}
    return out


def _fmt(x: float) -> str:
    """4 decimals, or 2 significant digits in scientific notation below 0.01 (losses near zero)."""
    return f"{x:.4f}" if abs(x) >= 0.01 or x == 0 else f"{x:.1e}"


def format_table(rows: list[dict]) -> str:
    """Markdown table: mean ± std of final train and held-out loss per task, H and method."""
    lines = ["| task | H | method | final train loss | held-out loss | setting |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        hp = ", ".join(f"{k}={v:g}" for k, v in r["hyperparams"].items())
        lines.append(f"| {r['task']} | {r['H']} | {r['method']} | {_fmt(r['final_train_loss_mean'])} ± "
                     f"{_fmt(r['final_train_loss_std'])} | {_fmt(r['heldout_loss_mean'])} ± "
                     f"{_fmt(r['heldout_loss_std'])} | {hp} |")
    return "\n".join(lines)


def plot_curves(curves: dict, cfg: BenchConfig, path: Path) -> None:
    """Train loss of the global model against communication rounds, one panel per (task, H), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nt, nh = len(cfg.tasks), len(cfg.local_steps)
    fig, axes = plt.subplots(nt, nh, figsize=(4.2 * nh, 3.2 * nt), squeeze=False)
    styles = {"lagg-a": ("C3", "-", 2.2), "lopt-a": ("C1", "-", 2.2), "local-sgd": ("C0", "--", 1.3),
              "slowmo": ("C2", "--", 1.3), "diloco": ("C4", "--", 1.3), "adam": ("C5", ":", 1.3),
              "sgd": ("C7", ":", 1.3)}
    for i, t in enumerate(cfg.tasks):
        for j, h in enumerate(cfg.local_steps):
            ax = axes[i][j]
            for m in cfg.methods:
                c = curves.get((t, h, m))
                if c is None:
                    continue
                color, ls, lw = styles[m]
                ax.plot(range(1, len(c) + 1), c, color=color, ls=ls, lw=lw, label=m)
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
