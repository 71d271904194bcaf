"""``moecpt study``: plan, run (resumably, in parallel) and analyse the router-robustness CPT study.

Stages (see :mod:`moecpt.analysis.study_config`) are ordinary training runs in ``DIR/runs/<key>-<hash>``, where
``hash`` fingerprints the stage's full configuration and its parent's: re-running a study reuses every finished
stage, an edited recipe reruns only the stages it changed, and an interrupted stage resumes from its own last
checkpoint (the trainer's exact resume). Independent stages run in parallel worker processes.

After training, every final checkpoint (and every CPT parent checkpoint) is evaluated on each source's held-out
split; CPT runs are compared with their parent on the old distribution (CRS, CVS); the results go to
``DIR/study.json`` and the report (``report.md``, ``report.html``, ``plots/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from moecpt.analysis.study_config import CPTSchedule, OptimizerState, StudyModel, StudyRecipe
from moecpt.config import (
    DataConfig,
    OptimConfig,
    Recipe,
    ScheduleConfig,
    ScheduleKind,
    identity_json,
    recipe_from_dict,
)
from moecpt.analysis.report import report_files
from moecpt.errors import MoecptError
from moecpt.train.preemption import Preempted, PreemptionWatcher, signal_name

PLAN_FILE = "study_plan.json"
DONE_FILE = "STAGE_DONE.json"


@dataclass
class Stage:
    """One training run of the study."""

    key: str  # e.g. "s0/cpt/granular-pb/code/inf-r0.3"
    kind: str  # pretrain | cpt | control | retrain
    model: str
    recipe: Recipe
    seed: int = 0
    parent: "Stage | None" = None
    parent_point: str | None = None  # "pre_anneal" | "final"
    shift: str | None = None
    replay: float | None = None
    schedule: str | None = None
    control: str | None = None  # cpt runs: the key of their no-shift control
    deps: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        ident = {"recipe": identity_json(self.recipe), "parent": self.parent.fingerprint if self.parent
                 else None, "point": self.parent_point}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]

    def run_dir(self, root: Path) -> Path:
        return root / "runs" / f"{self.key}-{self.fingerprint}"

    def end_step(self) -> int:
        from moecpt.train.schedules import run_end_step

        return run_end_step(self.recipe.schedule, self.recipe.train.steps)

    @property
    def optimizer_state(self) -> str | None:
        """``carried`` / ``fresh`` for runs from a parent checkpoint; None for runs from scratch."""
        if self.parent is None:
            return None
        return "carried" if self.recipe.cpt.load_optimizer else "fresh"

    @property
    def warmup_steps(self) -> int:
        """The run's warm-up steps, as its LR schedule counts them."""
        from moecpt.train.schedules import warmup_end_step

        return warmup_end_step(self.recipe.schedule, self.recipe.train.steps)

    def parent_checkpoint(self, root: Path) -> Path | None:
        if self.parent is None:
            return None
        from moecpt.train.checkpoint import checkpoint_dir_name
        from moecpt.train.schedules import anneal_start_step

        p = self.parent
        step = p.end_step() if self.parent_point == "final" else anneal_start_step(p.recipe.schedule,
                                                                                   p.recipe.train.steps)
        return p.run_dir(root) / "checkpoints" / checkpoint_dir_name(step)


# --------------------------------------------------------------------------------------------------------- plan
def _run_recipe(study: StudyRecipe, m: StudyModel, name: str, mixture: dict[str, float], steps: int,
                schedule: ScheduleConfig, seed: int, optim: OptimConfig | None = None,
                load_optimizer: bool = False) -> Recipe:
    train = study.train.model_copy(update={"steps": steps, "seed": seed})
    eval_every = max(1, steps // study.eval_points)
    # keep_last=1: a study holds many runs; the pre-anneal milestone is kept anyway for the inf CPT runs
    train = train.model_copy(update={"eval_every": eval_every, "keep_last": 1,
                                     "checkpoint_every": min(study.train.checkpoint_every, steps)})
    raw = {
        "name": name,
        "model": m.model_table(),
        "data": DataConfig(path=study.data.path, mixture=mixture, seq_len=study.data.seq_len,
                           allow_repeat=study.data.allow_repeat).model_dump(mode="json"),
        "optim": (optim or study.optim).model_dump(mode="json"),
        "schedule": schedule.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "cpt": {"load_optimizer": load_optimizer},
    }
    return recipe_from_dict(raw)


def _cpt_schedule(study: StudyRecipe, schedule: CPTSchedule) -> tuple[ScheduleConfig, OptimConfig, str, bool]:
    """(LR schedule, optimizer settings, parent point, carry the optimizer state) of a CPT run (and its control).

    ``inf`` continues at the constant LR and anneals over the last 20%; a fresh state is first warmed up to the
    constant LR (the peak of that run is the constant). ``rewarm`` warms up from the minimum LR to the peak and
    re-decays with a cosine; that re-warm is also the fresh state's warm-up. See ``docs/study-rules.md``."""
    cpt = study.cpt
    const_lr = study.const_lr_fraction * study.optim.lr
    carry = cpt.optimizer_state(schedule) == OptimizerState.CARRY
    if schedule == CPTSchedule.INF:
        warm = 0.0 if carry else cpt.fresh_warmup_fraction
        sched = ScheduleConfig(kind=ScheduleKind.COSINE_INF, warmup_fraction=warm, const_lr=const_lr,
                               cooldown_fraction=0.0, constant_fraction=max(0.0, 0.8 - warm))
        optim = study.optim if carry else study.optim.model_copy(update={"lr": const_lr})
        return sched, optim, "pre_anneal", carry
    sched = ScheduleConfig(kind=ScheduleKind.COSINE, warmup_fraction=cpt.rewarm_warmup_fraction,
                           warmup_start_lr=study.optim.min_lr)
    return sched, study.optim, "final", carry


def plan_stages(study: StudyRecipe) -> list[Stage]:
    """All stages of ``study`` in dependency order (per seed: pre-training and re-training, then CPT runs and
    their no-shift controls)."""
    stages: list[Stage] = []
    for seed in study.seeds:
        stages += _plan_seed(study, seed)
    return stages


def _plan_seed(study: StudyRecipe, seed: int) -> list[Stage]:
    pt, cpt = study.pretrain, study.cpt
    const_lr = study.const_lr_fraction * study.optim.lr
    old = {s: 1.0 / len(study.data.old) for s in study.data.old}
    pt_sched = ScheduleConfig(kind=ScheduleKind.COSINE_INF, warmup_fraction=pt.warmup_fraction, const_lr=const_lr,
                              cooldown_fraction=max(0.0, 0.7 - pt.warmup_fraction), constant_fraction=0.1)
    tag = f"s{seed}"
    stages: list[Stage] = []
    pretrain: dict[str, Stage] = {}
    for m in study.models:
        st = Stage(key=f"{tag}/pretrain/{m.name}", kind="pretrain", model=m.name, seed=seed,
                   recipe=_run_recipe(study, m, f"{tag}-pretrain-{m.name}", old, pt.steps, pt_sched, seed))
        pretrain[m.name] = st
        stages.append(st)
    by_name = {m.name: m for m in study.models}
    for name in study.retrain.models:
        m = by_name[name]
        total = pt.steps + cpt.steps
        for shift in study.retrain.shifts or study.data.shifts:
            mix = {s: w * pt.steps / total for s, w in old.items()} | {shift: cpt.steps / total}
            sched = ScheduleConfig(kind=ScheduleKind.COSINE, warmup_fraction=pt.warmup_fraction)
            stages.append(Stage(key=f"{tag}/retrain/{name}/{shift}", kind="retrain", model=name, shift=shift,
                                seed=seed, recipe=_run_recipe(study, m, f"{tag}-retrain-{name}-{shift}", mix, total,
                                                              sched, seed)))
    controls: dict[tuple[str, str], str] = {}
    for name, schedule in study.control_cells():
        sched, optim, point, carry = _cpt_schedule(study, schedule)
        key = f"{tag}/control/{name}/{schedule.value}"
        controls[(name, schedule.value)] = key
        stages.append(Stage(key=key, kind="control", model=name, schedule=schedule.value, seed=seed,
                            parent=pretrain[name], parent_point=point, deps=[pretrain[name].key],
                            recipe=_run_recipe(study, by_name[name], key.replace("/", "-"), dict(old), cpt.steps,
                                               sched, seed, optim, carry)))
    for name, shift, schedule, replay in study.cpt_cells():
        sched, optim, point, carry = _cpt_schedule(study, schedule)
        mix = {shift: 1.0 - replay} | {s: replay * w for s, w in old.items()}
        key = f"{tag}/cpt/{name}/{shift}/{schedule.value}-r{replay:g}"
        stages.append(Stage(key=key, kind="cpt", model=name, shift=shift, replay=replay, schedule=schedule.value,
                            seed=seed, parent=pretrain[name], parent_point=point, deps=[pretrain[name].key],
                            control=controls.get((name, schedule.value)),
                            recipe=_run_recipe(study, by_name[name], key.replace("/", "-"), mix, cpt.steps, sched,
                                               seed, optim, carry)))
    return stages


# ---------------------------------------------------------------------------------------------------- execution
def _worker_init() -> None:
    """Make a worker die with the study process (Linux): an orphan would keep writing a run that a restarted
    study resumes. Checkpoints are atomic, so a kill at any moment loses at most the steps since the last one."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _run_stage(run_dir: str, recipe_json: dict, parent: str | None, threads: int) -> dict:
    """Worker entry point: one training run (resumes its own checkpoints)."""
    import torch

    from moecpt.train.trainer import Trainer

    torch.set_num_threads(threads)
    recipe = Recipe.model_validate(recipe_json)
    t0 = time.perf_counter()
    summary = Trainer(recipe, run_dir, parent=parent, show_progress=False).run()
    summary["wall_time_s"] = time.perf_counter() - t0
    return summary


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - 4096))
            lines = fh.read().decode("utf-8", "replace").splitlines()
        for line in reversed(lines):
            try:
                return int(json.loads(line).get("step", 0))
            except (json.JSONDecodeError, ValueError):
                continue
    except OSError:
        pass
    return 0


def _plan_name(root: Path) -> str | None:
    """The study name in ``root``'s plan file; ``None`` when there is none.

    Raises:
        MoecptError: the plan file exists but is unreadable.
    """
    plan = root / PLAN_FILE
    if not plan.exists():
        return None
    try:
        existing = json.loads(plan.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise MoecptError(f"{plan} is unreadable; choose a new --out") from None
    if not isinstance(existing, dict) or not isinstance(existing.get("name"), str):
        raise MoecptError(f"{plan} is not a moecpt study plan; choose a new --out")
    return existing["name"]


def study_inputs(study: StudyRecipe, recipe_path: str | Path | None = None) -> list[Path]:
    """What a study reads and must never write into: its recipe file and its prepared data folder (the bundled
    ``demo`` data lives in moecpt's cache and is not a path of the user's)."""
    inputs = [Path(recipe_path).expanduser()] if recipe_path is not None else []
    if study.data.path != "demo":
        inputs.append(Path(study.data.path).expanduser())
    return inputs


def _claim_study_dir(root: Path, study: StudyRecipe, recipe_path: str | Path | None = None) -> None:
    """Make ``root`` this study's folder (see :func:`moecpt.storage.outputs.claim_folder`); the plan is written
    later, under the folder's lock. A folder made before output markers existed is adopted when its plan names
    this very study.

    Raises:
        MoecptError: ``root`` holds another study, is a non-empty folder moecpt did not make (or another
            command's), is or lies inside an input (or holds one), or cannot be written.
    """
    from moecpt.storage.outputs import FileLedger, claim_folder, owns

    # Read-only checks first: a folder of another study is refused before anything is written into it.
    name = _plan_name(root) if root.is_dir() else None
    if name is not None and name != study.name:
        raise MoecptError(f"--out {str(root)!r} holds a different study ({name!r}, not {study.name!r}); "
                          "choose a new --out")
    legacy = root.is_dir() and not owns(root) and name == study.name
    claim_folder(root, "study", study_inputs(study, recipe_path), legacy=lambda p: _plan_name(p) == study.name)
    ledger = FileLedger(root)
    if legacy:  # a report written by a moecpt from before the file ledger: proven by the plan beside it
        ledger.record(*[p for p in report_files(root) if p.is_file()])
    ledger.check_replaceable(*report_files(root))  # before hours of training, not after


def run_stages(root: Path, stages: list[Stage], jobs: int, log=print) -> dict[str, dict]:
    """Run every unfinished stage, ``jobs`` at a time, respecting dependencies; returns summaries by key."""
    from tqdm import tqdm

    from moecpt.train.checkpoint import write_json_atomic

    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    summaries: dict[str, dict] = {}
    pending: list[Stage] = []
    for st in stages:
        done = st.run_dir(root) / DONE_FILE
        if done.exists():
            summaries[st.key] = json.loads(done.read_text(encoding="utf-8"))
        else:
            pending.append(st)
    total_steps = sum(st.end_step() for st in stages)
    cached = sum(st.end_step() for st in stages if st.key in summaries)
    log(f"study: {len(stages)} stages, {len(stages) - len(pending)} cached, {len(pending)} to run "
        f"({jobs} parallel job(s) x {threads} thread(s))")
    # a log file (SLURM, nohup) gets the per-stage "done" lines only, not a redrawn bar
    bar = tqdm(total=total_steps, initial=cached, unit="step", desc="study", leave=True,
               disable=not sys.stderr.isatty())
    running: dict[Any, Stage] = {}
    finished_steps = cached
    t_start = time.perf_counter()
    ctx = get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)
    preempt = PreemptionWatcher()
    stopped: list[str] = []
    try:
        preempt.__enter__()
        while pending or running:
            if preempt.signum:  # pre-emption: every running stage saves and stops, then the study stops
                stopped += [running[f].key for f in _preempt_stages(pool, running, preempt.signum, bar)]
                raise Preempted(f"study pre-empted by {signal_name(preempt.signum)}: stage(s) "
                                f"{', '.join(stopped) or 'none'} saved a checkpoint; run the same command again "
                                "to resume", preempt.signum)
            for st in list(pending):
                if len(running) >= jobs:
                    break
                if all(d in summaries for d in st.deps):
                    pending.remove(st)
                    parent = st.parent_checkpoint(root)
                    fut = pool.submit(_run_stage, str(st.run_dir(root)), st.recipe.model_dump(mode="json"),
                                      str(parent) if parent else None, threads)
                    running[fut] = st
            if not running:
                raise MoecptError("study stages wait on stages that cannot run; this is a bug in the plan")
            done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                st = running.pop(fut)
                if isinstance(fut.exception(), Preempted):  # the signal reached the stage first
                    preempt.signum = preempt.signum or fut.exception().signum
                    stopped.append(st.key)
                    continue
                summary = fut.result()  # re-raises a stage's MoecptError here, in the main process
                write_json_atomic(st.run_dir(root) / DONE_FILE, summary)
                summaries[st.key] = summary
                finished_steps += st.end_step()
                bar.write(f"  done {st.key} ({summary.get('wall_time_s', 0):.1f} s); {len(summaries)}/{len(stages)} "
                          f"stages, {_eta(t_start, finished_steps - cached, total_steps - finished_steps)}")
            live = sum(_steps_done(st.run_dir(root)) for st in running.values())
            bar.n = min(total_steps, finished_steps + live)
            bar.refresh()
    except BaseException:
        # Ctrl-C or a failed stage: stop the other workers now rather than waiting for their stages to finish
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        preempt.__exit__()
    pool.shutdown()
    bar.close()
    return summaries


def _eta(t_start: float, steps_done: int, steps_left: int) -> str:
    """"ETA 12 min" from the steps finished since ``t_start`` (steps of every model counted alike)."""
    elapsed = time.perf_counter() - t_start
    if steps_done <= 0 or elapsed <= 0:
        return "ETA unknown"
    left = steps_left * elapsed / steps_done
    return f"ETA {left / 60:.0f} min" if left >= 60 else f"ETA {left:.0f} s"


def _preempt_stages(pool: ProcessPoolExecutor, running: dict, signum: int, bar, timeout_s: float = 120.0) -> list:
    """Pass a pre-emption signal on to the workers and wait (at most ``timeout_s``) for their stages to save and
    stop; returns the futures that stopped on it. A stage that finishes instead is fine too (the next run finds
    it complete)."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass
    done, _ = wait(list(running), timeout=timeout_s)
    for fut in done:
        exc = fut.exception()
        if exc is not None and not isinstance(exc, Preempted):
            bar.write(f"  {running[fut].key} stopped: {exc}")
    return [f for f in done if isinstance(f.exception(), Preempted)]


# ------------------------------------------------------------------------------------------------------ analysis
def _read_metrics(run_dir: Path) -> tuple[dict[str, list], list]:
    val: dict[str, list] = {}
    train_mri: list = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("split") == "val":
            val.setdefault(rec["source"], []).append([rec["step"], rec["tokens"], rec["loss"]])
        elif rec.get("mri_layers") is not None:
            train_mri.append([rec["step"], rec["mri_mean"], rec["mri_layers"]])
    return val, train_mri


class _Evaluator:
    """Evaluates checkpoints on the held-out splits, caching results under ``DIR/evals``."""

    def __init__(self, root: Path, study: StudyRecipe):
        from moecpt.analysis.evaluate import eval_batches_for
        from moecpt.data.prepared import PreparedData

        self.root, self.study = root, study
        self.data = PreparedData.open(study.data.path)
        self.sources = list(study.data.old) + list(study.data.shifts)
        self.batches = eval_batches_for(self.data, self.sources, study.data.seq_len, study.eval.batch_size,
                                        study.eval.batches)
        self.cache_dir = root / "evals"
        self.cache_dir.mkdir(exist_ok=True)
        self._traces: dict[str, dict] = {}

    def _key(self, ckpt: Path, extra: str = "") -> Path:
        meta_sha = hashlib.sha256((ckpt / "meta.json").read_bytes()).hexdigest()[:12]
        ident = f"{ckpt.relative_to(self.root)}|{meta_sha}|{self.study.eval.model_dump_json()}|{extra}"
        return self.cache_dir / (hashlib.sha256(ident.encode()).hexdigest()[:16] + ".json")

    def traces(self, ckpt: Path) -> dict:
        from moecpt.analysis.evaluate import collect
        from moecpt.train.checkpoint import load_model

        key = str(ckpt)
        if key not in self._traces:
            model = load_model(ckpt)
            self._traces[key] = {s: collect(model, b) for s, b in self.batches.items()}
        return self._traces[key]

    def summary(self, ckpt: Path) -> dict:
        from moecpt.analysis.evaluate import routing_summary
        from moecpt.train.checkpoint import write_json_atomic

        cache = self._key(ckpt)
        if cache.exists():
            return json.loads(cache.read_text(encoding="utf-8"))
        tokens = self.study.eval.batch_size * self.study.data.seq_len
        out = {}
        for s, tr in self.traces(ckpt).items():
            rs = routing_summary(tr, tokens)
            out[s] = {"loss": tr.loss, **{k: rs[k] for k in ("mri_mean", "mri_layers") if k in rs}}
        write_json_atomic(cache, out)
        return out

    def compare(self, before: Path, after: Path, source: str) -> dict:
        from moecpt.analysis.evaluate import compare_traces
        from moecpt.train.checkpoint import write_json_atomic

        cache = self._key(after, f"compare|{before.relative_to(self.root)}|{source}")
        if cache.exists():
            return json.loads(cache.read_text(encoding="utf-8"))
        tb, ta = self.traces(before)[source], self.traces(after)[source]
        out = {"source": source, **compare_traces(tb, ta)}
        if tb.topk_layers and tb.topk_layers[0].shape[1] > 1:  # co-activation needs k > 1
            from moecpt.analysis.routing_metrics import coactivation

            def co(trace):
                return [[[round(v, 4) for v in row] for row in coactivation(t, trace.num_experts).tolist()]
                        for t in trace.topk_layers]

            out["coactivation_before_layers"], out["coactivation_after_layers"] = co(tb), co(ta)
        write_json_atomic(cache, out)
        return out


def _eval_worker(root: str, study_json: dict, pairs: list[tuple[str, str | None]], threads: int) -> None:
    """Worker: evaluate final checkpoints (and compare each with its CPT parent), filling the eval cache."""
    import torch

    torch.set_num_threads(threads)
    study = StudyRecipe.model_validate(study_json)
    ev = _Evaluator(Path(root), study)
    for final, parent in pairs:
        summary = ev.summary(Path(final))
        if parent is not None:
            ev.summary(Path(parent))
            # an MoE's summary has routing figures; asking the traces instead would recompute a cached study
            if "mri_mean" in summary.get(study.data.old[0], {}):
                ev.compare(Path(parent), Path(final), study.data.old[0])


def evaluate_stages(root: Path, study: StudyRecipe, stages: list[Stage], jobs: int) -> None:
    """Evaluate every stage's final checkpoint and CPT parent in ``jobs`` worker processes (one per pre-trained
    model's family of runs, so a parent's traces are computed once per worker), caching under ``DIR/evals``.

    Single-threaded workers side by side use a small CPU better than one multi-threaded process, and do not
    collapse when other programs share the cores."""
    from moecpt.train.checkpoint import checkpoint_dir_name

    groups: dict[str, list[tuple[str, str | None]]] = {}
    for st in stages:
        final = st.run_dir(root) / "checkpoints" / checkpoint_dir_name(st.end_step())
        parent = st.parent_checkpoint(root)
        groups.setdefault(st.parent.key if st.parent else st.key, []).append(
            (str(final), str(parent) if parent else None))
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    study_json = study.model_dump(mode="json")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        for fut in [pool.submit(_eval_worker, str(root), study_json, pairs, threads) for pairs in groups.values()]:
            fut.result()


def collect_results(root: Path, study: StudyRecipe, stages: list[Stage], summaries: dict[str, dict],
                    wall_time_s: float, log=print, jobs: int | None = None) -> dict[str, Any]:
    """Assemble the ``results`` dict the report is written from (schema: :mod:`moecpt.analysis.report`)."""
    from moecpt.analysis.forgetting import summarize_losses
    from moecpt.model.flops import model_stats
    from moecpt.train.checkpoint import checkpoint_dir_name, load_checkpoint
    from moecpt.config import ModelConfig

    ev = _Evaluator(root, study)  # reads the cache that evaluate_stages filled
    stage_time = sum(float(summaries[st.key].get("wall_time_s", 0.0)) for st in stages)
    results: dict[str, Any] = {"name": study.name, "wall_time_s": wall_time_s, "stage_time_s": stage_time,
                               "jobs": jobs, "seeds": list(study.seeds),
                               "old_sources": list(study.data.old),
                               "shifts": list(study.data.shifts), "models": {}, "runs": {}, "comparisons": {},
                               "forgetting": {}}
    for m in study.models:
        st = next(s for s in stages if s.kind == "pretrain" and s.model == m.name)  # any seed: same shapes
        cfg = ModelConfig.model_validate(load_checkpoint(st.run_dir(root), verify=False).meta["model_config"])
        stats = model_stats(cfg, study.data.seq_len)
        results["models"][m.name] = {
            "preset": m.preset, "arch": m.arch, "is_moe": cfg.moe is not None,
            "router": (cfg.moe.router.kind.value if cfg.moe is not None else None),
            "top_k": cfg.moe.top_k if cfg.moe else None, "num_experts": cfg.moe.num_experts if cfg.moe else None,
            "total_params": stats["total_params"], "active_params": stats["active_params"],
            "train_flops_per_token": stats["train_flops_per_token"],
        }
    for st in stages:
        run_dir = st.run_dir(root)
        val, train_mri = _read_metrics(run_dir)
        final_ckpt = run_dir / "checkpoints" / checkpoint_dir_name(st.end_step())
        tokens = summaries[st.key]["tokens"]
        run: dict[str, Any] = {
            "kind": st.kind, "model": st.model, "seed": st.seed, "shift": st.shift, "replay": st.replay,
            "schedule": st.schedule, "control": st.control, "optimizer_state": st.optimizer_state,
            "warmup_steps": st.warmup_steps,
            "parent": st.parent.key if st.parent else None, "run_dir": str(run_dir.relative_to(root)),
            "steps": st.end_step(), "tokens": tokens,
            "train_flops": tokens * results["models"][st.model]["train_flops_per_token"],
            "val": val, "train_mri": train_mri, "final": ev.summary(final_ckpt), "start": None,
            "parent_step": None, "start_tokens": 0,
        }
        if st.parent is not None:
            parent_ckpt = st.parent_checkpoint(root)
            pmeta = load_checkpoint(parent_ckpt, verify=False).meta
            run["parent_step"], run["start_tokens"] = pmeta["step"], pmeta["tokens"]
            run["start"] = ev.summary(parent_ckpt)
            before = {s: v["loss"] for s, v in run["start"].items()}
            after = {s: v["loss"] for s, v in run["final"].items()}
            shifts = [st.shift] if st.shift else []  # a control has no shift: forgetting only
            results["forgetting"][st.key] = summarize_losses(before, after, study.data.old, shifts)
            if results["models"][st.model]["is_moe"]:
                results["comparisons"][st.key] = ev.compare(parent_ckpt, final_ckpt, study.data.old[0])
        results["runs"][st.key] = run
    return results


def run_study(study: StudyRecipe, out_dir: str | Path, jobs: int | None = None, log=print,
              recipe_path: str | Path | None = None) -> dict[str, Any]:
    """Plan, train, evaluate and report one study into ``out_dir``; returns the results (with findings).

    ``out_dir`` is claimed (:func:`moecpt.storage.outputs.claim_folder`, command ``study``) before anything is
    written and locked (:class:`moecpt.storage.lock.FolderLock`) while the study runs. ``recipe_path`` (the study
    TOML, when there is one) is an input: ``out_dir`` must not be it, lie inside it or hold it.

    Raises:
        MoecptError: the folder holds another study, is a non-empty folder moecpt did not make, is or overlaps an
            input (the recipe, the prepared data), is in use by another live process, or cannot be written
            (read-only, permission denied, disk full: one line); a source is missing from the data; a stage failed.
    """
    from moecpt.data.prepared import PreparedData
    from moecpt.storage.lock import FolderLock
    from moecpt.storage.outputs import os_error_line

    root = Path(out_dir).expanduser()
    data = PreparedData.open(study.data.path)
    missing = [s for s in list(study.data.old) + list(study.data.shifts) if s not in data.source_names]
    if missing:
        raise MoecptError(f"the study names source(s) {missing} that {data.path} lacks; available: "
                          f"{', '.join(data.source_names)}")
    _claim_study_dir(root, study, recipe_path)
    try:
        with FolderLock(root, "study"):
            return _run_claimed(study, root, jobs, log)
    except OSError as exc:  # a full disk or a folder made read-only meanwhile: one line, not a traceback
        raise MoecptError(os_error_line(exc, root)) from None


def _run_claimed(study: StudyRecipe, root: Path, jobs: int | None, log) -> dict[str, Any]:
    """The body of :func:`run_study`, in a folder already claimed and locked by this process."""
    from moecpt.analysis.report import write_report
    from moecpt.storage.atomic import write_json_atomic

    if _plan_name(root) not in (None, study.name):  # another study's process got here first
        raise MoecptError(f"--out {str(root)!r} holds a different study ({_plan_name(root)!r}, not "
                          f"{study.name!r}); choose a new --out")
    write_json_atomic(root / PLAN_FILE, {"name": study.name, "recipe": study.model_dump(mode="json")})
    stages = plan_stages(study)
    t0 = time.perf_counter()
    jobs = jobs or min(len(stages), max(1, os.cpu_count() or 1))
    summaries = run_stages(root, stages, jobs, log=log)
    log("study: evaluating checkpoints on the held-out splits")
    evaluate_stages(root, study, stages, jobs)
    results = collect_results(root, study, stages, summaries, time.perf_counter() - t0, log=log, jobs=jobs)
    write_report(results, root)
    log(f"study: report written to {root / 'report.md'} (and report.html, study.json)")
    return results
