"""Expert parallelism × data parallelism (``distributed.expert_parallel = N``): :class:`ExpertParallelSync`.

The 2-D layout of :mod:`moecpt.distributed.mesh` (``[dp D, ep N]``, EP groups of consecutive ranks), built as
torchtitan and Megatron-Core build it: EP borrows from DP, every rank reads its own rows of the batch.

* **Experts**: each rank keeps its ``E / N`` experts of every MoE layer
  (:class:`~moecpt.distributed.expert_parallel.ExpertParallelExperts`); tokens travel by all-to-all.
* **Gradients**: the non-expert parameters are averaged over all ``W`` ranks by torch DDP, with the expert
  parameters excluded from it (``_set_params_and_buffers_to_ignore_for_model``); the expert gradients, which already
  hold the sum over the EP group's tokens, are summed over the expert-DP group (the ``D`` ranks holding the same
  shard) in one bucketed all-reduce after the last micro-batch and divided by ``W``: exactly DDP's averaged gradient
  ``(1/W) sum_r dL_r/dw``. DDP rather than FSDP2 on a 2-D mesh: the experts are the bulk of an MoE and are already
  split ``N`` ways, and DDP keeps the comm hook (bytes and the emulated link counted as for plain DDP).
* **Semantics** = DDP at world ``W``: the router, its aux / z losses (per rank and micro-batch, averaged through
  the gradients, as DDP), capacity dropping (per rank, on its own ``T``) and the shared expert run on the token's
  rank; bias-router loads and routing metrics are summed over all ``W`` ranks by the same per-step all-reduce as
  DDP (:meth:`~moecpt.distributed.ddp.DataParallelSync.reduce_step`). The gradient norm (and clipping) is the
  global one: non-expert part once, expert part summed over the EP group.
* **Checkpoints** are sharded (DCP) by default (``train.checkpoint_format = "auto"``, :attr:`shards_state`): the
  point of EP is that the experts need not fit on one rank, so rank 0's gather of every expert (and its AdamW
  moments) is what to avoid. :meth:`dcp_global_view` presents each rank's ``[E/N, ...]`` expert slices as DTensors
  of the global ``[E, ...]`` tensors on a ``[dp D, ep N]`` device mesh (``Shard(0)`` over ep, ``Replicate()`` over
  dp), the non-expert state as the replicated plain tensors it is: DCP writes every expert slice and every
  non-expert tensor once (its planner drops the replicas), and a load reads into each rank's slice whatever world
  size and EP degree wrote it (or a process without EP reads full tensors). ``"single"`` keeps the single-file
  format: rank 0 gathers the expert shards from its EP group; every rank loads the full file and keeps its slice.
* **Traffic**: ``all_to_all`` (dispatch, combine and their backward, plus the count exchange) apart from ``grads``
  (DDP buckets) and ``expert_grads``; the emulated link delays each exchange.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn.parallel import DistributedDataParallel as DDP

from moecpt.distributed.accounting import allreduce_bytes
from moecpt.distributed.ddp import DDPSync, _rank0_state
from moecpt.distributed.expert_parallel import ExpertParallelExperts, local_tensor, routed_experts_of
from moecpt.distributed.mesh import Mesh
from moecpt.distributed.strategy import OptimizerFactory, Worker

#: expert gradients are all-reduced in flat buckets of at most this many bytes (DDP's default bucket size)
BUCKET_BYTES = 25 * 2**20
A2A = "all_to_all"


class ExpertParallelParts:
    """What expert parallelism shares whatever synchronises the non-expert parameters (DDP here, FSDP2 in
    :class:`moecpt.distributed.ep_fsdp.ExpertParallelFSDPSync`): the EP and expert-DP process groups, the
    all-to-all accounting, the expert gradients' average, the DCP view of the expert slices, the gather of the
    single-file format and the reports. A mixin before a :class:`~moecpt.distributed.ddp.DataParallelSync`
    subclass; every rank builds every EP and expert-DP process group (``new_group`` is collective) in
    :meth:`__init__`. The subclass's ``setup`` sets :attr:`expert_names`, :attr:`expert_params` and
    ``_expert_index`` (:func:`shard_experts`)."""

    def __init__(self, *args: Any, mesh: Mesh, timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mesh = mesh
        rank = self.info.rank
        timeout = datetime.timedelta(seconds=timeout_s)
        self.ep_group = self.expert_dp_group = None
        self.ep_group0 = None  # rank 0's EP group: the checkpoint gather
        for ranks in mesh.all_groups("ep"):
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                self.ep_group = g
            if 0 in ranks:
                self.ep_group0 = g if rank in ranks else None
        for ranks in mesh.all_groups("expert_dp"):
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                self.expert_dp_group = g
        self.dp_index, self.ep_index = mesh.coords(rank)[1:]
        self.expert_names: list[str] = []
        self.expert_params: list[nn.Parameter] = []
        self._expert_index: list[int] = []
        self._a2a_step0 = 0
        self.a2a_bytes_last_step = 0
        self._dcp_mesh: DeviceMesh | None = None  # built at the first DCP save / load (collective)

    def _record_a2a(self, sent: int, received: int, seconds: float) -> None:
        t0 = time.perf_counter()
        self.acct.link.delay(sent)
        self.acct.record(A2A, sent, received, seconds + time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------------ the step
    def begin_step(self) -> None:
        super().begin_step()
        self._a2a_step0 = self._a2a_total()

    def _a2a_total(self) -> int:
        k = self.acct.kinds.get(A2A, {})
        return int(k.get("bytes_sent", 0) + k.get("bytes_received", 0))

    def after_backward(self, workers: list[Worker]) -> None:
        """Expert gradients: sum over the expert-DP group, divide by ``W`` (= DDP's mean). An expert shard that got no
        token on any rank gets a zero gradient, as in one process (AdamW then steps it like every other)."""
        average_expert_grads(self.expert_params, self.num_workers, self.mesh.dp, self.expert_dp_group, self.acct)

    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        self.a2a_bytes_last_step = self._a2a_total() - self._a2a_step0
        super().after_optimizer_step(workers, step, boundary)

    def record_fields(self) -> dict[str, Any]:
        """The base's cumulative fields, plus the all-to-all's: cumulative bytes (sent + received) and the last
        step's."""
        return {**super().record_fields(), "a2a_bytes": self._a2a_total(), "a2a_bytes_step": self.a2a_bytes_last_step}

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "expert_parallel": self.mesh.ep}

    def summary(self, tokens: int) -> dict[str, Any] | None:
        return {**super().summary(tokens), "expert_parallel": self.mesh.ep}

    # ------------------------------------------------------------------------------------------ checkpoints
    def dcp_global_view(self, model_state: dict, optim_tensors: dict) -> tuple[dict, dict]:
        """Each expert tensor of this rank (weights ``[E/N, ...]`` and their AdamW moments) as a DTensor of the global
        ``[E, ...]`` tensor on the ``[dp, ep]`` device mesh, ``Shard(0)`` over ep and ``Replicate()`` over dp,
        sharing storage with the slice (so a DCP load fills it in place); everything else as it is (identical on
        every rank, or FSDP2's own DTensors: DCP writes it once). A collective the first time (it builds the device
        mesh's groups).

        Args:
            model_state: ``{fqn: tensor}`` (``get_state_dict``'s, keyed as :attr:`expert_names`).
            optim_tensors: ``{"state": {fqn: {name: tensor}}}`` (:func:`~moecpt.train.dcp_io.split_optimizer_state`).
        """
        if self._dcp_mesh is None:
            # rank d * N + e of the [dp, ep] mesh = the Mesh layout (islands = 1 under EP)
            self._dcp_mesh = init_device_mesh(self.device.type, (self.mesh.dp, self.mesh.ep),
                                              mesh_dim_names=("dp", "ep"))
        return expert_dcp_view(model_state, optim_tensors, self.expert_names, self._dcp_mesh, (Replicate(), Shard(0)))

    def _gather(self, t: torch.Tensor) -> torch.Tensor | None:
        """The full ``[E, ...]`` tensor on rank 0 (on the host: one expert tensor at a time on the device)."""
        t = t.detach().contiguous()
        full = t.new_empty(self.mesh.ep * t.shape[0], *t.shape[1:]) if self.info.is_main else None
        dist.gather(t, list(full.chunk(self.mesh.ep)) if full is not None else None, dst=0, group=self.ep_group0)
        return full.cpu() if full is not None else None


class ExpertParallelSync(ExpertParallelParts, DDPSync):
    """DDP over the non-expert parameters, experts split over EP groups (module docstring)."""

    shards_state = True  # the experts are split over the EP group: "auto" writes DCP, gathering nothing

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        """Cut every MoE layer's experts to this rank's shard, move the (loaded, full) optimizer state to a new
        optimizer over the shards, and wrap the rest in DDP."""
        sharded, self.expert_names, self.expert_params, self._expert_index = shard_experts(
            model, optimizer, optimizer.state_dict(), make_optimizer, self.ep_group, self.mesh.ep, self.ep_index,
            self._record_a2a)
        DDP._set_params_and_buffers_to_ignore_for_model(model, self.expert_names)
        return super().setup(model, sharded, make_optimizer, state)

    # ------------------------------------------------------------------------------------------------ the step
    def grad_norm(self, model: nn.Module, clip: float | None) -> float:
        """The global gradient norm ``sqrt(|non-expert|^2 + sum over the EP group of |expert shard|^2)``, clipped
        as ``torch.nn.utils.clip_grad_norm_`` clips (``clip / (norm + 1e-6)``, at most 1) when ``clip`` is set."""
        return ep_grad_norm(model, self.expert_params, self.ep_group, self.mesh.ep, self.device, self.acct, clip)

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        """The single-file format: rank 0 gathers the expert weights and their optimizer moments from its EP group
        (a collective of that group; the RNG gather of every rank follows)."""
        w = workers[0]
        model_state, opt_state = w.model.state_dict(), w.optimizer.state_dict()
        if self.ep_group0 is not None:
            for name in self.expert_names:
                model_state[name] = self._gather(model_state[name])
            st = dict(opt_state["state"])
            for i in self._expert_index:
                if i in st:  # the same set on every rank: all stepped the same parameters
                    st[i] = {k: self._gather(v) if _is_expert_state(v) else v for k, v in st[i].items()}
            opt_state = {**opt_state, "state": st}
        return _rank0_state(self, model_state, opt_state)


def shard_experts(model: nn.Module, optimizer: torch.optim.Optimizer, full_state: dict,
                  make_optimizer: OptimizerFactory, group, ep: int, ep_index: int, record
                  ) -> tuple[torch.optim.Optimizer, list[str], list[nn.Parameter], list[int]]:
    """Replace every MoE layer's experts by this rank's ``E / ep`` (:class:`ExpertParallelExperts` over ``group``)
    and build a new optimizer over the model, loaded with ``full_state`` (an index-keyed state of ``optimizer``,
    the full model's) with every expert moment sliced to the shard.

    Returns:
        ``(optimizer over the shards, expert parameter names, expert parameters, optimizer indices of the experts)``.
    """
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    sliced: dict[int, slice] = {}
    names: list[str] = []
    params: list[nn.Parameter] = []
    for fqn, layer in routed_experts_of(model):
        full = layer.experts
        shard = ExpertParallelExperts(full, group, ep, ep_index, record)
        lo = ep_index * shard.local_experts
        for name in ("w_in", "w_out"):
            sliced[index[id(getattr(full, name))]] = slice(lo, lo + shard.local_experts)
            names.append(f"{fqn}.experts.{name}")
        layer.replace_experts(shard)
        params += [shard.w_in, shard.w_out]
    sharded = make_optimizer(model)
    if full_state["state"]:
        st = {int(k): v for k, v in full_state["state"].items()}
        for i, sl in sliced.items():
            if i in st:
                st[i] = {k: v[sl].clone() if _is_expert_state(v) else v for k, v in st[i].items()}
        sharded.load_state_dict({**full_state, "state": st})
    return sharded, names, params, sorted(sliced)


def average_expert_grads(params: list[nn.Parameter], divisor: int, dp: int, group, acct) -> None:
    """Expert gradients (each the sum over its EP group's tokens) summed over the ``dp`` ranks of ``group`` holding
    the same shard, in flat buckets, and divided by ``divisor`` (the ranks DDP averages over). A shard that got no
    token on any rank gets a zero gradient, as in one process."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([local_tensor(p.grad) for p in params], BUCKET_BYTES):  # views: written in place
        flat = torch.cat([g.reshape(-1) for g in bucket]).div_(divisor)
        if dp > 1:
            t0 = time.perf_counter()
            dist.all_reduce(flat, group=group)
            sent = allreduce_bytes(flat.numel() * flat.element_size(), dp)
            acct.delay("expert_grads", sent)
            acct.record("expert_grads", sent, sent, time.perf_counter() - t0)
        off = 0
        for g in bucket:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()


def ep_grad_norm(model: nn.Module, expert_params: list[nn.Parameter], ep_group, ep: int, device: torch.device,
                 acct, clip: float | None) -> float:
    """The global gradient norm of an EP rank's model (:meth:`ExpertParallelSync.grad_norm`): the non-expert part
    once, the expert shards' squares summed over ``ep_group`` (``ep`` ranks); clipped when ``clip`` is set."""
    experts = {id(p) for p in expert_params}
    params = [p for p in model.parameters() if p.grad is not None]
    exp_sq = sum_sq([p.grad for p in params if id(p) in experts], device).reshape(1)
    t0 = time.perf_counter()
    dist.all_reduce(exp_sq, group=ep_group)
    acct.record("stats", allreduce_bytes(4, ep), allreduce_bytes(4, ep), time.perf_counter() - t0)
    total = torch.sqrt(sum_sq([p.grad for p in params if id(p) not in experts], device) + exp_sq[0])
    clip_to([p.grad for p in params], total, clip)
    return float(total)


def sum_sq(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``sum |g|^2`` over the (local) gradient tensors ``grads``, a 0-d fp32 tensor (per-tensor norms first, as
    ``clip_grad_norm_``); 0 for none."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).square().sum()


def clip_to(grads: list[torch.Tensor], total: torch.Tensor, clip: float | None) -> None:
    """Scale ``grads`` in place as ``torch.nn.utils.clip_grad_norm_`` does for a global norm ``total``:
    by ``min(1, clip / (total + 1e-6))``; nothing when ``clip`` is None."""
    if clip is None:
        return
    coef = torch.clamp(clip / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))


def expert_dcp_view(model_state: dict, optim_tensors: dict, expert_names: list[str], mesh: DeviceMesh,
                    placements: tuple) -> tuple[dict, dict]:
    """Each expert tensor of this rank (weights ``[E/N, ...]`` and their AdamW moments) as a DTensor of the global
    ``[E, ...]`` tensor on ``mesh`` (``Shard(0)`` over its ep dim, ``Replicate()`` over the others), sharing storage
    with the slice so that a DCP load fills it in place; everything else as it is (a
    :data:`moecpt.train.checkpoint_dcp.GlobalView` for :class:`ExpertParallelSync` and
    :class:`moecpt.distributed.islands_ep.IslandEPSync`)."""
    def view(t: torch.Tensor) -> DTensor:
        # the shards are even (N divides E), so the global shape follows without a collective; under FSDP2 the
        # slice is a DTensor of one rank (local_tensor)
        return DTensor.from_local(local_tensor(t), mesh, placements, run_check=False)

    experts = set(expert_names)
    model_state = {k: view(v) if k in experts else v for k, v in model_state.items()}
    state = {fqn: {k: view(v) if fqn in experts and _is_expert_state(v) else v for k, v in entry.items()}
             for fqn, entry in optim_tensors.get("state", {}).items()}
    return model_state, {**optim_tensors, "state": state}


def _is_expert_state(v: Any) -> bool:
    """An optimizer state entry shaped like its expert parameter (AdamW's moments), not a scalar ``step``."""
    return isinstance(v, torch.Tensor) and v.dim() >= 3


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of at most ``limit`` bytes each (a larger tensor alone), grouped by dtype and device."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if out and size + n <= limit and (out[-1][0].dtype, out[-1][0].device) == (t.dtype, t.device):
            out[-1].append(t)
            size += n
        else:
            out.append([t])
            size = n
    return out
