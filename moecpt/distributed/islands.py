"""Hierarchical local SGD / DiLoCo: data parallelism inside each island every step, the outer step across islands.

``distributed.islands = M`` splits the ``W`` ranks into ``M`` islands of ``S = W / M`` consecutive ranks
(:class:`moecpt.distributed.mesh.Mesh`): a cluster or a node behind a fast link. DiLoCo between clusters with
ordinary data parallelism inside each is OpenDiLoCo's layout (Jaghouar et al., arXiv 2407.07852) and torchft's
replica groups; the outer algorithm is the local-SGD family of :mod:`moecpt.distributed.local_sgd` with ``K = M``.

* **Inside an island, every step**: torch DDP over the island's process group (the same bucketed all-reduce and
  hook as :class:`moecpt.distributed.ddp.DDPSync`: pre-divide by ``S``, sum), and one small all-reduce of the step
  metrics and router loads, so every rank of an island takes the same step and the same bias update. The island's
  ranks therefore hold identical parameters and inner-optimizer states.
* **Across islands, every H steps** (and at evaluation / checkpoint / stop boundaries): the pseudo-gradient
  ``Δ = θ_island − θ`` (fp32, plus the persistent float buffers) is cut into ``S`` equal shards (zero-padded);
  the rank at island position ``j`` exchanges only shard ``j`` with its peers at position ``j`` of every other
  island (the cross-island group), then the island re-assembles ``Δ`` by an all-gather inside the island::

      mean mode:   shard_j ← (1/M) Σ_i shard_j(i)     all-reduce over M:   2 (M−1)/M · N/S · 4 bytes per rank
      gather mode: [shard_j(1) … shard_j(M)]          all-gather over M:   (M−1) · N/S · 4 bytes per rank
      then         all-gather of the S shards inside the island (intra-island link)

  so the slow link carries ``2 (M−1)/M`` times the model bytes per island per round (mean mode), not ``S`` times
  that. Every rank then applies the same outer step to the full ``θ`` (no further collective).
* **The outer optimizer sees M workers**: SGD / Nesterov (DiLoCo) / SlowMo on the mean over islands; a learned
  optimizer is built for ``K = M`` (a LAgg-A meta-trained for 8 workers runs on 8 islands of any size). The batch
  split is still over the world: every rank reads its own rows.

Accounting by link (:class:`moecpt.distributed.accounting.CommAccountant`): ``grads``, ``stats`` and
``island_gather`` travel on ``intra_island``, ``sync`` on ``inter_island``; ``bytes_intra_island`` /
``bytes_inter_island`` (sent + received by one rank, cumulative) appear in every ``metrics.jsonl`` train record and,
with ``*_per_round``, in the run summary. The emulated link (``emulate_bandwidth_gbit`` / ``_latency_ms``) delays
the inter-island collectives only.

Simulation (``--simulate-workers W`` with ``islands = M``): ``W`` replicas in one process, workers ``[i S, (i+1) S)``
form island ``i``; their gradients are averaged every step exactly as DDP's hook does, the round combines the first
worker of every island (all of an island's workers are equal) in island order. With two ranks per group the sums
are a single commutative addition, so a real 2 × 2 job equals the simulator bit for bit (tests/test_islands.py);
with more ranks per group gloo's ring may add in another order (differences at rounding level).

Checkpoints hold ``θ``, the outer state and every rank's inner optimizer state, as for flat local SGD, plus the
number of islands and ``island_sync`` (a resume with another layout is refused).

FSDP2 inside islands (``island_sync = "fsdp"``) is :class:`moecpt.distributed.islands_fsdp.IslandFSDPSync`, a
subclass: FSDP2 instead of DDP every step, and the round on each rank's FSDP shard, without the shards and the
all-gather above (FSDP2 has already cut the model the same way on every island). A learned outer optimizer there
(and under EP inside islands) gathers each tensor whole inside the island for its step
(:mod:`moecpt.distributed.lopt_shards`), so it computes what it computes here.

Expert parallelism inside islands (``expert_parallel = N > 1``, ``island_sync = "ddp"``) is
:class:`moecpt.distributed.islands_ep.IslandEPSync`, a subclass: the experts split over each island's EP groups
every step, their pseudo-gradient reduced across islands with the ranks holding the same experts.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from moecpt.distributed.accounting import allgather_bytes, allreduce_bytes
from moecpt.distributed.ddp import _router_loads, wrap_ddp
from moecpt.distributed.local_sgd import LocalSGDSync
from moecpt.distributed.mesh import Mesh
from moecpt.distributed.simulate import average_grads
from moecpt.distributed.strategy import SYNC_KEY, OptimizerFactory, Worker
from moecpt.errors import MoecptError
from moecpt.train.metrics import RoutingAccumulator
from moecpt.train.parallel import StepStats
from moecpt.train.reduce import Metric, ReduceType, reduce_metrics

#: the link each kind of traffic travels on
LINKS = {"grads": "intra_island", "stats": "intra_island", "island_gather": "intra_island", "sync": "inter_island"}


def _my_group(mesh: Mesh, kind: str, rank: int) -> Any:
    """Create every group of ``kind`` (``new_group`` is collective: all ranks, same order) and return ``rank``'s."""
    mine = None
    for ranks in mesh.all_groups(kind):
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def _local_reduce(flats: list[Tensor], op: ReduceType) -> Tensor:
    """An in-process all-reduce over the workers' tensors, in worker order (the simulator's)."""
    stacked = torch.stack(flats)
    return stacked.amax(0) if op == ReduceType.MAX else stacked.sum(0)


class IslandSync(LocalSGDSync):
    """The local-SGD family across ``mesh.islands`` islands with data parallelism inside each (module doc).

    Args:
        recipe: its ``[distributed]`` chooses the outer algorithm (``sync``, ``local_steps``, ``outer_*``).
        info: this process's rank / world size.
        mesh: the job's layout (:func:`moecpt.distributed.mesh.build_mesh`), ``islands > 1``.
        local_workers: 1 for a rank of a real job, ``mesh.world`` for the simulator.
        device: the training device.
        outer: overrides the recipe's outer optimizer (as for :class:`LocalSGDSync`), built for K = ``islands``.

    Raises:
        MoecptError: a learned outer optimizer meta-trained for another K than ``islands``.
    """

    links = LINKS
    slow_link = "inter_island"

    def __init__(self, recipe, info, mesh: Mesh, local_workers: int, device: torch.device, outer: Any = None):
        self.mesh = mesh
        super().__init__(recipe, info, mesh.world, local_workers, device, outer=outer, outer_workers=mesh.islands)
        self.S, self.M = mesh.island_size, mesh.islands
        self.grad_workers = self.S  # for the DDP hook: gradients are averaged over the island
        self.grad_group = self.cross_group = None
        self.simulated = local_workers > 1
        if not self.simulated and info.distributed:
            self.grad_group = _my_group(mesh, "island", info.rank)
            self.cross_group = _my_group(mesh, "cross_island", info.rank)
        self.position = mesh.island_group(info.rank).index(info.rank) if not self.simulated else 0

    # ------------------------------------------------------------------------------------------------ set-up
    def check_resume(self, state: dict | None) -> None:
        """As :meth:`LocalSGDSync.check_resume`, and the same islands with the same ``island_sync`` and
        ``expert_parallel`` (a checkpoint without these keys is DDP's without EP, written before they existed)."""
        super().check_resume(state)
        if state is None:
            return
        if state.get("islands", 1) != self.M:
            raise MoecptError(f"the checkpoint was written with distributed.islands={state.get('islands', 1)}, but "
                              f"this run has islands={self.M}; resume with the same islands and number of workers")
        if state.get("expert_parallel", 1) != self.mesh.ep:  # EP inside islands: expert shards, another layout
            raise MoecptError(f"the checkpoint was written with distributed.expert_parallel="
                              f"{state.get('expert_parallel', 1)}, but this run has expert_parallel={self.mesh.ep}; "
                              f"resume with expert_parallel = {state.get('expert_parallel', 1)}")
        inside, mine = state.get("island_sync", "ddp"), self.recipe.distributed.island_sync.value
        if inside != mine:
            raise MoecptError(f"the checkpoint was written with distributed.island_sync={inside!r}, but this run has "
                              f"{mine!r}; resume with island_sync = {inside!r}")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        workers = super().setup(model, optimizer, make_optimizer, state)
        if self.grad_group is not None:  # after the world broadcast: every island starts from rank 0's weights
            workers[0].module = wrap_ddp(workers[0].model, self)
        return workers

    def _islands(self, items: list) -> list[list]:
        """The simulator's local workers (or their tensors) grouped by island."""
        return [items[i * self.S:(i + 1) * self.S] for i in range(self.M)]

    def _record(self, kind: str, sent: int, t0: float) -> None:
        self.acct.delay(kind, sent)
        self.acct.record(kind, sent, sent, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------------ the step
    def grad_sync(self, worker: Worker, last: bool):
        if isinstance(worker.module, DDP) and not last:
            return worker.module.no_sync()
        return contextlib.nullcontext()

    def after_backward(self, workers: list[Worker]) -> None:
        """Simulator: average the gradients inside every island (a real rank's DDP did it in the backward)."""
        if not self.simulated:
            return
        t0 = time.perf_counter()
        for island in self._islands(workers):
            average_grads(island, lambda flats: _local_reduce(flats, ReduceType.SUM))
        nbytes = sum(p.grad.numel() * p.grad.element_size() for p in workers[0].model.parameters()
                     if p.grad is not None)
        self._record("grads", allreduce_bytes(nbytes, self.S), t0)  # what each rank's DDP sends

    def _island_all_reduce(self, flats: list[Tensor], op: ReduceType) -> Tensor:
        (t,) = flats
        t0 = time.perf_counter()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == ReduceType.MAX else dist.ReduceOp.SUM,
                        group=self.grad_group)
        self._record("stats", allreduce_bytes(t.numel() * t.element_size(), self.S), t0)
        return t

    def _sim_all_reduce(self, flats: list[Tensor], op: ReduceType, account: bool) -> Tensor:
        t0 = time.perf_counter()
        out = _local_reduce(flats, op)
        if account:  # one island's collective stands for every rank's
            self._record("stats", allreduce_bytes(flats[0].numel() * flats[0].element_size(), self.S), t0)
        return out

    def reduce_step(self, workers: list[Worker], stats: list[StepStats], log: bool
                    ) -> tuple[dict[str, float], None, RoutingAccumulator]:
        """Reduce the step metrics and the bias routers' loads over each island (rule D2 inside the island): the
        scalars are island 0's means (the logged loss covers island 0's rows), and every worker's routers get
        their island's summed loads, so an island's ranks take the same bias update. Across islands nothing is
        reduced (islands drift apart until the round). Routing diagnostics are worker 0's own."""
        per_worker = [{**st.metrics, **{f"bias_load/{i}": Metric(x, ReduceType.SUM)
                                        for i, x in enumerate(_router_loads(w.model))}}
                      for w, st in zip(workers, stats)]
        if self.simulated:
            reduced = [reduce_metrics(group, partial(self._sim_all_reduce, account=i == 0), self.S, self.device)
                       for i, group in enumerate(self._islands(per_worker))]
            owners = self._islands(workers)
        elif self.grad_group is not None:
            reduced, owners = [reduce_metrics(per_worker, self._island_all_reduce, self.S, self.device)], [workers]
        else:  # one rank per island: nothing to reduce inside it
            reduced, owners = [{k: m.flat() for k, m in per_worker[0].items()}], [workers]
        with torch.no_grad():
            for red, group in zip(reduced, owners):
                for w in group:
                    for i, load in enumerate(_router_loads(w.model)):
                        load.copy_(red[f"bias_load/{i}"].round().to(load.device, load.dtype))
        return {k: float(reduced[0][k][0]) for k in stats[0].metrics}, None, stats[0].routing

    # ----------------------------------------------------------------------------------------------- a round
    def _shard(self, flat: Tensor) -> tuple[Tensor, int]:
        """This rank's ``1/S`` share of the zero-padded flat delta, and the shard length."""
        n = -(-flat.numel() // self.S)
        padded = torch.nn.functional.pad(flat, (0, n * self.S - flat.numel()))
        return padded[self.position * n:(self.position + 1) * n].contiguous(), n

    def _island_gather(self, shard: Tensor) -> Tensor:
        """All-gather the S shards inside the island -> ``[S, *shard.shape]``."""
        t0 = time.perf_counter()
        out = [torch.empty_like(shard) for _ in range(self.S)]
        dist.all_gather(out, shard, group=self.grad_group)
        self._record("island_gather", allgather_bytes(shard.numel() * shard.element_size(), self.S), t0)
        return torch.stack(out)

    def _account_round(self, n: int, elem: int, gather: bool) -> None:
        """The simulator's round traffic: what each rank of a real job sends on each link."""
        t0 = time.perf_counter()
        shard_bytes = n * elem
        self._record("sync", allgather_bytes(shard_bytes, self.M) if gather else allreduce_bytes(shard_bytes, self.M),
                     t0)
        if self.S > 1:
            self._record("island_gather", allgather_bytes(shard_bytes * (self.M if gather else 1), self.S),
                         time.perf_counter())

    def mean_delta(self, flats: list[Tensor]) -> Tensor:
        """``(1/M) Σ_i Δ_i`` over the islands, ``[N]``: each rank all-reduces its shard across islands, the island
        all-gathers the shards (module doc)."""
        if self.simulated:
            reps = [group[0] for group in self._islands(flats)]
            self._account_round(-(-reps[0].numel() // self.S), reps[0].element_size(), gather=False)
            return torch.stack(reps).sum(0) / self.M
        (flat,) = flats
        shard, _ = self._shard(flat)
        t0 = time.perf_counter()
        dist.all_reduce(shard, group=self.cross_group)
        self._record("sync", allreduce_bytes(shard.numel() * shard.element_size(), self.M), t0)
        shard = shard / self.M
        full = self._island_gather(shard).flatten() if self.S > 1 else shard
        return full[:flat.numel()]

    def gather_deltas(self, flats: list[Tensor]) -> Tensor:
        """Every island's ``Δ_i``, ``[M, N]`` in island order (gather mode: LAgg-A), sharded as :meth:`mean_delta`."""
        if self.simulated:
            reps = [group[0] for group in self._islands(flats)]
            self._account_round(-(-reps[0].numel() // self.S), reps[0].element_size(), gather=True)
            return torch.stack(reps)
        (flat,) = flats
        shard, n = self._shard(flat)
        t0 = time.perf_counter()
        parts = [torch.empty_like(shard) for _ in range(self.M)]
        dist.all_gather(parts, shard, group=self.cross_group)
        self._record("sync", allgather_bytes(shard.numel() * shard.element_size(), self.M), t0)
        every = torch.stack(parts)  # [M, n]: this position's shard of every island
        if self.S > 1:  # [S, M, n] -> [M, S n]
            every = self._island_gather(every).permute(1, 0, 2).reshape(self.M, self.S * n)
        return every[:, :flat.numel()]

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        """As :meth:`LocalSGDSync.checkpoint_state` (θ, outer state, every rank's inner state), plus ``islands``."""
        model_state, opt_state, rng = super().checkpoint_state(workers)
        if opt_state is not None:
            opt_state[SYNC_KEY] |= self.layout_marker()
        return model_state, opt_state, rng

    def layout_marker(self) -> dict[str, Any]:
        """What a checkpoint's ``moecpt_sync`` records of the layout, so that :meth:`check_resume` can refuse
        another one: the sync, workers (ranks), outer optimizer, islands and ``island_sync`` (subclasses add
        ``expert_parallel``)."""
        return {"kind": self.kind, "workers": self.num_workers, "outer_optimizer": self.outer_name,
                "islands": self.M, "island_sync": self.recipe.distributed.island_sync.value}

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "islands": self.M}

    def summary(self, tokens: int) -> dict[str, Any] | None:
        """The local-SGD summary with the worker count said both ways: ``ranks`` (``W`` processes, the
        accounting's ``workers``, renamed: its per-token figures are per rank) and ``outer_workers`` (``K = M``, the
        deltas the outer optimizer combines), plus ``islands`` and ``island_size``."""
        summary = super().summary(tokens)
        ranks = summary.pop("workers")
        return {**summary, "ranks": ranks, "outer_workers": self.M, "islands": self.M, "island_size": self.S}
