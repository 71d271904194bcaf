"""The training loop for pre-training and continual pre-training (CPT).

One :class:`Trainer` runs a recipe into a run folder::

    RUN/run.json            identity of the run (mode, recipe, parent): a folder holding another run is refused
    RUN/config.json         the resolved configuration of the latest start (presets, --set and parent applied)
    RUN/metrics.jsonl       one JSON object per logged step and per validation (cross-entropy only)
    RUN/tokenizer.json      the tokenizer the run was trained with
    RUN/checkpoints/step_N  model (safetensors), optimizer, RNG, data-sampler state, lineage (meta.json)

Distributed runs (``torchrun ... -m moecpt pretrain``, or ``--simulate-workers K`` in one process) train a list of
workers through a sync strategy (DDP, FSDP2, local SGD, SlowMo, DiLoCo) built by the runtime the trainer receives
(``parallel=moecpt.distributed.runtime.Distributed()``, which the CLI passes; the trainer never imports
:mod:`moecpt.distributed`, docs/design.md rule A2); only rank 0 writes ``run.json``, metrics and checkpoints, and
every rank loads them. A single process uses the default :class:`moecpt.train.parallel.SingleProcess` and its
no-op strategy. See ``docs/distributed.md``.

Restarting the same command resumes from the newest complete checkpoint and reproduces the uninterrupted run's
per-step losses bit for bit on CPU (the sampler, RNG and optimizer state are restored; the LR is recomputed from
the schedule, never read back from the optimizer — docs/design.md, rule C3).

CPT (Ibrahim et al. 2024, arXiv 2403.08763; docs/design.md, rule C2) loads the parent's weights (expert biases
included) and optionally its AdamW moments, then starts its own schedule at step 0 and its own data mixture; the
parent's step, LR and sampler are not carried. Its lineage is recorded in ``run.json`` and every checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecpt.config import CheckpointFormat, ModelConfig, Recipe, SyncKind, build_section, dotted_keys, identity_json
from moecpt.data.mixture import MixtureSampler, val_batches
from moecpt.data.prepared import PreparedData
from moecpt.errors import MoecptError
from moecpt.model.flops import model_stats
from moecpt.model.transformer import Transformer, build_model
from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic
from moecpt.storage.lock import FolderLock
from moecpt.storage.outputs import check_claimable, check_outside_inputs, check_writable_parent, claim_folder
from moecpt.storage.preflight import CHECKPOINT_BYTES_PER_PARAM, check_free_disk, check_memory, training_memory_bytes
from moecpt.train.bias_balance import BiasUpdateHook
from moecpt.train.callbacks import CallbackList, ProgressKind, RunInfo, StepResult, progress_callbacks
from moecpt.train.checkpoint import Checkpoint, CheckpointManager, load_checkpoint, restore_rng_state
from moecpt.train.checkpoint_dcp import load_sharded_checkpoint, save_sharded_checkpoint
from moecpt.train.compile import check_compile_backend, compile_module
from moecpt.train.host_memory import retain_freed_memory
from moecpt.train.loss import cross_entropy
from moecpt.train.metrics import JsonlSink, RoutingAccumulator, TensorBoardSink, WandbSink, check_sink_packages
from moecpt.train.parallel import SYNC_KEY, SingleProcess, StepStats, build_worker_optimizer
from moecpt.train.perf import device_peak_flops, mfu, step_memory_metrics
from moecpt.train.plan import memory_plan, run_plan
from moecpt.train.preemption import Preempted, PreemptionWatcher, signal_name
from moecpt.train.reduce import Metric, ReduceType
from moecpt.train.schedules import anneal_start_step, lr_at, run_end_step

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"  # the resolved configuration of the latest start


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device (checked to exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoecptError(f"train.device={name!r} but CUDA is not available here; use train.device='cpu' or 'auto'")
    return dev


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on devices that support it (``auto`` on CUDA, or ``bf16``); fp32 otherwise. ``dtype`` is a
    :class:`moecpt.config.DType` (validated with the recipe)."""
    if uses_bf16(device, dtype):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """Whether a run with ``train.dtype = dtype`` computes in bf16 on ``device`` (see :func:`autocast_context`)."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def cpt_model_config(cfg: ModelConfig, parent_meta: dict[str, Any], parent_path: Path, seq_len: int) -> ModelConfig:
    """The model a CPT run trains: the parent's architecture (``parent_meta["model_config"]``) with the routing
    keys the recipe's ``cfg`` sets (only ``model.moe.router.*``, ``moe.capacity_factor`` and ``moe.dispatch`` may
    change in CPT; docs/design.md, rule C2). Shared by the trainer and ``moecpt plan --from``.

    Raises:
        MoecptError: the parent has no model config; the recipe changes its architecture; ``seq_len`` exceeds the
            parent's ``max_seq_len``.
    """
    raw = parent_meta.get("model_config")
    if not isinstance(raw, dict):
        raise MoecptError(f"--from {str(parent_path)!r} has no model_config in its meta.json; "
                          "it was not written by moecpt pretrain/cpt")
    parent_cfg = build_section(ModelConfig, raw, "parent model_config")
    conflicts = cpt_architecture_conflicts(cfg, parent_cfg)
    if conflicts:
        raise MoecptError(
            f"the CPT recipe sets {'; '.join(conflicts)}; CPT keeps the parent's architecture, so remove "
            "these keys (only model.moe.router.*, moe.capacity_factor and moe.dispatch may change in CPT)")
    if seq_len > parent_cfg.max_seq_len:
        raise MoecptError(
            f"data.seq_len={seq_len} exceeds the parent's max_seq_len="
            f"{parent_cfg.max_seq_len} (--from {str(parent_path)!r}); use data.seq_len <= "
            f"{parent_cfg.max_seq_len}")
    # The architecture comes from the parent; a recipe may change the routing strategy only.
    # Only the keys the recipe sets override the parent's, so an imported family keeps its gate semantics
    # (e.g. Mixtral's renormalised top-k) when a recipe changes just the balancing strategy.
    if cfg.moe is not None and parent_cfg.moe is not None:
        rec_router = cfg.moe.router
        router = parent_cfg.moe.router.model_copy(
            update={k: getattr(rec_router, k) for k in rec_router.model_fields_set})
        moe_update = {k: getattr(cfg.moe, k) for k in ("capacity_factor", "dispatch")
                      if k in cfg.moe.model_fields_set}
        parent_cfg = parent_cfg.model_copy(update={"moe": parent_cfg.moe.model_copy(
            update={"router": router, **moe_update})})
    return parent_cfg


@contextlib.contextmanager
def deterministic_on_cpu(device: torch.device):
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` while the block runs on a CPU device; the
    previous setting is restored on exit (no global state leaks out of the trainer)."""
    if device.type != "cpu":
        yield
        return
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, computed in fp32. ``logits [B, T, V]``, ``targets [B, T]``."""
    return cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())


def token_losses(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy in nats, fp32, ``[B * T]`` (no gradient path needed: evaluation).
    Summing these in float64 gives a mean that does not depend on how the tokens were batched."""
    logp = torch.log_softmax(logits_BTV.float().flatten(0, 1), dim=-1)
    return -logp.gather(1, targets_BT.reshape(-1, 1)).squeeze(1)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: ``(section, key)`` of the recipe keys that say how a run is laid out over ranks, never what it computes (as the
#: world size, which no recipe holds): left out of a run's identity, so that the same run resumes at another layout.
#: Expert parallelism changes where the experts compute, not what (``moecpt.distributed.ep_sync``; equal to one
#: process to fp32 reduction order), and its DCP checkpoints reshard to any EP degree (tests/test_ep_dcp.py).
LAYOUT_KEYS = (("distributed", "expert_parallel"),)


_SHARDED_SIMULATED = ("{path} is a sharded (DCP) checkpoint; simulated workers resume single-file checkpoints "
                      "only: run `moecpt checkpoint consolidate` first")


def _without_layout(recipe_json: dict[str, Any]) -> dict[str, Any]:
    """``identity_json``'s recipe without :data:`LAYOUT_KEYS`."""
    out = dict(recipe_json)
    for section, key in LAYOUT_KEYS:
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def _legacy_without_layout(identity: Any) -> Any:
    """A run.json identity written before :data:`LAYOUT_KEYS` left it, as this version writes it."""
    if not isinstance(identity, dict) or not isinstance(identity.get("recipe"), dict):
        return identity
    return {**identity, "recipe": _without_layout(identity["recipe"])}


@dataclass
class Parent:
    """The checkpoint a CPT run starts from."""

    path: Path
    step: int
    meta: dict


@dataclass
class TrainState:
    """Everything that changes while a run trains (built by ``Trainer._start_or_resume``)."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    sync: Any  # a moecpt.train.parallel.SingleSync (or a moecpt.distributed strategy)
    sampler: Any  # a moecpt.data.mixture.MixtureSampler
    end_step: int
    step: int = 0  # optimizer steps done
    start_step: int = 0  # where this process started (resumed runs: the checkpoint's step)
    tokens: int = 0
    skips: int = 0
    sync_state: Any = None  # the strategy's own part of a resumed optimizer state
    checkpoint_format: CheckpointFormat = CheckpointFormat.SINGLE  # the layout this run writes (resolved)
    resume_sharded: Checkpoint | None = None  # a DCP checkpoint to load once the workers are wrapped (resharding)
    workers: list[Any] = field(default_factory=list)
    evals: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    micro: int = 1
    peak_flops: float | None = None  # one device's peak FLOP/s for MFU (moecpt.train.perf); None: unknown
    bias_hooks: list[Any] = field(default_factory=list)  # one BiasUpdateHook per worker with bias routers
    info: RunInfo | None = None
    callbacks: CallbackList = field(default_factory=lambda: CallbackList([]))


class Trainer:
    """Runs one recipe (pre-training, or CPT when ``parent`` is given) into ``out_dir``.

    Args:
        recipe: validated :class:`moecpt.config.Recipe`.
        out_dir: run folder (created; resumed when it holds this same run).
        parent: CPT parent checkpoint (folder of a checkpoint or a run folder), or None for pre-training.
        show_progress: ``True`` = :attr:`ProgressKind.AUTO` (a bar on a terminal, plain lines elsewhere),
            ``False`` = none, or a :class:`~moecpt.train.callbacks.ProgressKind`.
        callbacks: more :class:`~moecpt.train.callbacks.Callback` objects (rank 0 only), called after the sinks
            and the progress display.
        simulate_workers: run this many data-parallel workers in this one process (``--simulate-workers``).
        outer_optimizer: local-SGD family only: replaces ``distributed.outer_optimizer`` with a
            :class:`moecpt.lopt.OuterOptimizer` or a factory ``params -> torch.optim.Optimizer``.
        parallel: the runtime (rank, set-up collectives, sync strategy; :mod:`moecpt.train.parallel`). Default
            :class:`~moecpt.train.parallel.SingleProcess`: one process, no ``moecpt.distributed`` import. Pass
            ``moecpt.distributed.runtime.Distributed()`` for ``torchrun`` jobs, ``simulate_workers`` and the
            local-SGD family (``moecpt pretrain`` / ``moecpt cpt`` always do).
        dry_run: validate everything :meth:`run` would (recipe, data, parent, folder, memory) without creating or
            claiming ``out_dir``; then call :meth:`plan` instead of :meth:`run`.

    Raises:
        MoecptError: the folder holds another run, the parent is missing/corrupt/incompatible, data problems,
            or a non-finite loss (naming the step; the last good checkpoint is kept).
    """

    def __init__(self, recipe: Recipe, out_dir: str | Path, parent: str | Path | None = None,
                 show_progress: bool | ProgressKind = True, simulate_workers: int | None = None,
                 outer_optimizer: Any = None, callbacks: list[Any] | None = None, parallel: Any = None,
                 dry_run: bool = False):
        self.recipe = recipe
        self.out_dir = Path(out_dir)
        self.parallel = parallel if parallel is not None else SingleProcess()
        self.dist = self.parallel.info()  # rank / world size of a torchrun job (world size 1 otherwise)
        if isinstance(show_progress, bool):
            show_progress = ProgressKind.AUTO if show_progress else ProgressKind.NONE
        self.progress = ProgressKind(show_progress)
        self.extra_callbacks = list(callbacks or [])
        self.simulate_workers = simulate_workers
        self.outer_optimizer = outer_optimizer
        self.device = resolve_device(recipe.train.device)
        self.parent: Parent | None = None
        if parent is not None:
            if not Path(parent).exists():
                raise MoecptError(f"--from {str(parent)!r} does not exist; give a checkpoint or run folder")
            ck = load_checkpoint(parent)
            self.parent = Parent(path=ck.path.resolve(), step=ck.step, meta=ck.meta)
            self._parent_ckpt = ck
        self.data = PreparedData.open(recipe.data.path)
        self.model_cfg = self._resolve_model_config()
        self.mode = "cpt" if self.parent else "pretrain"
        self.identity = {
            "mode": self.mode,
            "recipe": _without_layout(identity_json(recipe)),
            # the parent by content (step + weights hash), not by path: a study or run tree that is moved or
            # copied as a whole still resumes; another parent is still refused. run.json's lineage keeps the path.
            "parent": self._parent_identity(),
            "data_tokenizer_sha256": self.data.tokenizer_sha256,
        }
        # every rank of a job must run the same thing, laid out the same way (a no-op in one process)
        self.parallel.check_same_config({**self.identity, "recipe": identity_json(recipe)})
        # before claiming the folder: a recipe that cannot run must not leave a run.json behind (the checks
        # `moecpt plan` runs too: one function, the runtime's)
        self.parallel.check_launch(recipe, self.dist, simulate_workers, outer_optimizer)
        self._check_data()
        self._preflight()
        self._lock: FolderLock | None = None
        self.dry_run = dry_run
        self.ckpts = CheckpointManager(self.out_dir, keep_last=recipe.train.keep_last,
                                       keep_steps=self._milestones())
        # the strategy, built before the folder is claimed: a resume it refuses (another number of workers, islands,
        # island_sync, EP degree) must be refused before anything in the run folder changes
        self._sync = self.parallel.build_sync(recipe, self.dist, self.device, simulate_workers, outer_optimizer)
        self.parallel.run_on_main(self._check_resume)
        if dry_run:  # the folder's checks, writing nothing: --out is neither created nor locked
            self.parallel.run_on_main(self._check_claimable)
        else:
            self.parallel.run_on_main(self._claim_run_folder)  # rank 0 writes and locks; refusals raise on every rank

    # -------------------------------------------------------------------------------------------- set-up helpers
    def _parent_identity(self) -> dict[str, Any] | None:
        if self.parent is None:
            return None
        return {"step": self.parent.step, "run_name": self.parent.meta.get("run_name"),
                "model_sha256": self._parent_ckpt.content_sha256}

    def _resolve_checkpoint_format(self, sync) -> CheckpointFormat:
        """``auto`` -> ``dcp`` when the strategy shards the state over ranks (FSDP2, expert parallelism), else
        ``single``."""
        fmt = self.recipe.train.checkpoint_format
        if fmt == CheckpointFormat.AUTO:
            return CheckpointFormat.DCP if sync.shards_state else CheckpointFormat.SINGLE
        if fmt == CheckpointFormat.DCP and not sync.dcp_capable:
            raise MoecptError(f"train.checkpoint_format = 'dcp' does not apply to sync {sync.kind!r}; use 'auto' or "
                              "'single'")
        return fmt

    def _resolve_model_config(self):
        cfg = self.recipe.model
        if self.parent is not None:
            parent_cfg = cpt_model_config(cfg, self.parent.meta, self.parent.path, self.recipe.data.seq_len)
            parent_tok = self.parent.meta.get("tokenizer_sha256")
            if self.data.vocab_size > parent_cfg.vocab_size or (
                    parent_tok is not None and parent_tok != self.data.tokenizer_sha256):
                raise MoecptError(
                    f"the CPT data's tokenizer ({self.data.vocab_size} tokens, sha256 "
                    f"{self.data.tokenizer_sha256[:12]}) is not the parent's ({parent_cfg.vocab_size} tokens, sha256 "
                    f"{str(parent_tok)[:12]}); prepare the CPT data with the parent's tokenizer "
                    "(--tokenizer PARENT_RUN/tokenizer.json)"
                )
            return parent_cfg
        if "model" not in self.recipe.model_fields_set:
            raise MoecptError("the recipe has no [model] table, so there is nothing to pre-train; add one, e.g. "
                              "[model] preset = \"smoke-granular\" (see `moecpt inspect --preset NAME`)")
        if cfg.vocab_size is None:
            cfg = cfg.model_copy(update={"vocab_size": self.data.vocab_size})
        elif cfg.vocab_size < self.data.vocab_size:
            raise MoecptError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                              f"{self.data.vocab_size}; remove model.vocab_size to take it from the data")
        if self.recipe.data.seq_len > cfg.max_seq_len:
            raise MoecptError(f"data.seq_len={self.recipe.data.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        return cfg

    def _check_data(self) -> None:
        """Build the sampler and held-out batches once, so that data errors (unknown source, too little data)
        surface before anything is written."""
        self._make_sampler()
        self._make_evals()

    def _make_sampler(self):
        r, tcfg = self.recipe, self.recipe.train
        return MixtureSampler(self.data, r.data.mixture, r.data.seq_len, tcfg.batch_size, seed=tcfg.seed,
                              rank=self.dist.rank, world_size=self.dist.world_size, allow_repeat=r.data.allow_repeat,
                              total_steps=run_end_step(r.schedule, tcfg.steps))

    def _make_evals(self) -> dict[str, list[torch.Tensor]]:
        r, tcfg = self.recipe, self.recipe.train
        eval_sources = r.data.eval_sources or self.data.source_names
        # a fixed layout: train.eval_batches batches of train.batch_size windows, whatever the micro-batching (the
        # forward passes are cut to micro-batches in _evaluate, which only changes the memory it takes)
        return {s: val_batches(self.data, s, r.data.seq_len, tcfg.batch_size, tcfg.eval_batches)
                for s in eval_sources}

    def _milestones(self) -> list[int]:
        steps = list(self.recipe.train.extra_checkpoints)
        a = anneal_start_step(self.recipe.schedule, self.recipe.train.steps)
        if a is not None:
            steps.append(a)  # the pre-anneal checkpoint CPT from an infinite schedule starts from
        return steps

    def _inputs(self) -> list[Path]:
        """What this run reads (the run folder may be none of them, nor lie inside one)."""
        found = [] if self.recipe.data.path == "demo" else [self.data.path]
        if self.parent is not None:
            ck = self.parent.path
            found.append(ck.parent.parent if ck.parent.name == "checkpoints" else ck)
        return found

    def _preflight(self) -> None:
        """Fail in one line before anything is written: free disk for one checkpoint, memory for training, and
        (on the first start) a writable --out."""
        check_outside_inputs(self.out_dir, self._inputs())
        if not (self.out_dir / RUN_FILE).exists():
            check_writable_parent(self.out_dir)
        tcfg = self.recipe.train
        if tcfg.compile:
            check_compile_backend(self.device)
        check_sink_packages(tcfg.tensorboard, tcfg.wandb)
        self._stats = model_stats(self.model_cfg, self.recipe.data.seq_len)
        params = self._params = int(self._stats["total_params"])
        workers = self.simulate_workers or 1
        micro = min(tcfg.micro_batch_size or tcfg.batch_size, tcfg.batch_size)
        resident = params // self.dist.world_size if self.recipe.distributed.sync == SyncKind.FSDP else params
        need = training_memory_bytes(resident, micro, self.recipe.data.seq_len, self.model_cfg.vocab_size, workers)
        check_memory(need, self.device.type, f"training this {params / 1e6:,.1f}M-parameter model",
                     self.device.index)
        check_free_disk(self.out_dir, CHECKPOINT_BYTES_PER_PARAM * params * workers, "one checkpoint of this run")

    def _claim_run_folder(self) -> None:
        run_file = self.out_dir / RUN_FILE
        fp = _fingerprint(self.identity)
        self._check_identity(run_file, fp)  # a refused run changes nothing in the folder, not even the lock note
        # runs written before output markers existed are proven by their run.json
        claim_folder(self.out_dir, "train", self._inputs(), legacy=lambda d: (d / RUN_FILE).is_file())
        self._lock = FolderLock(self.out_dir, self.mode).acquire()
        try:
            if not self._check_identity(run_file, fp):  # checked again: the folder is ours only now
                self._write_identity(run_file, fp)
            write_json_atomic(self.out_dir / CONFIG_FILE, self.resolved_config())  # this start's settings
        except BaseException:
            self.release()
            raise

    def _check_resume(self) -> None:
        """Rank 0, before anything is written into the run folder: refuse in one line a resume of this run that
        would be refused once the folder is claimed (``config.json`` rewritten, ``metrics.jsonl`` truncated): a
        strategy state of another layout (the strategy's own ``check_resume``, which :meth:`setup` calls again), a
        sharded checkpoint for simulated workers, a sampler state of other data. Reads the newest complete
        checkpoint's meta and its strategy state only (tensors memory-mapped); a damaged checkpoint is left to the
        resume, which moves it aside (:meth:`_intact_latest`). Another run's folder is refused first, as
        :meth:`_claim_run_folder` would."""
        if not self._check_identity(self.out_dir / RUN_FILE, _fingerprint(self.identity)):
            return  # no run here yet: nothing to resume
        found = self.ckpts.all()  # look only: temp folders are cleaned once the folder is ours
        if not found:
            return
        try:
            ck = load_checkpoint(found[-1], verify=False)
            state = ck.optimizer_entry(SYNC_KEY)
        except MoecptError:
            return
        if ck.sharded and self._sync.local_workers != 1:
            raise MoecptError(_SHARDED_SIMULATED.format(path=ck.path))
        self._sync.check_resume(state)
        if ck.meta.get("sampler") is not None:
            self._make_sampler().load_state_dict(ck.meta["sampler"])

    def _check_claimable(self) -> None:
        """:meth:`_claim_run_folder`'s refusals, writing nothing (a dry run)."""
        self._check_identity(self.out_dir / RUN_FILE, _fingerprint(self.identity))
        check_claimable(self.out_dir, "train", self._inputs(), legacy=lambda d: (d / RUN_FILE).is_file())

    def resolved_config(self) -> dict[str, Any]:
        """The configuration this start runs with, after presets, ``--set`` and (CPT) the parent's architecture:
        ``{"mode", "recipe", "model", "parent"}``, as saved in ``RUN/config.json`` at every start."""
        return {"mode": self.mode, "recipe": self.recipe.model_dump(mode="json"),
                "model": self.model_cfg.model_dump(mode="json"),
                "parent": str(self.parent.path) if self.parent else None}

    def compact_config(self) -> str:
        """One line of the resolved configuration's keys that differ from their defaults (``train.steps=40 ...``;
        the model's as resolved, e.g. a CPT parent's), for the start of a run; the full one is ``RUN/config.json``."""
        raw = self.recipe.model_dump(mode="json", exclude_defaults=True)
        raw["model"] = self.model_cfg.model_dump(mode="json", exclude_defaults=True)
        return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in dotted_keys(raw).items())

    def release(self) -> None:
        """Give up the run folder's lock (done by :meth:`run` on exit; only for a Trainer that is never run)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_identity(self, run_file: Path, fp: str) -> bool:
        """Whether ``run_file`` holds this very run (False: no run yet); MoecptError when it holds another."""
        if not run_file.exists():
            return False
        try:
            existing = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise MoecptError(f"{run_file} is unreadable; this folder is damaged — choose a new --out") from None
        # runs made before the layout keys left the identity hashed them: the same run without them is this run
        if existing.get("fingerprint") != fp and _fingerprint(_legacy_without_layout(existing.get("identity"))) != fp:
            diff = _describe_differences(existing.get("identity", {}), self.identity)
            raise MoecptError(f"--out {str(self.out_dir)!r} holds another run ({diff}); choose a new --out "
                              "or delete that folder yourself")
        return True

    def _write_identity(self, run_file: Path, fp: str) -> None:
        lineage = None
        if self.parent is not None:
            lineage = {"parent_checkpoint": str(self.parent.path), "parent_step": self.parent.step,
                       "parent_run": self.parent.meta.get("run_name"),
                       "parent_lineage": self.parent.meta.get("lineage")}
        write_json_atomic(run_file, {"fingerprint": fp, "identity": self.identity, "lineage": lineage,
                                     "model_config": self.model_cfg.model_dump(mode="json"),
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_bytes_atomic(self.out_dir / "tokenizer.json", (self.data.path / "tokenizer.json").read_bytes())

    # ---------------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train until the schedule's end (or its pre-anneal stop); returns a summary dict.

        On CPU the run uses PyTorch's deterministic algorithms (restored afterwards), so that no op picks a
        thread-order-dependent reduction and a resumed run matches an uninterrupted one bit for bit (the grouped MoE
        dispatch only gathers anyway; the ``loop`` reference dispatch scatter-adds). On CPU it also makes ``malloc``
        keep freed memory for reuse (:func:`moecpt.train.host_memory.retain_freed_memory`; opt out with
        ``MOECPT_MALLOC_TUNING=0``).
        """
        if self.dry_run:
            raise MoecptError("this Trainer was made with dry_run=True, which never trains; call plan()")
        try:
            with self._process_settings(), PreemptionWatcher() as self._preempt:
                if not self.dist.distributed:
                    return self._run()
                return self._run_rank()
        finally:
            self.release()

    @contextlib.contextmanager
    def _process_settings(self):
        """``train.threads``, deterministic CPU algorithms and the CPU allocator setting, for the block."""
        if self.device.type == "cpu":
            retain_freed_memory()
        threads = torch.get_num_threads()
        if self.recipe.train.threads:
            torch.set_num_threads(self.recipe.train.threads)
        try:
            with deterministic_on_cpu(self.device):
                yield
        finally:
            torch.set_num_threads(threads)

    def plan(self, timed_steps: int = 3) -> dict[str, Any]:
        """The run's plan (:mod:`moecpt.train.plan`): parameters, memory, steps, tokens, FLOPs, and a time estimate
        from ``timed_steps`` optimizer steps of a throwaway copy (a fresh model, or the parent's weights for CPT;
        nothing is saved, and the run folder is not touched). Any Trainer may plan; ``dry_run=True`` makes one that
        never claims its folder.

        Raises:
            MoecptError: ``timed_steps`` below 1, or what the timed steps raise (memory, a non-finite loss).
        """
        if timed_steps < 1:
            raise MoecptError(f"timed_steps={timed_steps}; time at least one step")
        found = self.ckpts.all()  # look only
        start = int(found[-1].name.split("_")[-1]) if found else 0
        with self._process_settings():
            state, times = self._timed_steps(timed_steps)
        tcfg = self.recipe.train
        memory = memory_plan(self.recipe, self.model_cfg, self._params, state.micro, len(state.workers),
                             self.dist.world_size, uses_bf16(self.device, tcfg.dtype))
        return {"run_dir": str(self.out_dir), "mode": self.mode, "resumes_from_step": start if found else None,
                **run_plan(self.recipe, self._stats, memory, start, state.end_step, times, state.peak_flops,
                           self.dist.world_size),
                "config": self.compact_config()}

    def _timed_steps(self, n: int) -> tuple["TrainState", list[float]]:
        """``n`` optimizer steps of a throwaway state (no callbacks, no checkpoint); their wall seconds."""
        r, tcfg = self.recipe, self.recipe.train
        torch.manual_seed(tcfg.seed)
        model = build_model(self.model_cfg, device=self.device)
        optimizer = build_worker_optimizer(model, r, self.device)
        if self.parent is not None:
            self._load_parent(model, optimizer)
        # a dry-run Trainer never trains, so its strategy (built at start-up, with its process groups) serves the
        # throwaway steps; any other Trainer keeps its own for run()
        sync = self._sync if self.dry_run else self.parallel.build_sync(r, self.dist, self.device,
                                                                        self.simulate_workers, self.outer_optimizer)
        state = TrainState(model=model, optimizer=optimizer, sync=sync, sampler=self._make_sampler(),
                           end_step=run_end_step(r.schedule, tcfg.steps))
        self._prepare_workers(state)
        return state, [self._train_step(state).step_time_s for _ in range(n)]

    def _run_rank(self) -> dict[str, Any]:
        """One rank of a job: a lost peer or a collective timeout becomes a MoecptError naming the rank(s) that
        stopped (the runtime's ``diagnose``, e.g. :func:`moecpt.distributed.launch.diagnose`); this rank's own fatal
        error is published for the others to quote."""
        rt = self.parallel
        try:
            return self._run()
        except MoecptError as exc:
            rt.publish_error(str(exc))
            raise
        except Exception as exc:
            if not rt.is_distributed_error(exc):
                rt.publish_error(f"{type(exc).__name__}: {exc}")
                raise
            found = self.ckpts.all()  # look only: another rank may be writing
            raise MoecptError(
                f"rank {self.dist.rank} of {self.dist.world_size} stops: {rt.diagnose()} (collective error: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}). The last "
                f"complete checkpoint is {found[-1] if found else 'none'}; run the same command again to resume "
                "from it") from None

    def _run(self) -> dict[str, Any]:
        """Start or resume, then the loop: a step, its bookkeeping (eval, checkpoint, pre-emption), repeat."""
        state = self._start_or_resume()
        if state.step >= state.end_step:
            return self._summary(state.step, state.tokens, state.skips, resumed=True)
        self._prepare_workers(state)
        cb = state.callbacks
        try:
            cb.on_run_start(state.info)
            if state.step == 0:
                self._evaluate(state, 0)
            while state.step < state.end_step:
                result = self._train_step(state)
                stop = self._after_step(state, result)
                if stop and state.step < state.end_step:
                    raise Preempted(f"pre-empted by {signal_name(stop)} after step {state.step}: saved "
                                    f"{self.ckpts.path_for(state.step)}; run the same command again to resume", stop)
            comm = state.sync.summary(state.tokens)
            if comm is not None:
                self._emit(state, {"step": state.end_step, "tokens": state.tokens, "event": "comm_summary", **comm})
            summary = self._summary(state.end_step, state.tokens, state.skips, resumed=state.start_step > 0)
            if comm is not None:
                summary["comm"] = comm
            cb.on_run_end(summary)
            return summary
        finally:
            cb.close()

    # -------------------------------------------------------------------------------------------- the loop parts
    def _start_or_resume(self) -> "TrainState":
        """Model, optimizer, sync strategy, sampler and callbacks; the newest intact checkpoint of this run loaded
        (weights, moments, sampler, RNG, counters), or for a new CPT run the parent's weights."""
        r, tcfg = self.recipe, self.recipe.train
        torch.manual_seed(tcfg.seed)
        model = build_model(self.model_cfg, device=self.device)
        model.set_activation_checkpointing(tcfg.activation_checkpointing)  # before any compile / FSDP wrapping
        optimizer = build_worker_optimizer(model, r, self.device)
        sync = self._sync  # built (and the resume checked against it) before the folder was claimed
        state = TrainState(model=model, optimizer=optimizer, sync=sync, sampler=self._make_sampler(),
                           end_step=run_end_step(r.schedule, tcfg.steps),
                           checkpoint_format=self._resolve_checkpoint_format(sync))
        jsonl = JsonlSink(self.out_dir / "metrics.jsonl") if self.dist.is_main else None
        # rank 0 picks the checkpoint (and cleans stale temp folders); every rank loads the same one
        verified = self._intact_latest() if self.dist.is_main else None
        latest = self.parallel.broadcast_object(verified.path if verified is not None else None)
        if latest is not None:  # resume our own run
            # rank 0 has just checked every hash; the other ranks check sizes only (a DCP checkpoint would otherwise
            # be read whole by every rank)
            ck = verified if verified is not None else load_checkpoint(latest, verify=False)
            if ck.sharded:  # loaded into the wrapped model by _prepare_workers: each rank reads only its shards
                state.resume_sharded = ck
                state.sync_state = (ck.optimizer_rest() or {}).get(SYNC_KEY)
            else:
                ck.load_into(model)  # streamed: the model is not held twice
                opt_state = ck.optimizer_state()
                if opt_state is not None:
                    state.sync_state = opt_state.get(SYNC_KEY)  # the strategy's own part (outer state, other workers')
                    optimizer.load_state_dict(opt_state)
            state.sampler.load_state_dict(ck.meta["sampler"])
            state.step, state.tokens, state.skips = ck.step, ck.meta["tokens"], ck.meta.get("skipped_steps", 0)
            rng = ck.rng_state()
            if rng is not None:
                restore_rng_state(sync.select_rng(rng))
            sync.load_meta(ck.meta)
        elif self.parent is not None:  # CPT: weights (and optionally moments) from the parent, nothing else
            self._load_parent(model, optimizer)
        state.start_step = state.step
        if jsonl is not None:
            # killed before its first checkpoint (step 0): the run starts over, so does its log
            jsonl.truncate_after(state.step if latest is not None else -1)
        state.info = RunInfo(mode=self.mode, name=r.name, out_dir=self.out_dir, start_step=state.start_step,
                             end_step=state.end_step, tokens_per_step=tcfg.batch_size * r.data.seq_len,
                             config=r.model_dump(mode="json"), config_line=self.compact_config())
        state.callbacks = CallbackList(self._callbacks(jsonl, state) if self.dist.is_main else [])
        return state

    def _callbacks(self, jsonl: JsonlSink, state: "TrainState") -> list[Any]:
        """Rank 0's callbacks: the metric sinks the recipe asks for, then the progress display, then the caller's."""
        tcfg = self.recipe.train
        cbs: list[Any] = [jsonl]
        if tcfg.tensorboard:
            cbs.append(TensorBoardSink(self.out_dir / "tensorboard", purge_after=state.step if state.step else None))
        if tcfg.wandb:
            cbs.append(WandbSink(self.out_dir, tcfg.wandb_project, self.recipe.name,
                                 run_id=_fingerprint(self.identity), mode=tcfg.wandb_mode,
                                 config=self.recipe.model_dump(mode="json")))
        cbs += progress_callbacks(self.progress, self._params, tcfg.log_lines_every)
        return cbs + list(self.extra_callbacks)

    def _prepare_workers(self, state: "TrainState") -> None:
        tcfg = self.recipe.train
        sync = state.sync
        state.workers = sync.setup(state.model, state.optimizer,
                                   lambda m: build_worker_optimizer(m, self.recipe, self.device), state.sync_state)
        if state.resume_sharded is not None:  # a collective: resharded to this run's world size
            if len(state.workers) != 1:
                raise MoecptError(_SHARDED_SIMULATED.format(path=state.resume_sharded.path))
            load_sharded_checkpoint(state.resume_sharded, state.workers[0].model, state.workers[0].optimizer,
                                    global_view=sync.dcp_global_view)
            sync.after_sharded_load(state.workers)
        for w in state.workers:
            w.forward = compile_module(w.module, self.device) if tcfg.compile else w.module
        hooks = [BiasUpdateHook.attach(w.model, w.optimizer) for w in state.workers]
        state.bias_hooks = [h for h in hooks if h is not None]
        state.model = state.workers[0].model
        state.evals = self._make_evals()
        state.peak_flops = device_peak_flops(self.device, uses_bf16(self.device, tcfg.dtype))  # after train.threads
        rows = sync.local_batch_rows(tcfg.batch_size)  # rows of the global batch each worker trains on
        state.micro = min(tcfg.micro_batch_size or rows, rows)
        if rows % state.micro:
            raise MoecptError(f"train.micro_batch_size={state.micro} does not divide the {rows} sequences each of "
                              f"the {sync.num_workers} workers trains on per step; choose a divisor of {rows}")

    def _train_step(self, state: "TrainState") -> StepResult:
        """One optimizer step of every worker (or a skipped non-finite one); advances ``state.step``."""
        r, tcfg, sync, workers = self.recipe, self.recipe.train, state.sync, state.workers
        t0 = time.perf_counter()
        sync.begin_step()
        lr = lr_at(state.step, r.schedule, r.optim, tcfg.steps)
        for w in workers:
            for group in w.optimizer.param_groups:
                group["lr"] = lr
        batch = state.sampler.next_batch().to(self.device, non_blocking=True)
        parts = sync.split_batch(batch)
        local = [self._forward_backward(w, part, state.micro, sync) for w, part in zip(workers, parts)]
        sync.after_backward(workers)
        done = state.step + 1  # steps are numbered 1.. in metrics.jsonl, checkpoints and messages
        log = done % tcfg.log_every == 0 or done == state.end_step
        stats = [StepStats({"loss": Metric(c, ReduceType.MEAN), "aux_loss": Metric(a, ReduceType.MEAN),
                            **(step_memory_metrics(self.device) if log else {})}, routing) for c, a, routing in local]
        scalars, loads, acc = sync.reduce_step(workers, stats, log)
        ce_mean, aux_mean = scalars["loss"], scalars["aux_loss"]
        # every-step modes decide on the reduced loss (all ranks agree); local-SGD workers on their own
        grad_norms = [sync.grad_norm(w.model, r.optim.grad_clip)
                      if math.isfinite(ce_mean + aux_mean if sync.every_step else c + a) else None
                      for w, (c, a, _) in zip(workers, local)]
        grad_norm = grad_norms[0]
        # an overflowing gradient can come with a finite loss: it would write NaN into the weights (and the next
        # checkpoint), so it counts as non-finite too
        finite = all(gn is not None and math.isfinite(gn) for gn in grad_norms)
        step_tokens = tcfg.batch_size * r.data.seq_len  # input tokens of this step, all workers
        state.step, state.tokens = done, state.tokens + step_tokens
        if not finite:
            self._skip_nonfinite(state, ce_mean, aux_mean, grad_norm)
            return StepResult(step=done, end_step=state.end_step, tokens=state.tokens, loss=ce_mean, lr=lr,
                              step_time_s=time.perf_counter() - t0, skipped=True)
        for hook in state.bias_hooks:
            hook.loads = loads  # the optimizer's post-step hook moves the biases (moecpt.train.bias_balance)
        for w in workers:
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
        bias_stats = state.bias_hooks[0].stats if state.bias_hooks else {}
        dt = time.perf_counter() - t0
        record = None
        if log:
            record = {"step": done, "tokens": state.tokens, "lr": lr, "loss": ce_mean, "aux_loss": aux_mean,
                      "grad_norm": grad_norm, "tokens_per_s": step_tokens / dt if dt > 0 else None,
                      "step_time_s": dt, **self._perf_fields(state, scalars, step_tokens / dt if dt > 0 else None),
                      **acc.summary(), **bias_stats}
            record.setdefault("mri_mean", None)
        return StepResult(step=done, end_step=state.end_step, tokens=state.tokens, loss=ce_mean, lr=lr,
                          step_time_s=dt, record=record)

    def _perf_fields(self, state: "TrainState", scalars: dict[str, float], tokens_per_s: float | None
                     ) -> dict[str, Any]:
        """A logged step's MFU (:mod:`moecpt.train.perf`; ``None`` where the device's peak is unknown), peak memory
        (bytes, the largest rank's) and cumulative training tokens per mixture source (all ranks; they sum to
        ``tokens``)."""
        peak = scalars.get("peak_memory_bytes")
        return {"mfu": mfu(float(self._stats["train_flops_per_token"]), tokens_per_s, state.peak_flops,
                           self.dist.world_size),
                "peak_memory_bytes": None if peak is None else int(peak),
                "tokens_per_source": state.sampler.tokens_consumed()}

    def _skip_nonfinite(self, state: "TrainState", ce: float, aux: float, grad_norm: float | None) -> None:
        """A non-finite step: no update (the batch is consumed and the step's bookkeeping still happens, so the
        run ends with its final checkpoint as usual), or a one-line stop naming the last good checkpoint."""
        tcfg = self.recipe.train
        for w in state.workers:
            w.optimizer.zero_grad(set_to_none=True)
            for router in w.model.routers():
                router.reset_step_load()
        if not (tcfg.skip_nonfinite and state.skips < tcfg.max_skips):
            last = self._latest_checkpoint()
            raise MoecptError(
                f"non-finite loss or gradient (loss {ce}, grad norm {grad_norm}) at step {state.step}; the last good "
                f"checkpoint is {last if last else 'none (no checkpoint yet)'}; lower optim.lr or set "
                "train.skip_nonfinite = true to skip such batches")
        state.skips += 1
        self._emit(state, {"step": state.step, "tokens": state.tokens, "event": "skipped_nonfinite", "loss": ce,
                           "aux_loss": aux, "grad_norm": grad_norm, "skipped_steps": state.skips})

    def _after_step(self, state: "TrainState", result: StepResult) -> int:
        """The step's bookkeeping, each on its own cadence: the communication round, its record, evaluation,
        checkpoint; returns the pre-emption signal to stop on (0 = go on)."""
        tcfg, done = self.recipe.train, state.step
        evaluate = done % tcfg.eval_every == 0 or done == state.end_step
        save = done % tcfg.checkpoint_every == 0 or done == state.end_step or done in self.ckpts.keep_steps
        # pre-emption is agreed on at communication boundaries only (a collective in a multi-rank job)
        stop = 0
        if done % self.recipe.distributed.local_steps == 0 or save:
            stop = self._preempt.poll(self.dist.distributed, self.device)
        save = save or bool(stop)
        # local-SGD family: a communication round every H steps, and before an evaluation or checkpoint
        state.sync.after_optimizer_step(state.workers, done, boundary=evaluate or save)
        if result.record is not None:
            self._emit(state, result.record)
        state.callbacks.on_step_end(result)
        if evaluate:
            self._evaluate(state, done)
        if save:
            self._save(state, done)
        return stop

    def _save(self, state: "TrainState", done: int) -> None:
        """Checkpoint after step ``done`` in the run's layout (a collective); rank 0 prunes and reports it."""
        meta = {**self._meta(done, state.tokens, state.skips, state.sampler), **state.sync.meta()} \
            if self.dist.is_main else None
        if state.checkpoint_format == CheckpointFormat.DCP:  # every rank writes its shard
            model, optimizer, rng_state, extra = state.sync.sharded_checkpoint_state(state.workers)
            path = save_sharded_checkpoint(self.ckpts.path_for(done), model=model, optimizer=optimizer, meta=meta,
                                           rng_state=rng_state, optimizer_extra=extra,
                                           global_view=state.sync.dcp_global_view)
            if self.dist.is_main:
                self.ckpts.prune(protect=done)
        else:
            model_state, opt_state, rng_state = state.sync.checkpoint_state(state.workers)  # a collective
            if self.dist.is_main:
                path = self.ckpts.save(done, model_state=model_state, optimizer_state=opt_state, rng_state=rng_state,
                                       meta=meta)
        if self.dist.is_main:
            state.callbacks.on_checkpoint(done, path)

    def _emit(self, state: "TrainState", record: dict[str, Any]) -> None:
        """Hand a metrics record to the sinks (rank 0), with the cumulative communication counters when the sync
        strategy reports them."""
        if state.sync.reports:
            record = {**record, **state.sync.record_fields()}
        state.callbacks.on_record(record)

    def _forward_backward(self, w, batch: torch.Tensor, micro: int, sync) -> tuple[float, float, RoutingAccumulator]:
        """Forward and backward of one worker's rows, in micro-batches; returns (mean CE, mean aux, routing)."""
        tcfg = self.recipe.train
        w.model.train()
        acc = RoutingAccumulator()
        ce_sum = aux_sum = torch.zeros((), device=batch.device, dtype=torch.float32)  # one host sync per step
        parts = batch.split(micro)
        n_micro = len(parts)
        for i, mb in enumerate(parts):
            with sync.grad_sync(w, last=i == n_micro - 1):  # DDP / FSDP2 synchronise on the last micro-batch
                with autocast_context(self.device, tcfg.dtype):
                    logits, routing = w.forward(mb[:, :-1], return_routing=True)
                    ce = lm_loss(logits, mb[:, 1:])
                    aux = sum((o.weighted_aux_loss() for o in routing), ce.new_zeros(()))
                    if routing:
                        aux = aux / len(routing)  # mean over MoE layers (docs/design.md, rule R3)
                ((ce + aux) / n_micro).backward()
            ce_sum = ce_sum + ce.detach().float()
            aux_sum = aux_sum + aux.detach().float()
            acc.add(routing)
        ce_mean, aux_mean = (torch.stack([ce_sum, aux_sum]) / n_micro).tolist()
        return ce_mean, aux_mean, acc

    # ------------------------------------------------------------------------------------------------- pieces
    def _load_parent(self, model: Transformer, optimizer: torch.optim.Optimizer) -> None:
        ck = self._parent_ckpt
        state = ck.model_state(self.device)
        # A CPT recipe may change the routing strategy: a bias router starting from a penalty parent keeps its
        # fresh zero biases, and a parent's biases are dropped when the CPT router is not bias-balanced.
        own = model.state_dict()
        for key in [k for k in state if k.endswith("expert_bias") and k not in own]:
            del state[key]
        for key in [k for k in own if k.endswith("expert_bias") and k not in state]:
            state[key] = own[key]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise MoecptError(f"--from {str(ck.path)!r} does not fit this model ({str(exc).splitlines()[0]}); "
                              "CPT must keep the parent's architecture") from None
        if self.recipe.cpt.load_optimizer:
            state = ck.optimizer_state()
            if state is None:
                raise MoecptError(f"{ck.path} has no optimizer state; set cpt.load_optimizer = false")
            try:
                optimizer.load_state_dict(state)
            except (ValueError, KeyError) as exc:
                raise MoecptError(f"--from {str(ck.path)!r}: its optimizer state does not fit this model "
                                  f"({str(exc).splitlines()[0]}); set cpt.load_optimizer = false") from None
            # Only the moments are carried. load_state_dict also restores the parent's hyper-parameters: put this
            # recipe's back (betas, eps, weight decay), and never let the parent's LR survive (docs/design.md, rule C3):
            # it is overwritten every step from the schedule.
            o = self.recipe.optim
            for group in optimizer.param_groups:
                group["fused"] = optimizer.defaults.get("fused")  # this build's kernel choice, not the parent's
                group["lr"] = float("nan")
                group["betas"] = (o.beta1, o.beta2)
                group["eps"] = o.eps
                group["weight_decay"] = 0.0 if group.get("name") == "no_decay" else o.weight_decay

    @torch.no_grad()
    def _evaluate(self, state: "TrainState", step: int) -> dict[str, float]:
        """Held-out cross-entropy per source (never the aux losses) and routing diagnostics on it.

        The loss is the token-weighted mean over the fixed windows of :meth:`_make_evals`, summed in float64 from
        per-token losses, so it does not depend on ``train.micro_batch_size`` (the forward passes are cut to
        micro-batches only to bound memory). With ``model.moe.capacity_factor`` the capacity, and so the dropped
        tokens, is per forward pass and does depend on it."""
        model = state.model
        was_training = model.training
        model.eval()
        micro = self.recipe.train.micro_batch_size or self.recipe.train.batch_size
        losses = {}
        for source, batches in state.evals.items():
            acc = RoutingAccumulator()
            total, n = 0.0, 0
            for b in (mb for batch in batches for mb in batch.split(micro)):
                b = b.to(self.device)
                with autocast_context(self.device, self.recipe.train.dtype):
                    logits, routing = model(b[:, :-1], return_routing=True)
                total += token_losses(logits, b[:, 1:]).double().sum().item()
                n += b[:, 1:].numel()
                acc.add(routing)
            losses[source] = total / n
            summ = acc.summary()
            self._emit(state, {"step": step, "tokens": state.tokens, "split": "val", "source": source,
                               "loss": losses[source], **{k: v for k, v in summ.items()
                                                          if k.startswith(("mri", "load_max", "dead", "tokens_per"))}})
        model.train(was_training)
        state.callbacks.on_eval(step, losses)
        return losses

    def _meta(self, step: int, tokens: int, skips: int, sampler) -> dict[str, Any]:
        return {
            "step": step,
            "tokens": tokens,
            "skipped_steps": skips,
            "run_name": self.recipe.name,
            "mode": self.mode,
            "model_config": self.model_cfg.model_dump(mode="json"),
            "recipe": self.recipe.model_dump(mode="json"),
            "sampler": sampler.state_dict(),
            "tokens_per_source": sampler.tokens_consumed(),
            "tokenizer_sha256": self.data.tokenizer_sha256,
            "lineage": {"parent_checkpoint": str(self.parent.path), "parent_step": self.parent.step}
            if self.parent else None,
        }

    def _summary(self, step: int, tokens: int, skips: int, resumed: bool) -> dict[str, Any]:
        return {"run_dir": str(self.out_dir), "mode": self.mode, "steps": step, "tokens": tokens,
                "skipped_steps": skips, "resumed": resumed, "latest_checkpoint": str(self._latest_checkpoint())}

    def _intact_latest(self):
        """Rank 0: the newest checkpoint whose files match their manifest hashes, as a loaded
        :class:`~moecpt.train.checkpoint.Checkpoint` (None: start from step 0). A damaged one (truncated, bit
        flips, missing file) is named, moved aside to ``step_N.damaged-<time>`` (never deleted) and the next older
        one is tried; each is reported in one line on stderr."""
        self.ckpts.clean_stale_temp()
        moved = []
        for path in reversed(self.ckpts.step_folders()):
            try:
                ck = load_checkpoint(path, verify=True, hint=False)
            except MoecptError as exc:
                aside = self.ckpts.move_aside(path)
                moved.append(path.name)
                print(f"moecpt: {exc}; moved it aside to {aside}", file=sys.stderr)
                continue
            if moved:
                print(f"moecpt: resuming from {ck.path.name} (step {ck.step}), the newest intact checkpoint",
                      file=sys.stderr)
            return ck
        if moved:
            print("moecpt: no intact checkpoint is left; the run starts again from step 0", file=sys.stderr)
        return None

    def _latest_checkpoint(self) -> Path | None:
        """Rank 0 (or a single process): the newest complete checkpoint, stale temp folders removed. Other ranks
        only look: a writer's pid means nothing on another host, so they must not clean anything."""
        if self.dist.is_main:
            return self.ckpts.latest()
        found = self.ckpts.all()
        return found[-1] if found else None


#: model keys a CPT recipe may change (routing strategy and dispatch); every other one is the parent's
CPT_MUTABLE_MOE_KEYS = frozenset({"router", "capacity_factor", "dispatch"})


def cpt_architecture_conflicts(recipe_model: Any, parent_model: Any) -> list[str]:
    """Model keys a CPT recipe sets to values other than the parent's (``"model.d_model = 256, the parent has
    128"``), ignoring unset keys, ``preset``, ``vocab_size = None`` and :data:`CPT_MUTABLE_MOE_KEYS`. A key given
    with the parent's own value is not a conflict (a CPT recipe may restate the pre-training ``[model]``)."""
    given = recipe_model.model_dump(mode="json", exclude_unset=True)
    have = parent_model.model_dump(mode="json")
    out = []
    for key, value in given.items():
        if key == "preset" or value is None and key == "vocab_size":
            continue
        if key == "moe" and isinstance(value, dict) and isinstance(have.get("moe"), dict):
            for k, v in value.items():
                if k not in CPT_MUTABLE_MOE_KEYS and have["moe"].get(k) != v:
                    out.append(f"model.moe.{k} = {v!r}, the parent has {have['moe'].get(k)!r}")
        elif have.get(key) != value:
            shown = "an MoE layer" if key == "moe" and value else repr(value)
            theirs = "none (dense)" if key == "moe" and have.get(key) is None else repr(have.get(key))
            out.append(f"model.{key} = {shown}, the parent has {theirs}")
    return out


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Every leaf where two run identities differ, as ``"KEY differs: A there, B now"`` (sorted by key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)
                for d in _differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)]
    return [f"{path or 'identity'} differs: {a!r} there, {b!r} now"]


def _describe_differences(a: Any, b: Any, most: int = 3) -> str:
    """The first ``most`` differences of :func:`_differences`, and how many more (a changed layout usually moves
    several keys at once: ``islands`` with ``island_sync``, say)."""
    every = _differences(a, b)
    more = f"; and {len(every) - most} more" if len(every) > most else ""
    return "; ".join(every[:most]) + more
