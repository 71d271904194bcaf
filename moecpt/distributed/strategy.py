"""The sync-strategy interface the training loop calls, the single-process strategy, and :func:`build_sync`.

The trainer (``moecpt.train.trainer``) runs a list of :class:`Worker` objects: one per process normally, ``K`` when
``--simulate-workers K`` runs ``K`` workers in one process. Each step it calls, in order::

    sync.begin_step()
    parts = sync.split_batch(batch)                     # one slice of the global batch per local worker
    for each worker and micro-batch:
        with sync.grad_sync(worker, last):               # DDP no_sync / FSDP2 gradient-sync switch
            forward, backward
    sync.after_backward(workers)                         # simulated DDP: average gradients
    ce, aux, loads, routing = sync.reduce_step(workers, stats, log)  # every-step modes: one small all-reduce
    ... clip, optimizer step, bias update with `loads` ...
    sync.after_optimizer_step(workers, step, boundary)   # local-SGD family: a communication round every H steps

and for checkpoints :meth:`SyncStrategy.checkpoint_state` (a collective: every rank calls it; rank 0 writes).

Strategies: :class:`SyncStrategy` (one process, no communication), ``ddp.DDPSync`` / ``ddp.FSDPSync``,
``simulate.SimulatedDDPSync``, ``local_sgd.LocalSGDSync`` (local SGD, SlowMo, DiLoCo, learned outer optimizers).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from moecpt.config import Recipe, SyncKind
from moecpt.distributed.accounting import CommAccountant, LinkEmulator
from moecpt.distributed.launch import DistInfo
from moecpt.errors import MoecptError

#: key of the strategy's own state inside the checkpoint's optimizer state (torch ignores unknown keys there, so a
#: local-SGD parent's optimizer file still loads as a plain AdamW state for CPT)
SYNC_KEY = "moecpt_sync"
LOCAL_SYNCS = (SyncKind.LOCAL_SGD, SyncKind.SLOWMO, SyncKind.DILOCO)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


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
    from moecpt.train.optim import build_optimizer, param_groups

    if recipe.distributed.inner_optimizer == "sgd":
        return torch.optim.SGD(param_groups(model, recipe.optim.weight_decay), lr=recipe.optim.lr, momentum=0.0)
    return build_optimizer(model, recipe.optim, device)


class SyncStrategy:
    """One worker in one process: nothing to communicate. The base of the other strategies.

    Attributes:
        kind: the recipe's ``distributed.sync`` value (``"single"`` here).
        every_step: True when workers agree after every step (gradients reduced); False for the local-SGD family,
            whose workers drift apart between rounds (their per-step losses are then worker 0's own).
        num_workers: all workers of the job; local_workers: those this process runs.
        reports: whether communication fields appear in metrics, checkpoints and the summary.
    """

    kind = "single"
    every_step = True
    reports = False

    def __init__(self, recipe: Recipe, info: DistInfo, num_workers: int = 1, local_workers: int = 1,
                 device: torch.device | None = None):
        self.recipe = recipe
        self.info = info
        self.num_workers = num_workers
        self.local_workers = local_workers
        self.device = device or torch.device("cpu")
        d = recipe.distributed
        self.acct = CommAccountant(num_workers, LinkEmulator(d.emulate_bandwidth_gbit, d.emulate_latency_ms))
        self.comm = None
        self._step_t0 = 0.0
        self._step_comm0 = 0.0

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        """Wrap / replicate the (already loaded) model and optimizer into this process's workers.

        ``state`` is the strategy's checkpointed state (``optimizer_state[SYNC_KEY]``), or None for a fresh run.
        """
        return [Worker(self.info.rank, model, model, optimizer)]

    def local_batch_rows(self, batch_size: int) -> int:
        """Rows of the global batch one worker trains on per step."""
        if batch_size % self.num_workers:
            raise MoecptError(f"train.batch_size={batch_size} is not divisible by the {self.num_workers} workers; "
                              "choose a multiple of the number of workers")
        return batch_size // self.num_workers

    # ------------------------------------------------------------------------------------------------ the step
    def begin_step(self) -> None:
        import time

        self._step_t0 = time.perf_counter()
        self._step_comm0 = self.acct.comm_time_s

    def split_batch(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """This process's rows -> one contiguous block per local worker (the blocks the ranks of a real job get)."""
        return [batch] if self.local_workers == 1 else list(batch.chunk(self.local_workers))

    def grad_sync(self, worker: Worker, last: bool):
        """Context for one micro-batch's forward + backward; gradients are synchronised on the ``last`` one."""
        return contextlib.nullcontext()

    def after_backward(self, workers: list[Worker]) -> None:
        """All micro-batches are done (simulated DDP averages the gradients here)."""

    def reduce_step(self, workers: list[Worker], stats: list[tuple[float, float, Any]], log: bool
                    ) -> tuple[float, float, list[torch.Tensor] | None, Any]:
        """``stats`` = (cross-entropy, weighted aux loss, routing accumulator) per local worker -> the step's
        ``(ce, aux, loads, routing)``: in every-step modes the means over all workers, each bias router's load
        summed over micro-batches *and workers* (docs/design.md, rule R6), and at ``log`` steps the routing
        diagnostics of the global batch; otherwise worker 0's values and ``loads = None`` (each worker updates its
        biases from its own loads)."""
        return stats[0][0], stats[0][1], None, stats[0][2]

    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        """After every worker's optimizer step (or skip) of 1-based ``step``. ``boundary``: the trainer evaluates,
        checkpoints or stops after this step, so the workers must agree now."""
        self._end_step()

    def _end_step(self) -> None:
        import time

        self.acct.add_step(time.perf_counter() - self._step_t0, self.acct.comm_time_s - self._step_comm0)

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        """``(model_state, optimizer_state, rng_state)`` to save on rank 0 (None elsewhere). A collective."""
        from moecpt.train.checkpoint import capture_rng_state

        w = workers[0]
        return w.model.state_dict(), w.optimizer.state_dict(), capture_rng_state()

    def select_rng(self, saved: dict) -> dict:
        """This rank's part of a saved RNG state (a checkpoint of a distributed run keeps one per rank)."""
        ranks = saved.get("ranks")
        if isinstance(ranks, list) and len(ranks) == self.info.world_size:
            return ranks[self.info.rank]
        return saved

    def meta(self) -> dict[str, Any]:
        """Extra checkpoint meta (empty for a single process: its checkpoints stay as before)."""
        if not self.reports:
            return {}
        return {"sync": self.kind, "workers": self.num_workers, "comm": self.acct.state_dict()}

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.acct.load_state_dict(meta.get("comm"))

    def record_fields(self) -> dict[str, Any]:
        """Cumulative communication fields for each train record of ``metrics.jsonl``."""
        return self.acct.record_fields() if self.reports else {}

    def summary(self, tokens: int) -> dict[str, Any] | None:
        if not self.reports:
            return None
        return {"sync": self.kind, **self.acct.summary(tokens)}


def build_sync(recipe: Recipe, info: DistInfo, device: torch.device, simulate_workers: int | None = None,
               outer_optimizer: Any = None) -> SyncStrategy:
    """The strategy for this recipe and launch.

    Args:
        recipe: its ``[distributed]`` section chooses the strategy.
        info: this process's rank / world size (:func:`moecpt.distributed.launch.rank_info`).
        device: the training device.
        simulate_workers: run this many workers in this one process (``--simulate-workers``).
        outer_optimizer: overrides ``distributed.outer_optimizer`` (local-SGD family): a
            :class:`moecpt.lopt.OuterOptimizer`, or a factory ``params -> torch.optim.Optimizer``.

    Raises:
        MoecptError: simulation under a multi-process launch or with FSDP; an outer optimizer for a sync that has
            none; a batch not divisible by the workers.
    """
    kind = recipe.distributed.sync
    local = kind in LOCAL_SYNCS
    if outer_optimizer is not None and not local:
        raise MoecptError(f"an outer optimizer applies to sync = local-sgd, slowmo or diloco, not {kind.value!r}")
    if simulate_workers is not None:
        if simulate_workers < 1:
            raise MoecptError(f"--simulate-workers {simulate_workers}: give a number of workers >= 1")
        if info.distributed:
            raise MoecptError("--simulate-workers runs every worker in one process; do not combine it with torchrun "
                              f"(this is rank {info.rank} of {info.world_size})")
        if kind == SyncKind.FSDP:
            raise MoecptError("sync = 'fsdp' cannot be simulated (it shards one model over real devices); "
                              "simulate 'ddp' or a local-SGD strategy instead")
    workers = simulate_workers or info.world_size
    local_workers = simulate_workers or 1
    if local:
        from moecpt.distributed.local_sgd import LocalSGDSync

        sync: SyncStrategy = LocalSGDSync(recipe, info, workers, local_workers, device, outer=outer_optimizer)
    elif simulate_workers is not None:
        from moecpt.distributed.simulate import SimulatedDDPSync

        sync = SimulatedDDPSync(recipe, info, workers, local_workers, device)
    elif info.distributed and kind == SyncKind.DDP:
        from moecpt.distributed.ddp import DDPSync

        sync = DDPSync(recipe, info, workers, 1, device)
    elif info.distributed and kind == SyncKind.FSDP:
        from moecpt.distributed.ddp import FSDPSync

        sync = FSDPSync(recipe, info, workers, 1, device)
    else:
        sync = SyncStrategy(recipe, info, 1, 1, device)
    sync.local_batch_rows(recipe.train.batch_size)
    return sync
