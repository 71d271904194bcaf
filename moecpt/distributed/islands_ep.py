"""Expert parallelism inside islands (``distributed.islands = M`` with ``distributed.expert_parallel = N``):
:class:`IslandEPSync`, EP × DP inside each island every step, the local-SGD family's outer step across islands.

The mesh of :mod:`moecpt.distributed.mesh` (``[islands M, dp D, ep N]``, island size ``S = D · N``). This is the
layout of torchtitan / Megatron-Core expert parallelism inside a cluster, with DiLoCo between clusters (Douillard et
al., arXiv 2311.08105; OpenDiLoCo, Jaghouar et al., arXiv 2407.07852):

* **Every step, inside the island**: exactly :class:`~moecpt.distributed.ep_sync.ExpertParallelSync`'s step on the
  island's ranks: each rank keeps its ``E / N`` experts of every MoE layer
  (:class:`~moecpt.distributed.expert_parallel.ExpertParallelExperts`; tokens travel by all-to-all inside the EP
  group, which lies inside the island), torch DDP over the island's process group averages the non-expert
  gradients (the experts excluded from it), the expert gradients are summed over the island's expert-DP group
  (``D`` ranks) and divided by ``S``, the gradient norm is the island's global one; the step metrics, router loads
  and bias updates are reduced over the island as :class:`~moecpt.distributed.islands.IslandSync` reduces them.
* **Every round (H steps), across islands**: the flat fp32 pseudo-gradient ``Δ`` of a rank is split into its
  non-expert part (and the persistent float buffers), identical on all ``S`` ranks of an island, and its expert
  shards, identical on the ``D`` ranks of its expert-DP group:

      non-expert:  cut into S shards, shard j all-reduced over the cross-island group, all-gather in the island
                   (IslandSync's round)          inter-island: 2 (M−1)/M · ceil(N_ne / S) · 4 bytes per rank
      experts:     cut into D shards, shard d all-reduced over the ranks at (d, e) of every island, which hold the
                   same experts, then all-gather over the expert-DP group
                                                 inter-island: 2 (M−1)/M · ceil(N_ex / D) · 4 bytes per rank

  where ``N_ex`` is the rank's expert-shard elements. Both use the mesh's cross-island groups (``d``, ``e`` fixed):
  the ranks holding the same expert shard at the same place. Every rank then applies the same outer step.
* **Outer optimizers**: the element-wise ones (``sgd``, ``nesterov``; local SGD, SlowMo, DiLoCo; a Python
  ``torch.optim`` factory) on each rank's slices, and the learned ones (``lagg-a``, ``lopt-a``, a weight file, a
  Python :class:`moecpt.lopt.LearnedOuterOptimizer`). A learned optimizer's "tensor" is the whole ``[E, ...]``
  expert tensor, as DDP inside islands steps it on the unsharded model (its per-tensor RMS and row / column
  statistics span the experts): :class:`moecpt.distributed.lopt_shards.ShardedLearnedOuter` all-gathers each expert
  tensor's ``θ``, ``Δ`` and accumulators over the EP group, one tensor at a time, runs the unchanged learned step
  and keeps this rank's experts (kind ``outer_gather``, ``intra_island``); the non-expert tensors are whole on every
  rank and gather nothing. Gather mode (LAgg-A) gathers every island's ``Δ``: the non-expert part as
  :meth:`IslandSync.gather_deltas <moecpt.distributed.islands.IslandSync.gather_deltas>`, the expert piece ``d``
  over the cross-island group, then over the expert-DP group. Another :class:`moecpt.lopt.OuterOptimizer` is
  refused in one line.
* **Accounting**: ``grads`` (DDP), ``all_to_all`` (dispatch, combine, their backward, the count exchange),
  ``expert_grads``, ``expert_gather``, ``stats`` and ``island_gather`` on ``intra_island``; ``sync`` on
  ``inter_island``. The emulated link delays the inter-island collectives only.
* **Checkpoints** are sharded (DCP, ``train.checkpoint_format = "auto"`` or ``"dcp"``;
  :mod:`moecpt.distributed.islands_dcp`): every rank hands DCP its experts as DTensors of the global ``[E, ...]``
  tensors on the ``[islands, dp, ep]`` device mesh, replicated over the islands and the expert-DP ranks (equal at a
  round boundary: each slice is written once), the non-expert tensors as they are; island 0's inner state is the
  ordinary optimizer state, island ``i``'s lies under ``optim.moecpt_sync.inner.i``, the outer state (equal on
  every island) under ``optim.moecpt_sync.outer``. ``Checkpoint.optimizer_state()`` gives exactly the single-file
  state below, and a resume may use another number of expert-DP ranks (the same islands and EP degree).
  ``"single"``: the local-SGD family's single file. Rank 0 gathers the expert shards (d = 0 of each island) to full
  ``[E, ...]`` tensors: ``θ`` from island 0, island 0's full inner optimizer state as the ordinary optimizer state
  (a CPT parent reads a plain AdamW state), island ``i``'s under ``moecpt_sync.inner["i"]``, the outer state
  (identical on all islands) in full (a learned optimizer's gathered over each EP group first: the whole model's
  state), plus ``islands``, ``island_sync`` and ``expert_parallel``; a resume loads the full states and keeps its
  slices (the scatter). A checkpoint of another number of islands, EP size or ``island_sync`` (single-file: of
  another number of workers) is refused in one line (:meth:`~moecpt.distributed.islands.IslandSync.check_resume`).
* **Real ranks only**: ``--simulate-workers`` is refused (the experts are split over processes).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn.parallel import DistributedDataParallel as DDP

from moecpt.distributed.accounting import allgather_bytes, allreduce_bytes
from moecpt.distributed.ddp import _rank0_rng, wrap_ddp
from moecpt.distributed.ep_sync import A2A, average_expert_grads, ep_grad_norm, expert_dcp_view, shard_experts
from moecpt.distributed.islands import LINKS, IslandSync
from moecpt.distributed.islands_dcp import ShardedIslandCheckpoints, is_sharded_state
from moecpt.distributed.launch import gather_to_main
from moecpt.distributed.local_sgd import TorchOuter, _to_cpu, persistent_float_buffers
from moecpt.distributed.lopt_shards import OUTER_GATHER, Dim0Cut, ShardedLearnedOuter
from moecpt.distributed.mesh import Mesh
from moecpt.distributed.strategy import SYNC_KEY, OptimizerFactory, Worker
from moecpt.errors import MoecptError
from moecpt.lopt.optimizers import LearnedOuterOptimizer, OuterOptimizer

INTRA = "intra_island"


class IslandEPSync(ShardedIslandCheckpoints, IslandSync):
    """The local-SGD family across islands with EP × DP inside each (module doc). Real ranks only.

    Args:
        recipe, info, mesh, device, outer: as :class:`~moecpt.distributed.islands.IslandSync` (one local worker);
            ``mesh.ep > 1``.

    Raises:
        MoecptError: not a multi-process job; an :class:`moecpt.lopt.OuterOptimizer` other than a ``torch.optim``
            or a learned one.
    """

    links = {**LINKS, A2A: INTRA, "expert_grads": INTRA, "expert_gather": INTRA, OUTER_GATHER: INTRA}

    def __init__(self, recipe, info, mesh: Mesh, device: torch.device, outer: Any = None):
        if not info.distributed:
            raise MoecptError(f"distributed.expert_parallel={mesh.ep} inside islands splits the experts over real "
                              "ranks; launch them with torchrun (--simulate-workers cannot split them)")
        if isinstance(outer, OuterOptimizer) and not isinstance(outer, (TorchOuter, LearnedOuterOptimizer)):
            raise MoecptError(f"outer optimizer {type(outer).__name__} with expert parallelism inside islands is not "
                              "supported: only torch.optim and learned (LAgg / LOpt) outer optimizers run on expert "
                              "shards")  # before any process group
        super().__init__(recipe, info, mesh, 1, device, outer=outer)
        rank = info.rank
        timeout = datetime.timedelta(seconds=recipe.distributed.timeout_s)
        self.ep_group = self.expert_dp_group = None
        for kind in ("ep", "expert_dp"):  # new_group is collective: every rank, every group, the same order
            for ranks in mesh.all_groups(kind):
                g = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    setattr(self, f"{kind}_group", g)
        self.island, self.dp_index, self.ep_index = mesh.coords(rank)
        self.expert_names: list[str] = []
        self.expert_params: list[nn.Parameter] = []
        self._expert_index: list[int] = []  # inner-optimizer indices of the expert parameters
        self._outer_expert_index: list[int] = []  # their indices in model.parameters() (= the outer state's)
        self._expert_mask: Tensor | None = None  # [N + B] bool over the flat delta: True on expert elements
        self._a2a_step0 = 0
        self.a2a_bytes_last_step = 0
        self._dcp_mesh: DeviceMesh | None = None  # [islands, dp, ep], built at the first DCP save / load

    # ------------------------------------------------------------------------------------------------ set-up
    def check_resume(self, state: dict | None) -> None:
        super().check_resume(state)
        if state is not None and self.island > 0 and str(self.island) not in state.get("inner", {}):
            raise MoecptError(f"the checkpoint has no inner optimizer state for island {self.island}; it was not "
                              "written by expert parallelism inside islands with this layout: resume with its own")

    def _record_a2a(self, sent: int, received: int, seconds: float) -> None:
        t0 = time.perf_counter()
        self.acct.delay(A2A, sent)
        self.acct.record(A2A, sent, received, seconds + time.perf_counter() - t0)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        """Start every rank from rank 0's (full) weights, cut the experts to this rank's shard with this island's
        (full) inner optimizer state, wrap the rest in DDP over the island, and slice the outer state. ``optimizer``
        holds island 0's full state on a resume (the trainer loaded the ordinary optimizer state into it)."""
        self.check_resume(state)
        from_dcp = is_sharded_state(state)  # its tensors come in the DCP load (dcp_global_view)
        with torch.no_grad():  # start-up: not accounted
            for t in [*model.parameters(), *persistent_float_buffers(model)]:
                dist.broadcast(t.data, src=0)
        full = optimizer.state_dict()
        if state is not None and self.island > 0 and not from_dcp:
            full = state["inner"][str(self.island)]
        sharded, self.expert_names, self.expert_params, self._expert_index = shard_experts(
            model, optimizer, full, make_optimizer, self.ep_group, self.mesh.ep, self.ep_index, self._record_a2a)
        DDP._set_params_and_buffers_to_ignore_for_model(model, self.expert_names)
        worker = Worker(self.info.rank, model, wrap_ddp(model, self), sharded)
        params = list(model.parameters())
        experts = {id(p) for p in self.expert_params}
        self._outer_expert_index = [i for i, p in enumerate(params) if id(p) in experts]
        mask = [torch.full((p.numel(),), id(p) in experts) for p in params]
        mask += [torch.zeros(b.numel(), dtype=torch.bool) for b in persistent_float_buffers(model)]
        self._expert_mask = torch.cat(mask).to(self.device)
        self.global_params = [nn.Parameter(p.detach().float().clone(), requires_grad=False) for p in params]
        if isinstance(self.outer, LearnedOuterOptimizer):  # whole [E, ...] tensors: gathered over the EP group
            cuts = [Dim0Cut.even(self.ep_group, self.mesh.ep, self.ep_index, tuple(p.shape)) if id(p) in experts
                    else None for p in params]
            self.outer = ShardedLearnedOuter(self.outer, cuts, self._record)
        self.outer.bind(self.global_params)
        if from_dcp:
            self.begin_sharded_resume(state)
        elif state is not None and state.get("outer") is not None:
            if isinstance(self.outer, ShardedLearnedOuter):
                self.outer.load_full_state_dict(state["outer"])
            else:
                self.outer.load_state_dict(self._outer_slice(state["outer"]))
        return [worker]

    # ------------------------------------------------------------------------------------------------ the step
    def begin_step(self) -> None:
        super().begin_step()
        self._a2a_step0 = self._a2a_total()

    def _a2a_total(self) -> int:
        k = self.acct.kinds.get(A2A, {})
        return int(k.get("bytes_sent", 0) + k.get("bytes_received", 0))

    def after_backward(self, workers: list[Worker]) -> None:
        """Expert gradients: sum over the island's expert-DP group, divide by ``S`` (= DDP's mean over the island)."""
        average_expert_grads(self.expert_params, self.S, self.mesh.dp, self.expert_dp_group, self.acct)

    def grad_norm(self, model: nn.Module, clip: float | None) -> float:
        """The island's global gradient norm (non-expert part once, expert shards summed over the EP group)."""
        return ep_grad_norm(model, self.expert_params, self.ep_group, self.mesh.ep, self.device, self.acct, clip)

    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        self.a2a_bytes_last_step = self._a2a_total() - self._a2a_step0
        super().after_optimizer_step(workers, step, boundary)

    # ----------------------------------------------------------------------------------------------- a round
    def mean_delta(self, flats: list[Tensor]) -> Tensor:
        """``(1/M) Σ_i Δ_i`` over the islands, ``[N + B]``: the non-expert elements by IslandSync's round, the expert
        elements over the ranks holding the same experts (module doc)."""
        (flat,) = flats
        mask = self._expert_mask
        out = torch.empty_like(flat)
        out[~mask] = super().mean_delta([flat[~mask]])
        out[mask] = self._expert_mean(flat[mask])
        return out

    def _expert_mean(self, flat: Tensor) -> Tensor:
        """The expert part: shard ``d`` of ``D`` all-reduced across islands, the shards all-gathered over the
        expert-DP group (which holds the same experts)."""
        D = self.mesh.dp
        n = -(-flat.numel() // D)
        shard = torch.nn.functional.pad(flat, (0, n * D - flat.numel()))[self.dp_index * n:(self.dp_index + 1) * n]
        shard = shard.contiguous()
        t0 = time.perf_counter()
        dist.all_reduce(shard, group=self.cross_group)
        self._record("sync", allreduce_bytes(shard.numel() * shard.element_size(), self.M), t0)
        shard = shard / self.M
        if D == 1:
            return shard[:flat.numel()]
        t0 = time.perf_counter()
        parts = [torch.empty_like(shard) for _ in range(D)]
        dist.all_gather(parts, shard, group=self.expert_dp_group)
        self._record("expert_gather", allgather_bytes(shard.numel() * shard.element_size(), D), t0)
        return torch.cat(parts)[:flat.numel()]

    def gather_deltas(self, flats: list[Tensor]) -> Tensor:
        """Every island's ``Δ_i``, ``[M, N + B]`` in island order (gather mode: LAgg-A): the non-expert elements by
        IslandSync's gather, the expert elements from the ranks holding the same experts (module doc)."""
        (flat,) = flats
        mask = self._expert_mask
        out = flat.new_empty(self.M, flat.numel())
        out[:, ~mask] = super().gather_deltas([flat[~mask]])
        out[:, mask] = self._expert_gather(flat[mask])
        return out

    def _expert_gather(self, flat: Tensor) -> Tensor:
        """The expert part of every island, ``[M, n]``: shard ``d`` of ``D`` all-gathered across islands, then the
        ``[M, n / D]`` pieces all-gathered over the expert-DP group."""
        D = self.mesh.dp
        n = -(-flat.numel() // D)
        shard = torch.nn.functional.pad(flat, (0, n * D - flat.numel()))[self.dp_index * n:(self.dp_index + 1) * n]
        shard = shard.contiguous()
        t0 = time.perf_counter()
        parts = [torch.empty_like(shard) for _ in range(self.M)]
        dist.all_gather(parts, shard, group=self.cross_group)
        self._record("sync", allgather_bytes(shard.numel() * shard.element_size(), self.M), t0)
        every = torch.stack(parts)  # [M, n]
        if D > 1:
            t0 = time.perf_counter()
            pieces = [torch.empty_like(every) for _ in range(D)]
            dist.all_gather(pieces, every, group=self.expert_dp_group)
            self._record("expert_gather", allgather_bytes(every.numel() * every.element_size(), D), t0)
            every = torch.cat(pieces, dim=1)
        return every[:, :flat.numel()]

    # ------------------------------------------------------------------------------------------ checkpoints
    def _outer_slice(self, outer: dict) -> dict:
        """This rank's slice of every full-expert-shaped outer state tensor (the resume's scatter)."""
        state = {}
        for i, per in outer.get("state", {}).items():
            expert = int(i) in self._outer_expert_index
            n = self.global_params[int(i)].shape[0]  # this rank's experts of that layer
            state[i] = {k: v[self.ep_index * n:(self.ep_index + 1) * n].clone()
                        if expert and isinstance(v, Tensor) and v.dim() >= 3 else v for k, v in per.items()}
        return {**outer, "state": state}

    def _assemble(self, shards: list[dict], indices: list[int]) -> dict:
        """A full index-keyed (optimizer-like) state from the EP ranks' states (EP order): the ``indices`` entries'
        expert-shaped tensors concatenated along dim 0, everything else from the first."""
        first = shards[0]
        state = dict(first["state"])
        for i in indices:
            if i in state:
                state[i] = {k: torch.cat([s["state"][i][k] for s in shards]) if isinstance(v, Tensor) and v.dim() >= 3
                            else v for k, v in state[i].items()}
        return {**first, "state": state}

    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        """θ with full experts, every island's full inner state and the full outer state, assembled on rank 0 from
        the ``d = 0`` ranks of every island (module doc). A collective; None elsewhere."""
        w = workers[0]
        learned = isinstance(self.outer, ShardedLearnedOuter)
        outer = self.outer.full_state_dict() if learned else self.outer.state_dict()  # learned: a collective
        mine = None
        if self.dp_index == 0:
            model_state = w.model.state_dict()
            mine = _to_cpu({"experts": {n: model_state[n] for n in self.expert_names},
                            "inner": w.optimizer.state_dict(), "outer": outer})
        every = gather_to_main(mine)
        rng = _rank0_rng(self)
        if not self.info.is_main:
            return None, None, None
        ep = self.mesh.ep
        by_island = [[every[self.mesh.rank(i, 0, e)] for e in range(ep)] for i in range(self.M)]
        model_state = w.model.state_dict()
        for name in self.expert_names:
            model_state[name] = torch.cat([s["experts"][name] for s in by_island[0]])
        inners = [self._assemble([s["inner"] for s in isl], self._expert_index) for isl in by_island]
        outer = by_island[0][0]["outer"] if learned else self._assemble([s["outer"] for s in by_island[0]],
                                                                        self._outer_expert_index)
        opt_state = dict(inners[0])
        opt_state[SYNC_KEY] = {**self.layout_marker(), "outer": outer,
                               "inner": {str(i): s for i, s in enumerate(inners) if i > 0}}
        return model_state, opt_state, rng

    # --------------------------------------------------------------------------------- sharded checkpoints
    def _mesh3(self) -> tuple[DeviceMesh, tuple]:
        """The ``[islands, dp, ep]`` device mesh (the Mesh layout: rank ``i S + d N + e``) and the placements of an
        expert slice on it: replicated over the islands (equal at a round boundary) and the expert-DP ranks, cut
        over ep. A collective the first time (it builds the mesh's groups)."""
        if self._dcp_mesh is None:
            self._dcp_mesh = init_device_mesh(self.device.type, (self.M, self.mesh.dp, self.mesh.ep),
                                              mesh_dim_names=("islands", "dp", "ep"))
        return self._dcp_mesh, (Replicate(), Replicate(), Shard(0))

    def _expert_outer(self, path: tuple[str, ...], ndim: int) -> bool:
        """Whether the outer-state tensor at ``path`` is an expert slice (``[E/N, ...]``, cut over ep): a
        ``torch.optim`` state entry of an expert parameter, or a learned accumulator cut with it."""
        if isinstance(self.outer, ShardedLearnedOuter):
            return len(path) == 1 and self.outer.cut_param(path[0]) is not None
        return len(path) == 3 and path[0] == "state" and int(path[1]) in self._outer_expert_index and ndim >= 3

    def _outer_view(self, path: tuple[str, ...], v: Tensor) -> Tensor:
        if not self._expert_outer(path, v.dim()):
            return v
        mesh, placements = self._mesh3()
        return DTensor.from_local(v, mesh, placements, run_check=False)  # even shards: N divides E

    def _outer_local_shape(self, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self._expert_outer(path, len(shape)):
            return shape
        return (shape[0] // self.mesh.ep, *shape[1:])

    def _state_view(self, model_state: dict, optim_tensors: dict) -> tuple[dict, dict]:
        """This rank's experts (weights and AdamW moments) as DTensors of the global ``[E, ...]`` tensors on the
        ``[islands, dp, ep]`` mesh; the non-expert tensors, equal on every rank, as they are."""
        mesh, placements = self._mesh3()
        return expert_dcp_view(model_state, optim_tensors, self.expert_names, mesh, placements)

    def layout_marker(self) -> dict[str, Any]:
        return {**super().layout_marker(), "expert_parallel": self.mesh.ep}

    # ------------------------------------------------------------------------------------------------ reports
    def record_fields(self) -> dict[str, Any]:
        """IslandSync's fields, plus the all-to-all's: cumulative bytes (sent + received) and the last step's."""
        return {**super().record_fields(), "a2a_bytes": self._a2a_total(), "a2a_bytes_step": self.a2a_bytes_last_step}

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "expert_parallel": self.mesh.ep}

    def summary(self, tokens: int) -> dict[str, Any] | None:
        return {**super().summary(tokens), "expert_parallel": self.mesh.ep}
