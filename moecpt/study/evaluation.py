"""The study's evaluation: every final checkpoint (and every CPT parent) on each source's held-out split, CPT runs
compared with their parent on the old source (CRS, CVS, co-activation), in worker processes with a cache under
``DIR/evals``; and the ``results`` dict assembled from the runs' logs and those evaluations (its schema: the records
of :mod:`moecpt.study.results`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from functools import cached_property
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from moecpt.analysis.evaluate import collect, compare_traces, eval_batches_for, routing_summary
from moecpt.analysis.forgetting import summarize_losses
from moecpt.analysis.routing_metrics import coactivation
from moecpt.config import ModelConfig
from moecpt.data.prepared import PreparedData
from moecpt.model.flops import model_stats
from moecpt.storage.atomic import write_json_atomic
from moecpt.study.config import StudyRecipe
from moecpt.study.plan import Stage
from moecpt.study.workers import threads_per_job, worker_init
from moecpt.train.checkpoint import checkpoint_dir_name, load_checkpoint, load_model

__all__ = ["evaluate_stages", "collect_results"]


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
        self.root, self.study = root, study
        self.data = PreparedData.open(study.data.path)
        self.sources = list(study.data.old) + list(study.data.shifts)
        self.cache_dir = root / "evals"
        self.cache_dir.mkdir(exist_ok=True)
        self._traces: dict[str, dict] = {}

    @cached_property
    def batches(self) -> dict:
        """The held-out batches per source; built only when a result is not cached."""
        return eval_batches_for(self.data, self.sources, self.study.data.seq_len, self.study.eval.batch_size,
                                self.study.eval.batches)

    def _key(self, ckpt: Path, extra: str = "") -> Path:
        meta_sha = hashlib.sha256((ckpt / "meta.json").read_bytes()).hexdigest()[:12]
        ident = f"{ckpt.relative_to(self.root)}|{meta_sha}|{self.study.eval.model_dump_json()}|{extra}"
        return self.cache_dir / (hashlib.sha256(ident.encode()).hexdigest()[:16] + ".json")

    def traces(self, ckpt: Path) -> dict:
        key = str(ckpt)
        if key not in self._traces:
            model = load_model(ckpt)
            self._traces[key] = {s: collect(model, b) for s, b in self.batches.items()}
        return self._traces[key]

    def summary(self, ckpt: Path) -> dict:
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

    def _compare_key(self, before: Path, after: Path, source: str) -> Path:
        return self._key(after, f"compare|{before.relative_to(self.root)}|{source}")

    def cached(self, final: Path, parent: Path | None) -> bool:
        """Whether :func:`_eval_worker` would find every result of ``(final, parent)`` in the cache."""
        fin = self._key(final)
        if not fin.exists():
            return False
        if parent is None:
            return True
        if not self._key(parent).exists():
            return False
        old = self.study.data.old[0]
        if "mri_mean" not in json.loads(fin.read_text(encoding="utf-8")).get(old, {}):  # dense: no comparison
            return True
        return self._compare_key(parent, final, old).exists()

    def compare(self, before: Path, after: Path, source: str) -> dict:
        cache = self._compare_key(before, after, source)
        if cache.exists():
            return json.loads(cache.read_text(encoding="utf-8"))
        tb, ta = self.traces(before)[source], self.traces(after)[source]
        out = {"source": source, **compare_traces(tb, ta)}
        if tb.topk_layers and tb.topk_layers[0].shape[1] > 1:  # co-activation needs k > 1
            def co(trace):
                return [[[round(v, 4) for v in row] for row in coactivation(t, trace.num_experts).tolist()]
                        for t in trace.topk_layers]

            out["coactivation_before_layers"], out["coactivation_after_layers"] = co(tb), co(ta)
        write_json_atomic(cache, out)
        return out


def _eval_worker(root: str, study_json: dict, pairs: list[tuple[str, str | None]], threads: int) -> None:
    """Worker: evaluate final checkpoints (and compare each with its CPT parent), filling the eval cache."""
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


def evaluate_stages(root: Path, study: StudyRecipe, stages: list[Stage], jobs: int,
                    pool: ProcessPoolExecutor | None = None) -> int:
    """Evaluate every stage's final checkpoint and CPT parent in ``jobs`` worker processes (one per pre-trained
    model's family of runs, so a parent's traces are computed once per worker), caching under ``DIR/evals``.

    Single-threaded workers side by side use a small CPU better than one multi-threaded process, and do not
    collapse when other programs share the cores. ``pool`` (the study's, whose workers are already started) is
    used when given; a family whose results are all cached starts no worker, so a finished study re-runs its
    evaluation without starting a process.

    Returns: the number of families evaluated (0 when every result was cached)."""
    groups: dict[str, list[tuple[str, str | None]]] = {}
    for st in stages:
        final = st.run_dir(root) / "checkpoints" / checkpoint_dir_name(st.end_step())
        parent = st.parent_checkpoint(root)
        groups.setdefault(st.parent.key if st.parent else st.key, []).append(
            (str(final), str(parent) if parent else None))
    ev = _Evaluator(root, study)
    todo = [pairs for pairs in groups.values()
            if not all(ev.cached(Path(f), Path(p) if p else None) for f, p in pairs)]
    if not todo:
        return 0
    threads = threads_per_job(jobs)
    study_json = study.model_dump(mode="json")
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                                                           initializer=worker_init))
        for fut in [pool.submit(_eval_worker, str(root), study_json, pairs, threads) for pairs in todo]:
            fut.result()
    return len(todo)


def collect_results(root: Path, study: StudyRecipe, stages: list[Stage], summaries: dict[str, dict],
                    wall_time_s: float, log=print, jobs: int | None = None) -> dict[str, Any]:
    """Assemble the ``results`` dict the report is written from (schema: :class:`moecpt.study.results.StudyResults`)."""
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
