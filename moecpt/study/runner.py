"""``moecpt study``: plan, run (resumably, in parallel) and analyse the router-robustness CPT study.

Stages (:mod:`moecpt.study.plan`) are ordinary training runs in ``DIR/runs/<key>-<hash>``, where ``hash``
fingerprints the stage's full configuration and its parent's: re-running a study reuses every finished stage, an
edited recipe reruns only the stages it changed, and an interrupted stage resumes from its own last checkpoint (the
trainer's exact resume). Independent stages run in parallel worker processes.

After training, every final checkpoint (and every CPT parent checkpoint) is evaluated on each source's held-out
split and CPT runs are compared with their parent on the old distribution (:mod:`moecpt.study.evaluation`); the
results go to ``DIR/study.json`` and the report (``report.md``, ``report.html``, ``plots/``:
:mod:`moecpt.study.report`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moecpt.config import Recipe
from moecpt.data.prepared import PreparedData
from moecpt.errors import MoecptError
from moecpt.storage.atomic import write_json_atomic
from moecpt.storage.lock import FolderLock
from moecpt.storage.outputs import FileLedger, claim_folder, os_error_line, owns
from moecpt.study.config import StudyRecipe
from moecpt.study.evaluation import collect_results, evaluate_stages
from moecpt.study.plan import Stage, plan_stages
from moecpt.study.report import report_files, write_report
from moecpt.study.workers import threads_per_job, worker_init
from moecpt.train.preemption import Preempted, PreemptionWatcher, signal_name
from moecpt.train.trainer import Trainer

__all__ = ["run_study", "run_stages", "worker_pool", "study_inputs", "PLAN_FILE", "DONE_FILE"]

PLAN_FILE = "study_plan.json"
DONE_FILE = "STAGE_DONE.json"


def _run_stage(run_dir: str, recipe_json: dict, parent: str | None, threads: int) -> dict:
    """Worker entry point: one training run (resumes its own checkpoints)."""
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


def run_stages(root: Path, stages: list[Stage], jobs: int, log=print,
               pool: ProcessPoolExecutor | None = None) -> dict[str, dict]:
    """Run every unfinished stage, ``jobs`` at a time, respecting dependencies; returns summaries by key.

    ``pool`` (the study's, of ``jobs`` workers; see :func:`worker_pool`) is used and left running when given, so
    the evaluation after it reuses the started workers; otherwise one is made and shut down here."""
    threads = threads_per_job(jobs)
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
    own_pool = pool is None
    pool = pool or worker_pool(jobs)
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
    if own_pool:
        pool.shutdown()
    bar.close()
    return summaries


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """The study's ``jobs`` worker processes (spawned, each started on first use, dying with the study): one pool
    trains the stages and then evaluates them, so each worker imports torch and moecpt once per study."""
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=worker_init)


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
    if _plan_name(root) not in (None, study.name):  # another study's process got here first
        raise MoecptError(f"--out {str(root)!r} holds a different study ({_plan_name(root)!r}, not "
                          f"{study.name!r}); choose a new --out")
    write_json_atomic(root / PLAN_FILE, {"name": study.name, "recipe": study.model_dump(mode="json")})
    stages = plan_stages(study)
    t0 = time.perf_counter()
    jobs = jobs or min(len(stages), max(1, os.cpu_count() or 1))
    with worker_pool(jobs) as pool:
        summaries = run_stages(root, stages, jobs, log=log, pool=pool)
        log("study: evaluating checkpoints on the held-out splits")
        evaluate_stages(root, study, stages, jobs, pool=pool)
    results = collect_results(root, study, stages, summaries, time.perf_counter() - t0, log=log, jobs=jobs)
    write_report(results, root)
    log(f"study: report written to {root / 'report.md'} (and report.html, study.json)")
    return results
