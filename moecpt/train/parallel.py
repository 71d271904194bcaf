"""What the training loop needs from its launch, and the single-process implementation (docs/design.md, rule A2).

The trainer never imports :mod:`moecpt.distributed`: it receives a *runtime* (``Trainer(..., parallel=...)``) that
tells it where this process stands (:class:`DistInfo`), runs the few collectives of set-up (same configuration on
every rank, rank 0 claims the folder, rank 0 picks the checkpoint), builds the sync strategy and names a lost peer.

* :class:`SingleProcess` (the default): one process, one worker, nothing to communicate, no
  ``torch.distributed`` call; recipes that ask for more (``--simulate-workers``, a local-SGD family sync, a
  ``torchrun`` job) are refused with the runtime to pass instead.
* :class:`moecpt.distributed.runtime.Distributed`: ``torchrun`` jobs, simulated workers, DDP / FSDP2 / local SGD /
  SlowMo / DiLoCo; ``moecpt pretrain`` and ``moecpt cpt`` always pass it.

The sync-strategy interface the loop calls (:class:`SingleSync`, whose methods the strategies of
:mod:`moecpt.distributed` override) and the pieces it shares with them (:class:`Worker`, :data:`SYNC_KEY`,
:func:`build_worker_optimizer`) live here, at the layer that uses them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from moecpt.config import CheckpointFormat, Recipe, SyncKind
from moecpt.errors import MoecptError
from moecpt.train.checkpoint import capture_rng_state
from moecpt.train.optim import build_optimizer, param_groups
from moecpt.train.reduce import Metric

#: key of the strategy's own state inside the checkpoint's optimizer state (torch ignores unknown keys there, so a
#: local-SGD parent's optimizer file still loads as a plain AdamW state for CPT)
SYNC_KEY = "moecpt_sync"
#: the syncs with an outer loop (their strategy lives in moecpt.distributed.local_sgd)
LOCAL_SYNCS = (SyncKind.LOCAL_SGD, SyncKind.SLOWMO, SyncKind.DILOCO)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only writer of metrics, checkpoints and run.json."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class Worker:
    """One data-parallel worker this process runs.

    Attributes:
        index: global worker index (the rank, or the simulated worker's number).
        model: the plain :class:`~moecpt.model.transformer.Transformer` (parameters, routers, state dict).
        module: what the forward pass goes through (the DDP wrapper, or ``model``).
        optimizer: the worker's (inner) optimizer.
        forward: ``module``, or its ``torch.compile``d version (set by the trainer).
    """

    index: int
    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[..., Any] | None = field(default=None, repr=False)


def build_worker_optimizer(model: nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """The per-worker (inner) optimizer: AdamW from ``[optim]``, or plain SGD (no momentum, the same decay groups,
    L2 weight decay ``optim.weight_decay``) with ``distributed.inner_optimizer = "sgd"``. The LR is set every step
    from the schedule."""
    if recipe.distributed.inner_optimizer == "sgd":
        return torch.optim.SGD(param_groups(model, recipe.optim.weight_decay), lr=recipe.optim.lr, momentum=0.0)
    return build_optimizer(model, recipe.optim, device)


@dataclass
class StepStats:
    """What one worker measured in one step, for :meth:`SingleSync.reduce_step`.

    Attributes:
        metrics: scalar step metrics (``loss``, ``aux_loss``, at log steps ``peak_memory_bytes``), each with its
            :class:`~moecpt.train.reduce.ReduceType`.
        routing: the worker's :class:`~moecpt.train.metrics.RoutingAccumulator` (summed across workers at log steps).
    """

    metrics: dict[str, Metric]
    routing: Any


class SingleSync:
    """One worker in one process: nothing to communicate, nothing reported. The interface the training loop calls
    and the base of :class:`moecpt.distributed.strategy.SyncStrategy` (which adds communication accounting).

    Each step the trainer calls, in order::

        sync.begin_step()
        parts = sync.split_batch(batch)                     # one slice of the global batch per local worker
        for each worker and micro-batch:
            with sync.grad_sync(worker, last):               # DDP no_sync / FSDP2 gradient-sync switch
                forward, backward
        sync.after_backward(workers)                         # simulated DDP: average gradients
        scalars, loads, routing = sync.reduce_step(workers, stats, log)  # every-step modes: one small all-reduce
        ... clip, optimizer step, bias update with `loads` ...
        sync.after_optimizer_step(workers, step, boundary)   # local-SGD family: a communication round every H steps

    and for checkpoints :meth:`checkpoint_state` (single-file layout: a collective, rank 0 writes) or
    :meth:`sharded_checkpoint_state` (DCP layout: every rank writes its shard).

    Attributes:
        kind: the recipe's ``distributed.sync`` value (``"single"`` here).
        every_step: True when workers agree after every step (gradients reduced); False for the local-SGD family,
            whose workers drift apart between rounds (their per-step losses are then worker 0's own).
        num_workers: all workers of the job; local_workers: those this process runs.
        reports: whether communication fields appear in metrics, checkpoints and the summary.
        dcp_capable: one model and optimizer per process, so checkpoints may use the sharded (DCP) layout; False
            where a checkpoint holds several workers' states (local-SGD family, simulated workers).
        shards_state: parameters and optimizer state are sharded over ranks (FSDP2, expert parallelism), so
            ``train.checkpoint_format = "auto"`` writes DCP.
    """

    kind = "single"
    every_step = True
    reports = False
    dcp_capable = True
    shards_state = False

    def __init__(self, recipe: Recipe, info: DistInfo, num_workers: int = 1, local_workers: int = 1,
                 device: torch.device | None = None):
        self.recipe = recipe
        self.info = info
        self.num_workers = num_workers
        self.local_workers = local_workers
        self.device = device or torch.device("cpu")

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        """Wrap / replicate the (already loaded) model and optimizer into this process's workers.

        ``state`` is the strategy's checkpointed state (``optimizer_state[SYNC_KEY]``), or None for a fresh run.
        """
        return [Worker(self.info.rank, model, model, optimizer)]

    def check_resume(self, state: dict | None) -> None:
        """Refuse, in one line, a checkpointed strategy state (``optimizer_state[SYNC_KEY]``; None: none saved)
        that this strategy cannot resume. The trainer calls it before it writes anything into the run folder, and
        :meth:`setup` again with the state it loads. Strategies without a state of their own resume any checkpoint;
        the local-SGD family refuses another number of workers, islands or ``island_sync``."""

    def local_batch_rows(self, batch_size: int) -> int:
        """Rows of the global batch one worker trains on per step."""
        check_batch_split(batch_size, self.num_workers)
        return batch_size // self.num_workers

    # ------------------------------------------------------------------------------------------------ the step
    def begin_step(self) -> None:
        """A step starts (the distributed strategies time it)."""

    def split_batch(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """This process's rows -> one contiguous block per local worker (the blocks the ranks of a real job get)."""
        return [batch] if self.local_workers == 1 else list(batch.chunk(self.local_workers))

    def grad_sync(self, worker: Worker, last: bool):
        """Context for one micro-batch's forward + backward; gradients are synchronised on the ``last`` one."""
        return contextlib.nullcontext()

    def after_backward(self, workers: list[Worker]) -> None:
        """All micro-batches are done (simulated DDP averages the gradients here)."""

    def grad_norm(self, model: nn.Module, clip: float | None) -> float:
        """The worker's total gradient norm (all its parameters), clipped to ``clip`` when set (FSDP2's sharded
        gradients included: torch reduces DTensor norms over the shards). Strategies whose ranks hold different
        parameters (expert parallelism) override it with the global norm."""
        if clip is not None:
            return _scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
        if grads and hasattr(grads[0], "full_tensor"):  # DTensor (FSDP2): let torch reduce over the shards
            return _scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
        return float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0

    def reduce_step(self, workers: list[Worker], stats: list[StepStats], log: bool
                    ) -> tuple[dict[str, float], list[torch.Tensor] | None, Any]:
        """``stats`` = one :class:`StepStats` per local worker -> the step's ``(scalars, loads, routing)``: in
        every-step modes each scalar reduced over all workers as it declares (docs/design.md, rule D2), each bias
        router's load summed over micro-batches *and workers* (rule R6), and at ``log`` steps the routing
        diagnostics of the global batch; otherwise worker 0's values and ``loads = None`` (each worker updates its
        biases from its own loads)."""
        return {k: float(m.value) for k, m in stats[0].metrics.items()}, None, stats[0].routing

    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        """After every worker's optimizer step (or skip) of 1-based ``step``. ``boundary``: the trainer evaluates,
        checkpoints or stops after this step, so the workers must agree now."""

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        """``(model_state, optimizer_state, rng_state)`` to save on rank 0 (None elsewhere). A collective."""
        w = workers[0]
        return w.model.state_dict(), w.optimizer.state_dict(), capture_rng_state()

    def sharded_checkpoint_state(self, workers: list[Worker]
                                 ) -> tuple[nn.Module, torch.optim.Optimizer, dict | None, dict | None]:
        """``(model, optimizer, rng_state, optimizer_extra)`` for a DCP save: this rank's model and optimizer (its
        shards), and on rank 0 the RNG record and extra optimizer keys (the strategy's marker; None elsewhere).
        A collective."""
        w = workers[0]
        return w.model, w.optimizer, capture_rng_state(), None

    def dcp_global_view(self, model_state: dict, optim_tensors: dict) -> tuple[dict, dict]:
        """This rank's state as DCP must see it (:data:`moecpt.train.checkpoint_dcp.GlobalView`): here as it is, a
        full model, or FSDP2's DTensors; expert parallelism wraps its expert slices."""
        return model_state, optim_tensors

    def after_sharded_load(self, workers: list[Worker]) -> None:
        """A DCP checkpoint has just been loaded into this rank's model and optimizer (after :meth:`setup`, through
        :meth:`dcp_global_view`): the strategy takes up the state it keeps itself (islands: the outer state)."""

    def select_rng(self, saved: dict) -> dict:
        """This rank's part of a saved RNG state (a checkpoint of a distributed run keeps one per rank)."""
        ranks = saved.get("ranks")
        if isinstance(ranks, list) and len(ranks) == self.info.world_size:
            return ranks[self.info.rank]
        return saved

    def meta(self) -> dict[str, Any]:
        """Extra checkpoint meta (empty for a single process: its checkpoints stay as before)."""
        return {}

    def load_meta(self, meta: dict[str, Any]) -> None:
        """Restore what :meth:`meta` saved."""

    def record_fields(self) -> dict[str, Any]:
        """Cumulative communication fields for each train record of ``metrics.jsonl``."""
        return {}

    def summary(self, tokens: int) -> dict[str, Any] | None:
        """The communication summary of the run (None: nothing communicated)."""
        return None


def _scalar(t: Any) -> float:
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def check_batch_split(batch_size: int, workers: int) -> None:
    """Refuse a global batch that ``workers`` ranks cannot split into equal rows, naming both ways out: the nearest
    batch sizes that divide and the worker counts that divide this batch.

    Raises:
        MoecptError: ``batch_size % workers != 0``.
    """
    if batch_size % workers == 0:
        return
    lower, upper = batch_size - batch_size % workers, batch_size - batch_size % workers + workers
    sizes = f"{lower} or {upper}" if lower > 0 else f"{upper}"
    counts = ", ".join(str(n) for n in range(1, min(batch_size, 64) + 1) if batch_size % n == 0)
    raise MoecptError(f"train.batch_size={batch_size} does not split over {workers} workers (every rank reads its "
                      f"own rows); set train.batch_size to {sizes} (`--set train.batch_size={upper}`), or launch a "
                      f"number of workers that divides {batch_size}: {counts}")


def check_checkpoint_format(recipe: Recipe, simulate_workers: int | None = None) -> None:
    """Refuse ``train.checkpoint_format = "dcp"`` for a run whose checkpoints hold several workers' states in one
    file (simulated workers; the local-SGD family, except across islands whose ranks hold slices, FSDP2 or expert
    parallelism inside each, which write their slices: :mod:`moecpt.distributed.islands_dcp`). Part of every
    runtime's ``check_launch``, so ``moecpt plan`` refuses it as ``moecpt pretrain`` does.

    Raises:
        MoecptError: ``dcp`` with ``simulate_workers``, or with a local-SGD family sync other than islands with
            ``island_sync = "fsdp"`` or ``expert_parallel > 1``.
    """
    if recipe.train.checkpoint_format != CheckpointFormat.DCP:
        return
    d = recipe.distributed
    if simulate_workers is not None:
        raise MoecptError("train.checkpoint_format = 'dcp' does not apply to --simulate-workers (one process holds "
                          "every worker's state); use 'auto' or 'single'")
    sliced_islands = d.islands > 1 and (d.island_sync == SyncKind.FSDP or d.expert_parallel > 1)
    if d.sync in LOCAL_SYNCS and not sliced_islands:
        raise MoecptError(f"train.checkpoint_format = 'dcp' does not apply to distributed.sync = {d.sync.value!r} "
                          "here (its checkpoints hold every worker's state in one file); it applies across islands "
                          "whose ranks hold slices (distributed.islands > 1 with island_sync = 'fsdp' or "
                          "expert_parallel > 1); use 'auto' or 'single'")


class SingleProcess:
    """The trainer's runtime for one process with one worker (the default): every collective is the identity.

    Subclassed by :class:`moecpt.distributed.runtime.Distributed`, which the trainer receives for ``torchrun``
    jobs, simulated workers and the local-SGD family.
    """

    def info(self) -> DistInfo:
        """Where this process stands (rank 0 of 1). Refuses a process group of several ranks: each would write the
        same run folder."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise MoecptError("a torch.distributed process group of several ranks is running, but the Trainer got "
                              "the single-process runtime; pass parallel=moecpt.distributed.runtime.Distributed()")
        return DistInfo()

    def check_same_config(self, identity: dict[str, Any]) -> None:
        """Refuse to start when the ranks run different configurations (one rank: nothing to compare)."""

    def run_on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on rank 0 and hand its result to every rank (here: just run it)."""
        return fn()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (here: ``obj``)."""
        return obj

    def check_launch(self, recipe: Recipe, info: DistInfo, simulate_workers: int | None = None,
                     outer_optimizer: Any = None) -> None:
        """Refuse, before the run folder is claimed, a layout this launch cannot run: a checkpoint format its
        checkpoints cannot have (:func:`check_checkpoint_format`), and what :meth:`build_sync` refuses (the
        distributed runtime checks its device mesh here too: :func:`moecpt.distributed.runtime.check_launch`).

        Raises:
            MoecptError: see :func:`check_checkpoint_format`; the run needs :mod:`moecpt.distributed` (simulated
                workers, a local-SGD family sync); an outer optimizer for a sync that has none.
        """
        check_checkpoint_format(recipe, simulate_workers)
        local = recipe.distributed.sync in LOCAL_SYNCS
        if outer_optimizer is not None and not local:
            raise MoecptError("an outer optimizer applies to sync = local-sgd, slowmo or diloco, not "
                              f"{recipe.distributed.sync.value!r}")
        wants = ("--simulate-workers" if simulate_workers is not None
                 else f"distributed.sync = {recipe.distributed.sync.value!r}" if local else None)
        if wants is not None:
            raise MoecptError(f"{wants} needs the distributed runtime; pass "
                              "Trainer(..., parallel=moecpt.distributed.runtime.Distributed())")

    def build_sync(self, recipe: Recipe, info: DistInfo, device: torch.device, simulate_workers: int | None = None,
                   outer_optimizer: Any = None) -> SingleSync:
        """The sync strategy for this recipe and launch: :class:`SingleSync`.

        Raises:
            MoecptError: what :meth:`check_launch` refuses; a batch the workers cannot share.
        """
        self.check_launch(recipe, info, simulate_workers, outer_optimizer)
        sync = SingleSync(recipe, info, 1, 1, device)
        sync.local_batch_rows(recipe.train.batch_size)
        return sync

    # A single process has no peers to lose: these are only called when ``info().distributed``.
    def is_distributed_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` looks like a lost peer / collective timeout (not a bug of this rank)."""
        return False

    def publish_error(self, message: str) -> None:
        """Leave this rank's fatal error where the other ranks can quote it."""

    def diagnose(self) -> str:
        """A sentence naming the ranks that stopped."""
        return "no peer ranks"
