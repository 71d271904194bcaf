"""FSDP2 inside islands (``distributed.island_sync = "fsdp"``): ZeRO-3 sharding over each island every step, the
outer step across islands on the shards.

The layout of :mod:`moecpt.distributed.islands` (``M`` islands of ``S`` ranks), with FSDP2 ``fully_shard`` (every
decoder block and the root, as :class:`moecpt.distributed.ddp.FSDPSync`) over a 1-D device mesh of the island's
ranks instead of DDP. This is torchft's and OpenDiLoCo's layout for models that do not fit one device: DiLoCo over
replica groups, FSDP inside each (Jaghouar et al., OpenDiLoCo, arXiv 2407.07852).

* **Every step, inside the island**: FSDP2's all-gathers (forward, backward) and reduce-scatter of the gradients,
  and the small all-reduce of the step metrics and router loads of :class:`~moecpt.distributed.islands.IslandSync`.
  A rank at island position ``j`` holds shard ``j`` of every parameter (FSDP2 cuts dim 0 as ``torch.chunk``
  does), of its gradient and of the inner AdamW state.
* **Every round, across islands**: the shards line up, since the rank at position ``j`` of every island holds the
  same slice of every parameter, and these ``M`` ranks are exactly the cross-island group. Each rank packs the
  fp32 pseudo-gradient of its local shards (``θ_shard − θ_outer_shard``, ``N_j`` elements, plus the persistent
  float buffers, which FSDP2 does not shard: each rank sends them whole, a few floats), all-reduces it over its
  cross-island group (``2 (M−1)/M · 4 N_j`` bytes per rank, ``N_j ≈ N / S``) and steps the outer optimizer on
  its shard. No intra-island collective is needed for the round: each island's ranks together hold the whole new
  ``θ``. The outer state (``θ_outer``, the momentum) is kept sharded the same way, as plain fp32 local tensors.
* **Outer optimizers**: those that act element by element (``sgd``, ``nesterov`` for local SGD, SlowMo, DiLoCo,
  and a Python ``torch.optim`` factory such as Adam) give on shards exactly what they give on whole tensors. A
  Python ``torch.optim`` factory whose update is not element-wise (LAMB's trust ratio, Muon) would be computed per
  shard: that is the caller's choice. The learned optimizers (``lagg-a``, ``lopt-a``, a ``.safetensors`` file, a
  Python :class:`moecpt.lopt.LearnedOuterOptimizer`) need whole-tensor statistics (per-channel RMS, Adafactor row /
  column accumulators): :class:`moecpt.distributed.lopt_shards.ShardedLearnedOuter` all-gathers each tensor's
  ``θ``, ``Δ`` and accumulators inside the island, one tensor at a time, runs the unchanged learned step on it on
  every rank of the island and keeps this rank's rows (that module's doc gives the choice and its costs: kind
  ``outer_gather`` on ``intra_island``); the accumulators stay sharded as the parameters. LAgg-A's gather mode is
  one all-gather of the shard's ``Δ`` over the cross-island group (``(M−1) · 4 N_j`` bytes per rank). Another
  :class:`moecpt.lopt.OuterOptimizer` is refused in one line (its update on a shard is unknown).
* **Accounting** (kinds and links as for DDP islands): ``fsdp`` and ``stats`` travel on ``intra_island``,
  ``sync`` on ``inter_island``. FSDP2 exposes no communication hook, so ``fsdp`` is *estimated* as
  :class:`~moecpt.distributed.ddp.FSDPSync` estimates it, per optimizer step: ``3 (S−1)/S · 4 N`` bytes sent
  (:func:`~moecpt.distributed.accounting.fsdp_step_bytes`: two all-gathers and a reduce-scatter of the fp32
  parameters). The ``sync`` bytes are exact, counted from this rank's own shard.
* **Checkpoints** are sharded (DCP, ``train.checkpoint_format = "auto"`` or ``"dcp"``): no rank gathers the
  model. Checkpoints fall on round boundaries, where every island holds the same ``θ`` and the same outer state,
  so each rank hands DCP its island's FSDP2 DTensors under the shared keys (``model.*``, and the outer state under
  ``optim.moecpt_sync.outer``: each tensor cut like a parameter wrapped as a DTensor over the parameter's global
  shape, the scalars and whole vectors as they are) and DCP's planner writes each shard once (the rank at
  position ``j`` of every island offers the same chunk). The inner AdamW states differ between islands: island
  0's is the ordinary optimizer state (a CPT parent loads it as a plain AdamW state), island ``i``'s lies under
  ``optim.moecpt_sync.inner.i``, written by that island's ranks. Rank 0's marker in ``optimizer_rest.pt`` holds
  the layout and skeletons of the outer and inner states whose tensors refer to the DCP keys
  (:func:`moecpt.train.dcp_io.split_tensors`), so ``Checkpoint.optimizer_state()`` (and ``moecpt checkpoint
  consolidate``) gives exactly the state of the single-file layout below. A resume may use another number of ranks
  per island (the same number of islands): each island reshards its DTensors on load, the outer state is read into
  this rank's rows (:mod:`moecpt.distributed.islands_dcp`), and ``θ_outer`` restarts from the loaded weights.
  ``train.checkpoint_format = "single"`` keeps the single-file layout of the local-SGD family: at a round boundary
  each island's FSDP2 all-gather assembles the full ``θ`` and that island's full inner optimizer state (one full
  copy in memory for the moment of the save, as FSDPSync's ``single`` format), the outer state's shards are
  gathered inside the island, and rank 0 receives island 0's inner state as the ordinary optimizer state and
  island ``i``'s under ``moecpt_sync.inner`` keyed ``"i"``, plus ``islands`` and ``island_sync``; a learned outer
  optimizer's accumulators are gathered to the whole model's state, the very one DDP inside islands saves. On
  resume every rank loads the full states and keeps its shard (FSDP2's own ``set_optimizer_state_dict``; the outer
  state sliced as FSDP2 slices the parameters). Either way the run continues bit for bit at the same layout. A
  checkpoint of another number of islands or ``island_sync`` (or, single-file, of another number of workers) is
  refused in one line (:meth:`~moecpt.distributed.islands.IslandSync.check_resume`).
* **Not simulated**: ``--simulate-workers`` with ``island_sync = "fsdp"`` is refused (one process cannot shard).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moecpt.distributed.accounting import allgather_bytes, allreduce_bytes, fsdp_step_bytes
from moecpt.distributed.ddp import _rank0_rng, _to_fqn, fsdp_grad_sync
from moecpt.distributed.islands import LINKS, IslandSync
from moecpt.distributed.islands_dcp import ShardedIslandCheckpoints, is_sharded_state
from moecpt.distributed.launch import gather_to_main
from moecpt.distributed.local_sgd import TorchOuter, _to_cpu, persistent_float_buffers
from moecpt.distributed.lopt_shards import OUTER_GATHER, Dim0Cut, ShardedLearnedOuter
from moecpt.distributed.mesh import Mesh
from moecpt.distributed.strategy import SYNC_KEY, OptimizerFactory, Worker
from moecpt.errors import MoecptError
from moecpt.lopt.optimizers import LearnedOuterOptimizer, OuterOptimizer
from moecpt.train.dcp_io import index_keyed


class IslandFSDPSync(ShardedIslandCheckpoints, IslandSync):
    """The local-SGD family across islands with FSDP2 inside each (module doc). Real ranks only.

    Args:
        recipe, info, mesh, device, outer: as :class:`~moecpt.distributed.islands.IslandSync` (one local worker).

    Raises:
        MoecptError: an :class:`moecpt.lopt.OuterOptimizer` other than a ``torch.optim`` or a learned one (its
            update on a shard is unknown); not a multi-process job.
    """

    links = {**LINKS, "fsdp": "intra_island", OUTER_GATHER: "intra_island"}

    def __init__(self, recipe, info, mesh: Mesh, device: torch.device, outer: Any = None):
        if not info.distributed:
            raise MoecptError("distributed.island_sync = 'fsdp' shards each island over real ranks; launch them "
                              "with torchrun (--simulate-workers cannot shard)")
        if isinstance(outer, OuterOptimizer) and not isinstance(outer, (TorchOuter, LearnedOuterOptimizer)):
            raise MoecptError(f"outer optimizer {type(outer).__name__} with island_sync = 'fsdp' is not supported: "
                              "only torch.optim and learned (LAgg / LOpt) outer optimizers run on shards; use "
                              "island_sync = 'ddp'")  # before any process group
        super().__init__(recipe, info, mesh, 1, device, outer=outer)
        self.island = mesh.coords(info.rank)[0]
        self._params: list[DTensor] = []
        self._n_param_bytes = 0

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        """Start every rank from rank 0's weights, shard each island, build the sharded inner optimizer with this
        island's checkpointed state and the sharded outer state. ``optimizer`` holds island 0's full state on a
        resume (the trainer loaded the checkpoint's ordinary optimizer state into it)."""
        self.check_resume(state)
        from_dcp = is_sharded_state(state)  # its tensors come in the DCP load (dcp_global_view)
        with torch.no_grad():  # start-up: not accounted
            for t in [*model.parameters(), *persistent_float_buffers(model)]:
                dist.broadcast(t.data, src=0)
        island_mesh = DeviceMesh.from_group(self.grad_group, self.device.type)
        for block in model.blocks:
            fully_shard(block, mesh=island_mesh)
        fully_shard(model, mesh=island_mesh)
        sharded = make_optimizer(model)  # fully_shard replaced the parameters
        full = optimizer.state_dict()
        if state is not None and self.island > 0 and not from_dcp:
            full = state.get("inner", {}).get(str(self.island))
            if full is None:
                raise MoecptError(f"the checkpoint has no inner optimizer state for island {self.island}; it was "
                                  "not written by island_sync = 'fsdp' with this layout: resume with its own layout")
        if full["state"]:
            set_optimizer_state_dict(model, sharded, _to_fqn(full, sharded, model),
                                     options=StateDictOptions(full_state_dict=True))
        self._params = list(model.parameters())
        self._n_param_bytes = sum(p.numel() * 4 for p in self._params)  # global numel of the DTensors
        worker = Worker(self.info.rank, model, model, sharded)
        self.global_params = [nn.Parameter(p.detach().float().clone(), requires_grad=False)
                              for p in self.local_params(worker)]
        if isinstance(self.outer, LearnedOuterOptimizer):  # whole-tensor features: gathered a tensor at a time
            cuts = [Dim0Cut.chunked(self.grad_group, self.S, self.position, tuple(p.shape)) for p in self._params]
            self.outer = ShardedLearnedOuter(self.outer, cuts, self._record)
        self.outer.bind(self.global_params)
        if from_dcp:
            self.begin_sharded_resume(state)
        elif state is not None and state.get("outer") is not None:
            if isinstance(self.outer, ShardedLearnedOuter):
                self.outer.load_full_state_dict(state["outer"])
            else:
                self.outer.load_state_dict(self._outer_to_local(state["outer"]))
        return [worker]

    def local_params(self, w: Worker) -> list[Tensor]:
        """This rank's shards (views of FSDP2's sharded storage: writing them writes the parameters)."""
        return [p.to_local() for p in w.model.parameters()]

    # ------------------------------------------------------------------------------------------------ the step
    def grad_sync(self, worker: Worker, last: bool):
        return fsdp_grad_sync(worker.model, last)

    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        est = fsdp_step_bytes(self._n_param_bytes, self.S)  # FSDPSync's estimate, over the island
        self.acct.record("fsdp", est, est, 0.0)
        super().after_optimizer_step(workers, step, boundary)

    # ----------------------------------------------------------------------------------------------- a round
    def mean_delta(self, flats: list[Tensor]) -> Tensor:
        """``(1/M) Σ_i Δ_i`` of this rank's shards (and the buffers), ``[N_j + B]``: one all-reduce over the
        cross-island group, whose ranks hold the same shards; nothing inside the island."""
        (flat,) = flats
        t0 = time.perf_counter()
        dist.all_reduce(flat, group=self.cross_group)
        self._record("sync", allreduce_bytes(flat.numel() * flat.element_size(), self.M), t0)
        return flat / self.M

    def gather_deltas(self, flats: list[Tensor]) -> Tensor:
        """Every island's ``Δ_i`` of this rank's shards (and the buffers), ``[M, N_j + B]`` in island order (gather
        mode: LAgg-A): one all-gather over the cross-island group."""
        (flat,) = flats
        t0 = time.perf_counter()
        parts = [torch.empty_like(flat) for _ in range(self.M)]
        dist.all_gather(parts, flat, group=self.cross_group)
        self._record("sync", allgather_bytes(flat.numel() * flat.element_size(), self.M), t0)
        return torch.stack(parts)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _outer_to_full(self, outer: dict) -> dict:
        """The outer optimizer's state with every shard-shaped tensor gathered inside the island to the whole
        parameter's shape (CPU). A collective over the island."""
        state = {}
        for i, per in outer.get("state", {}).items():
            p, local = self._params[int(i)], self.global_params[int(i)]
            state[i] = {k: (DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                               run_check=False).full_tensor().cpu()
                            if isinstance(v, Tensor) and v.shape == local.shape else v)
                        for k, v in per.items()}
        return {**outer, "state": state}

    def _outer_to_local(self, outer: dict) -> dict:
        """Inverse of :meth:`_outer_to_full`: this rank's slice of every whole-parameter-shaped tensor, cut as
        FSDP2 cuts dim 0 (``torch.chunk``: ``ceil(d0 / S)`` rows per rank, the last ones shorter or empty)."""
        state = {}
        for i, per in outer.get("state", {}).items():
            p, local = self._params[int(i)], self.global_params[int(i)]
            rows = -(-p.shape[0] // self.S)
            state[i] = {k: (v.narrow(0, min(self.position * rows, p.shape[0]), local.shape[0]).clone()
                            if isinstance(v, Tensor) and v.shape == p.shape and v.dim() > 0 else v)
                        for k, v in per.items()}
        return {**outer, "state": state}

    # --------------------------------------------------------------------------------- sharded checkpoints
    def _cut_param(self, path: tuple[str, ...], shape: tuple[int, ...], local: bool) -> int | None:
        """The parameter an outer-state tensor is cut like (dim 0 over the island, as FSDP2 cuts it), or None for
        one every rank holds whole. ``path``: its keys in the outer state dict (``("state", i, name)`` of a
        ``torch.optim`` state, ``("acc.i.name",)`` of a learned one); ``shape``: this rank's (``local``) or the
        checkpoint's global one."""
        if isinstance(self.outer, ShardedLearnedOuter):  # its state says which accumulators are cut
            return self.outer.cut_param(path[0]) if len(path) == 1 else None
        if len(path) == 3 and path[0] == "state" and len(shape) > 0:  # torch.optim: shaped like the parameter
            i = int(path[1])
            like = self.global_params[i].shape if local else self._params[i].shape
            return i if tuple(shape) == tuple(like) else None
        return None

    def _outer_view(self, path: tuple[str, ...], v: Tensor) -> Tensor:
        """A tensor cut like parameter ``i`` as a DTensor over the global shape (``Shard(0)`` on the island mesh,
        sharing storage with the local rows); the others as they are (equal on every rank: written once)."""
        i = self._cut_param(path, tuple(v.shape), local=True)
        if i is None:
            return v
        p = self._params[i]
        shape = (p.shape[0], *v.shape[1:])
        return DTensor.from_local(v, p.device_mesh, p.placements, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride(), run_check=False)

    def _outer_local_shape(self, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        """This rank's rows of a cut tensor (the island size may differ from the writer's)."""
        i = self._cut_param(path, shape, local=False)
        return shape if i is None else (self.global_params[i].shape[0], *shape[1:])

    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        """θ (full, from island 0), island 0's full inner optimizer state as the ordinary one, every other island's
        under ``moecpt_sync.inner``, the outer state in full (module doc). A collective; rank 0 gets the result."""
        w = workers[0]
        full = StateDictOptions(full_state_dict=True)
        model_state = get_model_state_dict(w.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        inner = index_keyed(get_optimizer_state_dict(w.model, w.optimizer, options=full))
        inners = gather_to_main(_to_cpu(inner) if self.position == 0 else None)  # one per island, in island order
        outer = (self.outer.full_state_dict() if isinstance(self.outer, ShardedLearnedOuter)
                 else self._outer_to_full(self.outer.state_dict()))
        rng = _rank0_rng(self)
        if not self.info.is_main:
            return None, None, None
        islands = [s for s in inners if s is not None]
        opt_state = dict(islands[0])
        opt_state[SYNC_KEY] = {**self.layout_marker(), "outer": outer,
                               "inner": {str(i): s for i, s in enumerate(islands) if i > 0}}
        return model_state, opt_state, rng
