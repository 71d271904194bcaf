"""Expert parallelism × FSDP2 (``distributed.sync = "fsdp"`` with ``distributed.expert_parallel = N``):
:class:`ExpertParallelFSDPSync`.

The 2-D layout of :mod:`moecpt.distributed.mesh` (``[dp D, ep N]`` on a world of ``W = D · N`` ranks, EP groups of
consecutive ranks), every rank reading its own rows of the batch, as under
:class:`~moecpt.distributed.ep_sync.ExpertParallelSync`; only what holds the non-expert parameters changes:

* **Experts**: exactly ExpertParallelSync's: each rank keeps its ``E / N`` experts of every MoE layer
  (:func:`~moecpt.distributed.ep_sync.shard_experts`), tokens travel by all-to-all, the expert gradients (the sum
  over the EP group's tokens) are summed over the ``D`` ranks holding the same shard and divided by ``W``
  (:func:`~moecpt.distributed.ep_sync.average_expert_grads`). The shards are held as DTensors of a one-rank mesh
  (:meth:`ExpertParallelFSDPSync._as_own_dtensors` says why), read through
  :func:`~moecpt.distributed.expert_parallel.local_tensor`.
* **Non-expert parameters** (attention, norms, routers, shared experts, embedding, head): FSDP2 ``fully_shard`` on
  every decoder block and on the root over a 1-D mesh of **all** ``W`` ranks, the expert parameters passed as
  ``ignored_params`` (FSDP2 neither shards nor reduces them). This is torchtitan's choice for the dense part of an
  MoE: it shards it over ``dp_shard_cp``, the whole data-parallel world EP ranks included, since EP borrows its
  ranks from DP; each rank holds ``1 / W`` of the non-expert weights, gradients and AdamW moments. FSDP2's
  reduce-scatter averages over ``W``, as DDP's all-reduce does. torchtitan also FSDP-shards each expert shard
  over the remaining ``dp_shard_mod_ep`` (``D``) ranks; here the expert shard stays whole on each of its ``D``
  ranks (a further ``1 / D`` of the expert state is not taken), which keeps the expert path, its checkpoint view
  and its byte counts those of ExpertParallelSync.
* **Semantics** = DDP at world ``W`` (and so = ExpertParallelSync within fp32 reduction order): routers, aux / z
  losses, capacity dropping and shared experts on the token's rank; bias-router loads and routing metrics summed
  over all ``W`` ranks by the per-step all-reduce of :class:`~moecpt.distributed.ddp.DataParallelSync`. The
  gradient norm (and clipping) is the global one (:meth:`ExpertParallelFSDPSync.grad_norm`).
* **Checkpoints**: sharded (DCP) by default (``train.checkpoint_format = "auto"``): FSDP2's DTensors for the
  non-expert state, the expert slices as DTensors of the global ``[E, ...]`` tensors
  (:meth:`~moecpt.distributed.ep_sync.ExpertParallelParts.dcp_global_view`); nothing is gathered, and another
  world or EP degree resumes it (the sync is part of a run's identity: another sync refuses the folder in one line,
  ``moecpt cpt --from`` and ``checkpoint consolidate`` read it). ``"single"``: rank 0 gathers the non-expert
  state (FSDP2's full state dict) and the expert shards of its EP group, the very file ExpertParallelSync writes.
* **Traffic**: ``all_to_all`` and ``expert_grads`` counted as under ExpertParallelSync; FSDP2 exposes no
  communication hook, so its ``fsdp`` bytes are estimated as :class:`~moecpt.distributed.ddp.FSDPSync` estimates
  them (``3 (W − 1) / W`` × the fp32 non-expert bytes per step); the emulated link does not delay them.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate

from moecpt.distributed.accounting import allreduce_bytes
from moecpt.distributed.ddp import FSDPSync, _rank0_state, _to_fqn
from moecpt.distributed.ep_sync import ExpertParallelParts, _is_expert_state, clip_to, shard_experts, sum_sq
from moecpt.distributed.expert_parallel import local_tensor, routed_experts_of
from moecpt.distributed.strategy import OptimizerFactory, Worker
from moecpt.train.dcp_io import index_keyed


class ExpertParallelFSDPSync(ExpertParallelParts, FSDPSync):
    """FSDP2 over the non-expert parameters of the world, experts split over EP groups (module docstring).

    Args:
        recipe, info, num_workers, local_workers, device: as :class:`~moecpt.distributed.ddp.FSDPSync`.
        mesh: the job's :class:`~moecpt.distributed.mesh.Mesh` (``ep > 1``, one island).
        timeout_s: the EP and expert-DP process groups' collective timeout.
    """

    shards_state = True  # "auto" writes DCP: neither the experts nor the FSDP2 shards are gathered

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        """Cut every MoE layer's experts to this rank's shard, FSDP2-shard the rest over the world, and hand the
        new optimizer the loaded (full) state: expert moments sliced to the shard, the rest sharded by FSDP2's own
        ``set_optimizer_state_dict``. ``optimizer`` holds the full state on a single-file resume or a CPT start
        that keeps the parent's moments; a DCP resume loads into the sharded model afterwards."""
        expert_opt, self.expert_names, self.expert_params, self._expert_index = shard_experts(
            model, optimizer, optimizer.state_dict(), make_optimizer, self.ep_group, self.mesh.ep, self.ep_index,
            self._record_a2a)
        full = expert_opt.state_dict()  # index-keyed: non-expert moments whole, expert ones this rank's slice
        loaded = _to_fqn(full, expert_opt, model) if full["state"] else None
        del expert_opt
        self.expert_params = self._as_own_dtensors(model)
        world = init_device_mesh(self.device.type, (self.num_workers,))
        ignored = set(self.expert_params)
        for block in model.blocks:
            fully_shard(block, mesh=world, ignored_params=ignored)
        fully_shard(model, mesh=world, ignored_params=ignored)
        sharded = make_optimizer(model)  # fully_shard replaced the non-expert parameters
        if loaded is not None:
            # an expert entry is already this rank's slice: "distributed" over its one-rank mesh, it stays as it is
            set_optimizer_state_dict(model, sharded, loaded, options=StateDictOptions(full_state_dict=True))
        experts = {id(p) for p in self.expert_params}
        # FSDPSync's traffic estimate covers what FSDP2 moves: the non-expert parameters (global numel of the DTensors)
        self._n_param_bytes = sum(p.numel() * 4 for p in model.parameters() if id(p) not in experts)
        return [Worker(self.info.rank, model, model, sharded)]

    def _as_own_dtensors(self, model: nn.Module) -> list[nn.Parameter]:
        """Every expert shard's weights as a DTensor of a mesh of this rank alone (``Replicate()``: the local tensor
        is the whole), in :attr:`expert_names` order. Why: a fused or foreach optimizer step refuses a list mixing
        DTensors and plain tensors, and AdamW puts the experts in the groups of FSDP2's parameters; DTensors on
        different meshes step together, each on its own (the forward reads
        :func:`~moecpt.distributed.expert_parallel.local_tensor`). A collective: every rank builds every rank's
        one-rank group."""
        own = None
        for r in range(self.num_workers):  # new_group is collective: every rank, every group, the same order
            g = dist.new_group([r])
            if r == self.info.rank:
                own = DeviceMesh.from_group(g, self.device.type)
        params = []
        for _, layer in routed_experts_of(model):
            for name in ("w_in", "w_out"):
                local = getattr(layer.experts, name)
                p = nn.Parameter(DTensor.from_local(local.detach(), own, (Replicate(),), run_check=False))
                setattr(layer.experts, name, p)
                params.append(p)
        return params

    # ------------------------------------------------------------------------------------------------ the step
    def grad_norm(self, model: nn.Module, clip: float | None) -> float:
        """The global gradient norm ``sqrt(sum over the world of |non-expert shard|^2 + sum over one EP group of
        |expert shard|^2)``: FSDP2's gradient shards partition each non-expert tensor over the ``W`` ranks, and the
        ``dp = 0`` ranks hold every expert once, so one 4-byte all-reduce over the world sums both. Clipped as
        ``torch.nn.utils.clip_grad_norm_`` clips (``clip / (norm + 1e-6)``, at most 1) when ``clip`` is set."""
        experts = {id(p) for p in self.expert_params}
        params = [p for p in model.parameters() if p.grad is not None]
        own = [local_tensor(p.grad) for p in params if id(p) not in experts]
        if self.dp_index == 0:  # the expert shards of one EP group: each expert counted once
            own += [local_tensor(p.grad) for p in params if id(p) in experts]
        sq = sum_sq(own, self.device).reshape(1)
        t0 = time.perf_counter()
        dist.all_reduce(sq)
        n = self.num_workers
        self.acct.record("stats", allreduce_bytes(4, n), allreduce_bytes(4, n), time.perf_counter() - t0)
        total = torch.sqrt(sq[0])
        clip_to([local_tensor(p.grad) for p in params], total, clip)
        return float(total)

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        """The single-file format: FSDP2's full state dict of the non-expert part on rank 0 (a collective of the
        world), the expert weights and their moments gathered from rank 0's EP group (a collective of that group),
        then every rank's RNG state. The result is the file ExpertParallelSync writes."""
        w = workers[0]
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(w.model, options=opts)  # full on rank 0, empty elsewhere
        opt_state = get_optimizer_state_dict(w.model, w.optimizer, options=opts)  # FQN-keyed
        if self.ep_group0 is not None:
            names = dict(zip(self.expert_names, self.expert_params))
            gathered = {n: self._gather(local_tensor(p)) for n, p in names.items()}
            moments = {n: {k: self._gather(local_tensor(v)) if _is_expert_state(v) else local_tensor(v)
                           for k, v in sorted(w.optimizer.state[p].items())}
                       for n, p in names.items() if p in w.optimizer.state}  # the same set on every rank
            if self.info.is_main:
                model_state.update(gathered)
                opt_state = {**opt_state, "state": {**opt_state["state"], **moments}}
        opt_state = index_keyed(opt_state) if self.info.is_main else None
        return _rank0_state(self, model_state, opt_state)
