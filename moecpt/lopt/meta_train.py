"""Meta-training of the learned outer optimizers with truncated PES (``moecpt lopt meta-train``).

Joseph et al. (arXiv 2312.02204, Sec. 4; docs/references.md): PES (:mod:`moecpt.lopt.pes`) with 8 antithetic pairs,
σ = 0.01, truncations of 50 rounds, trajectories of 100-1000 rounds; meta-loss = the workers' mean local training
loss clipped at 1.5 ln(classes); AdamW meta-optimizer (β = 0.9, 0.999, weight decay 1e-4), linear warm-up over
the first 5% of meta-iterations to 3e-3 then cosine to 1e-3. The paper runs 5k-10k meta-iterations on GPUs;
the shipped weights use a few hundred on a CPU (see docs/lopt.md).

A distribution of tasks (``--task a,b,...``; the default is :data:`moecpt.lopt.tasks.META_TRAIN_TASKS`): the
PES pairs are dealt out among the tasks as evenly as they go (the first ``pairs % n`` tasks get one more), each
pair keeps its own persistent trajectory on its task, and each task's estimate is weighted by its share of the
pairs and divided by ``ln(classes)`` (the loss of a uniform guess), so every pair counts the same and tasks with
larger losses (the LM's ln 256 against digits' ln 10) do not dominate. Sampling a subset of tasks per iteration
would stall the other tasks' trajectories while φ moves on; dealing the pairs out keeps every estimate a plain
truncated PES one.

Run folder ``OUT/``:

* ``meta_state.pt``: everything needed to resume exactly (meta-parameters, AdamW moments, every pair's inner
  models and optimizer accumulators, ``ξ``, RNG state, history); written atomically every ``save_every``
  iterations, read with ``torch.load(weights_only=True)``. Re-running the same command resumes.
* ``config.json``: the settings (a resume with different settings is refused).
* ``<kind>.safetensors``: the current meta-parameters as a weight file (:mod:`moecpt.lopt.pretrained`).
* ``history.json`` and ``curve.png``: the meta-training curve (mean clipped meta-loss of the PES particles per
  iteration, and a periodic evaluation of the unperturbed optimizer against local SGD on the first task); the
  PNG is redrawn every 5th save and at the end. ``history.json`` also holds ``progress``: iterations done, the
  mean seconds per meta-iteration over the last 20 and the projected seconds left (ETA, the same figure as the
  progress line's ``eta``).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from moecpt.errors import MoecptError
from moecpt.lopt.mlp import LOptKind, LOptSpec, MetaInit, StepScale, init_meta_params
from moecpt.lopt.optimizers import init_lopt_state, lopt_step
from moecpt.lopt.pes import PESConfig, init_pes_state, pes_gradient
from moecpt.lopt.pretrained import save_weights
from moecpt.lopt.tasks import META_TRAIN_TASKS, Task, get_task, local_round
from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic
from moecpt.storage.lock import FolderLock
from moecpt.storage.outputs import claim_folder
from moecpt.train.preemption import Preempted, PreemptionWatcher, signal_name

STATE_FILE = "meta_state.pt"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CURVE_FILE = "curve.png"
ETA_WINDOW = 20  # meta-iterations the ETA averages over (recent ones: the machine's load changes)


@dataclass
class MetaTrainConfig:
    """Settings of one meta-training run (saved as ``config.json``)."""

    kind: LOptKind = LOptKind.LAGG_A
    workers: int = 8
    tasks: tuple[str, ...] = META_TRAIN_TASKS
    iterations: int = 200
    pairs: int = 8
    sigma: float = 0.01
    truncation: int = 50
    min_length: int = 100
    max_length: int = 1000
    local_steps: int = 4
    lr: float = 3e-3
    final_lr: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 1e-4
    init: MetaInit = MetaInit.SGD_LIKE
    step_scale: StepScale = StepScale.DELTA_RMS
    sgd_scale: float = 10.0
    seed: int = 0
    eval_every: int = 25
    eval_rounds: int = 200
    eval_seeds: int = 4
    save_every: int = 10
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Check every setting before anything is written (CLI flags named as ``--flag``).

        Raises:
            MoecptError: a count below 1 (workers, iterations, pairs, truncation, lengths, local steps, eval and
                save intervals), ``max_length < min_length``, a non-finite or non-positive ``sigma`` / ``lr`` /
                ``sgd_scale``, a non-finite or negative ``final_lr`` / ``weight_decay``, ``warmup_fraction``
                outside [0, 1], no task, an unknown ``kind`` / ``init``, or a seed out of range.
        """
        if not self.tasks:
            raise MoecptError("--task names no task; give a task name or several separated by commas "
                              "(see `moecpt lopt tasks`)")
        if self.kind not in tuple(LOptKind):
            raise MoecptError(f"--kind {self.kind!r} is unknown; use one of: {', '.join(LOptKind)}")
        if self.init not in tuple(MetaInit):
            raise MoecptError(f"--init {self.init!r} is unknown; use one of: {', '.join(MetaInit)}")
        if self.step_scale not in tuple(StepScale):
            raise MoecptError(f"--step-scale {self.step_scale!r} is unknown; use one of: {', '.join(StepScale)}")
        self.kind, self.init, self.step_scale = LOptKind(self.kind), MetaInit(self.init), StepScale(self.step_scale)
        counts = (("--workers", self.workers), ("--iterations", self.iterations), ("--pairs", self.pairs),
                  ("--truncation", self.truncation), ("--min-length", self.min_length),
                  ("--max-length", self.max_length), ("--local-steps", self.local_steps),
                  ("--eval-every", self.eval_every), ("eval_rounds", self.eval_rounds),
                  ("eval_seeds", self.eval_seeds), ("save_every", self.save_every))
        for name, value in counts:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoecptError(f"{name} {value!r} must be a whole number >= 1")
        if self.max_length < self.min_length:
            raise MoecptError(f"--max-length {self.max_length} is below --min-length {self.min_length}; "
                              "trajectory lengths are drawn from [min, max], so give max >= min")
        reals = (("--sigma", self.sigma, True), ("--lr", self.lr, True), ("sgd_scale", self.sgd_scale, True),
                 ("--final-lr", self.final_lr, False), ("weight_decay", self.weight_decay, False),
                 ("warmup_fraction", self.warmup_fraction, False))
        for name, value, strict in reals:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MoecptError(f"{name} {value!r} is not a finite number; give a finite value "
                                  "(inf and nan are not allowed)")
            if value < 0 or (strict and value == 0):
                raise MoecptError(f"{name} {value!r} must be {'> 0' if strict else '>= 0'}")
        if self.pairs < len(self.tasks):
            raise MoecptError(f"--pairs {self.pairs} is below the number of tasks ({len(self.tasks)}); every task "
                              "needs at least one antithetic pair: give --pairs >= the number of tasks")
        if self.warmup_fraction > 1:
            raise MoecptError(f"warmup_fraction {self.warmup_fraction!r} must be in [0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or abs(self.seed) >= 2**62:
            raise MoecptError(f"--seed {self.seed!r} is out of range; give a whole number between -2**62 and 2**62")

    def spec(self) -> LOptSpec:
        return LOptSpec(self.kind, self.workers if self.kind.startswith("lagg") else None,
                        step_scale=self.step_scale)

    def task_pairs(self) -> list[int]:
        """Antithetic pairs per task: ``pairs`` dealt out in task order (the first ``pairs % n`` get one more)."""
        n = len(self.tasks)
        return [self.pairs // n + (i < self.pairs % n) for i in range(n)]

    def pes(self) -> list[PESConfig]:
        """One :class:`PESConfig` per task (they differ in their number of pairs only)."""
        return [PESConfig(pairs=p, sigma=self.sigma, truncation=self.truncation, min_length=self.min_length,
                          max_length=self.max_length, workers=self.workers, local_steps=self.local_steps)
                for p in self.task_pairs()]

    def as_json(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d


def meta_lr(step: int, cfg: MetaTrainConfig) -> float:
    """Meta learning rate at (0-based) meta-iteration ``step``: linear warm-up to ``lr`` then cosine to ``final_lr``."""
    warm = max(1, int(round(cfg.warmup_fraction * cfg.iterations)))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, cfg.iterations - warm))
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * frac))


def adamw_update(phi: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int, lr: float, wd: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Tensor:
    """One AdamW step (Loshchilov & Hutter 2019); ``m`` and ``v`` are updated in place, ``step`` is 1-based."""
    m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    mhat = m / (1 - betas[0] ** step)
    vhat = v / (1 - betas[1] ** step)
    return phi * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps)


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def run_outer(task: Task, spec: LOptSpec | None, phi: Tensor | None, rounds: int, seeds: int, workers: int,
              local_steps: int, gen: torch.Generator, local_lr: float | None = None) -> tuple[list[float], Tensor]:
    """Train ``seeds`` models for ``rounds`` rounds with a learned optimizer (``spec``, ``phi``) or, if ``spec`` is
    None, plain local SGD -> (mean worker loss per round, final full train-set loss per seed ``[seeds]``)."""
    lr = local_lr if local_lr is not None else task.local_lr
    params = task.init_params(seeds, gen)
    meta = spec.unflatten(phi) if spec is not None else None
    opt = init_lopt_state(spec, params) if spec is not None else None
    curve = []
    for _ in range(rounds):
        deltas, loss = local_round(task, params, workers, local_steps, lr, gen)
        curve.append(float(loss.mean()))
        if spec is None:
            params = [p + d.mean(1) for p, d in zip(params, deltas)]
        else:
            if not spec.aggregator:
                deltas = [d.mean(1) for d in deltas]
            params, opt = lopt_step(spec, meta, params, deltas, opt)
    return curve, task.eval_loss(params, "train")


# ---------------------------------------------------------------------------------------------------- driver
def _save_state(out: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(out / STATE_FILE, buf.getvalue())


def _load_state(out: Path) -> dict:
    try:
        return torch.load(out / STATE_FILE, weights_only=True)
    except Exception as exc:
        raise MoecptError(f"{out / STATE_FILE} is damaged ({type(exc).__name__}); delete it to restart "
                          "meta-training from scratch, or use a new --out") from None


def plot_curve(history: dict, path: Path, title: str) -> None:
    """Meta-loss per iteration (raw and smoothed) and the periodic evaluations, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    for name, ys in history["meta_loss"].items():
        xs = list(range(1, len(ys) + 1))
        ax.plot(xs, ys, alpha=0.3, lw=0.8)
        w = max(1, len(ys) // 20)
        sm = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
        ax.plot(xs, sm, lw=1.8, label=f"{name} (moving mean)")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("meta-loss (clipped train loss, nats)")
    ax.set_title("PES particles' mean meta-loss")
    ax.legend(fontsize=8)
    ax = axes[1]
    ev = history.get("eval", [])
    if ev:
        ax.plot([e["iteration"] for e in ev], [e["final_train_loss"] for e in ev], "o-", label="learned (final)")
        ax.plot([e["iteration"] for e in ev], [e["mean_loss"] for e in ev], "s--", label="learned (mean over run)")
    ref = history.get("local_sgd")
    if ref:
        ax.axhline(ref["final_train_loss"], color="k", ls="-", lw=1, label="local SGD (final)")
        ax.axhline(ref["mean_loss"], color="k", ls=":", lw=1, label="local SGD (mean over run)")
    ax.set_yscale("log")
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("train loss (nats, log scale)")
    ax.set_title(history.get("eval_title", "evaluation"))
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def meta_train(cfg: MetaTrainConfig, out: str | Path, progress: bool = True, max_seconds: float | None = None) -> dict:
    """Run (or resume) meta-training into folder ``out``; returns a summary dict.

    Args:
        cfg: settings (tasks must exist; ``pairs`` at least the number of tasks).
        out: run folder, created if missing; an existing run with the same settings is resumed.
        progress: show a tqdm bar.
        max_seconds: stop cleanly (after saving) once this much wall time has passed; re-run to continue.

    Raises:
        MoecptError: an invalid setting (:meth:`MetaTrainConfig.validate`), a non-finite or negative
            ``max_seconds``, unknown task or kind, fewer pairs than tasks, ``out`` holding a
            run with other settings, or a damaged ``meta_state.pt``.
    """
    cfg.validate()
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds >= 0):
        raise MoecptError(f"the time limit max_seconds={max_seconds!r} must be a finite number >= 0")
    out = Path(out)
    spec = cfg.spec()
    tasks = [get_task(n) for n in cfg.tasks]
    if cfg.iterations < 1:
        raise MoecptError("--iterations must be >= 1")
    pes_cfg = cfg.pes()
    # runs written before output markers existed are proven by their config.json + state file
    # watching from before the first write: a SIGTERM while the run starts (claim, config.json, the first
    # evaluation) is honoured after the first iteration, never by dying half-written
    with PreemptionWatcher() as preempt:
        claim_folder(out, "lopt meta-train",
                     legacy=lambda d: (d / CONFIG_FILE).is_file() and (d / STATE_FILE).is_file())
        with FolderLock(out, "lopt meta-train"):
            return _meta_train_in(cfg, out, spec, tasks, pes_cfg, progress, max_seconds, preempt)


def _check_saved_config(out: Path, cfg_json: dict) -> None:
    """Refuse to resume from ``out`` when its ``config.json`` is damaged or holds other settings than ``cfg_json``."""
    try:
        saved = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        raise MoecptError(f"{out / CONFIG_FILE} is damaged; use a new --out (or restore the file to resume)"
                          ) from None
    saved.setdefault("step_scale", StepScale.FIXED)  # runs from before the option had the paper's fixed step
    if saved != cfg_json:
        diff = sorted(k for k in set(saved) | set(cfg_json) if saved.get(k) != cfg_json.get(k))
        raise MoecptError(f"{out} holds a meta-training run with other settings ({', '.join(diff)}); "
                          "use a new --out, or the same settings to resume")


def _resume_or_start(cfg: MetaTrainConfig, out: Path, spec: LOptSpec, tasks: list[Task],
                     pes_cfg: list[PESConfig]) -> tuple:
    """The run's state, resumed from ``out`` or fresh: ``(gen, phi, adam_m, adam_v, start, pes_states, history)``."""
    cfg_json = cfg.as_json()
    if (out / CONFIG_FILE).is_file() and (out / STATE_FILE).is_file():
        _check_saved_config(out, cfg_json)
        st = _load_state(out)
        gen = torch.Generator()
        gen.set_state(st["gen_state"])
        return gen, st["phi"], st["adam_m"], st["adam_v"], int(st["iteration"]), st["pes"], st["history"]
    write_json_atomic(out / CONFIG_FILE, cfg_json)
    gen = torch.Generator().manual_seed(cfg.seed)
    phi = init_meta_params(spec, gen, cfg.init, cfg.sgd_scale)
    m, v = torch.zeros_like(phi), torch.zeros_like(phi)
    pes_states = [init_pes_state(t, spec, c, gen) for t, c in zip(tasks, pes_cfg)]
    history = {"meta_loss": {t.name: [] for t in tasks}, "seconds": [], "eval": [], "lr": []}
    egen = torch.Generator().manual_seed(10_000 + cfg.seed)
    curve, final = run_outer(tasks[0], None, None, cfg.eval_rounds, cfg.eval_seeds, cfg.workers,
                             cfg.local_steps, egen)
    history["local_sgd"] = {"final_train_loss": float(final.mean()), "mean_loss": sum(curve) / len(curve)}
    history["eval_title"] = (f"{tasks[0].name}: {cfg.eval_rounds} rounds, K={cfg.workers}, "
                             f"H={cfg.local_steps}, {cfg.eval_seeds} seeds")
    return gen, phi, m, v, 0, pes_states, history


def _meta_step(cfg: MetaTrainConfig, spec: LOptSpec, tasks: list[Task], pes_cfg: list[PESConfig], phi: Tensor,
               m: Tensor, v: Tensor, pes_states: list, history: dict, gen: torch.Generator,
               it: int) -> tuple[Tensor, float]:
    """One meta-iteration: the tasks' PES gradients (updating ``pes_states``, ``history`` and the AdamW moments in
    place) and an AdamW step -> (new ``phi``, the meta learning rate used)."""
    grad = torch.zeros_like(phi)
    for i, task in enumerate(tasks):
        g, loss, pes_states[i] = pes_gradient(task, spec, phi, pes_states[i], pes_cfg[i], gen)
        grad += g * (pes_cfg[i].pairs / cfg.pairs) / math.log(task.num_classes)
        history["meta_loss"][task.name].append(loss)
    lr = meta_lr(it, cfg)
    return adamw_update(phi, grad, m, v, it + 1, lr, cfg.weight_decay), lr


def progress_info(history: dict, cfg: MetaTrainConfig, it: int) -> dict:
    """``{iterations_done, iterations, seconds_per_iteration, eta_seconds}`` after meta-iteration ``it``.

    The rate is the mean of the last :data:`ETA_WINDOW` meta-iterations (the machine's load changes); the ETA adds
    the evaluations still to come at the mean cost of the ones done (seconds of wall time).
    """
    recent = history["seconds"][-ETA_WINDOW:]
    rate = sum(recent) / len(recent) if recent else 0.0
    evals = [e["seconds"] for e in history["eval"] if "seconds" in e]
    n, e = cfg.iterations, cfg.eval_every
    evals_left = (n // e - it // e + (n % e != 0)) if it < n else 0  # at multiples of e and at the last one
    eta = rate * (cfg.iterations - it) + (sum(evals) / len(evals) if evals else 0.0) * evals_left
    return {"iterations_done": it, "iterations": cfg.iterations, "seconds_per_iteration": rate, "eta_seconds": eta}


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m"``; ``95`` -> ``"1m35s"``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def _summary(cfg: MetaTrainConfig, out: Path, spec: LOptSpec, history: dict, it: int) -> dict:
    """The summary dict :func:`meta_train` returns."""
    ev = history["eval"][-1] if history["eval"] else {}
    return {
        "out": str(out),
        "kind": cfg.kind,
        "spec": spec.describe(),
        "iterations_done": it,
        "iterations": cfg.iterations,
        "seconds_per_iteration": (sum(history["seconds"]) / len(history["seconds"])) if history["seconds"] else None,
        "progress": history.get("progress"),
        "last_eval": ev,
        "local_sgd_reference": history.get("local_sgd"),
        "weights": str(out / f"{cfg.kind}.safetensors"),
    }


def _meta_train_in(cfg: MetaTrainConfig, out: Path, spec, tasks, pes_cfg, progress: bool,
                   max_seconds: float | None, preempt: PreemptionWatcher) -> dict:
    """The body of :func:`meta_train`, run while this process owns ``out`` and ``preempt`` records signals."""
    gen, phi, m, v, start, pes_states, history = _resume_or_start(cfg, out, spec, tasks, pes_cfg)

    def evaluate(it: int) -> None:
        te = time.time()
        egen = torch.Generator().manual_seed(10_000 + cfg.seed)  # same seeds as the local-SGD reference
        curve, final = run_outer(tasks[0], spec, phi, cfg.eval_rounds, cfg.eval_seeds, cfg.workers,
                                 cfg.local_steps, egen)
        history["eval"].append({"iteration": it, "final_train_loss": float(final.mean()),
                                "mean_loss": sum(curve) / len(curve), "seconds": time.time() - te})

    def save(it: int, plot: bool) -> None:
        _save_state(out, {"iteration": torch.tensor(it), "phi": phi, "adam_m": m, "adam_v": v,
                          "gen_state": gen.get_state(), "pes": pes_states, "history": history})
        info = {"tasks": ",".join(cfg.tasks), "meta_iterations": it, "local_steps": cfg.local_steps,
                "pes": f"pairs={cfg.pairs} sigma={cfg.sigma} truncation={cfg.truncation} "
                       f"lengths={cfg.min_length}-{cfg.max_length}"}
        save_weights(out / f"{cfg.kind}.safetensors", spec, phi, info)
        write_json_atomic(out / HISTORY_FILE, history)
        if plot:
            plot_curve(history, out / CURVE_FILE, f"meta-training {spec.describe()} on {', '.join(cfg.tasks)}")

    it = start
    bar = tqdm(total=cfg.iterations, initial=start, disable=not progress, desc=f"meta-train {cfg.kind}",
               unit="it", dynamic_ncols=True)
    try:
        if start == 0 and not history["eval"]:
            evaluate(0)
        t0 = time.time()
        while it < cfg.iterations:
            ts = time.time()
            phi, lr = _meta_step(cfg, spec, tasks, pes_cfg, phi, m, v, pes_states, history, gen, it)
            it += 1
            history["seconds"].append(time.time() - ts)
            history["lr"].append(lr)
            if it % cfg.eval_every == 0 or it == cfg.iterations:
                evaluate(it)
            history["progress"] = progress_info(history, cfg, it)
            bar.update(1)
            bar.set_postfix(meta_loss=f"{sum(h[-1] for h in history['meta_loss'].values()) / len(tasks):.4f}",
                            lr=f"{lr:.1e}", s_per_it=f"{history['progress']['seconds_per_iteration']:.1f}",
                            eta=format_duration(history["progress"]["eta_seconds"]))
            stop = bool(preempt.signum) or (max_seconds is not None and time.time() - t0 > max_seconds)
            if it % cfg.save_every == 0 or it == cfg.iterations or stop:
                save(it, plot=stop or it == cfg.iterations or it % (5 * cfg.save_every) == 0)
            if preempt.signum and it < cfg.iterations:  # SIGTERM / SIGUSR1: saved above, resumable
                raise Preempted(f"pre-empted by {signal_name(preempt.signum)} after meta-iteration {it}: saved "
                                f"{out}; run the same command again to resume", preempt.signum)
            if stop:
                break
    finally:
        bar.close()
    return _summary(cfg, out, spec, history, it)
