"""Every-step data parallelism: DDP and FSDP2.

* :class:`DDPSync`: ``torch.nn.parallel.DistributedDataParallel``; gradients are all-reduced in buckets during the
  backward of the last micro-batch (``no_sync`` on the others), through a comm hook that counts the bytes and, with
  an emulated link, delays each bucket. ``broadcast_buffers=False``: the router's per-step load counter is a buffer
  and must not be overwritten by rank 0's; the expert biases stay identical because every rank updates them from
  the same summed loads.
* :class:`FSDPSync`: FSDP2 ``fully_shard`` on every transformer block and on the root, for models whose parameters,
  gradients and AdamW state do not fit one device. Works with gloo on CPU (torch >= 2.6) and NCCL on CUDA.
  Checkpoints use the sharded DCP layout by default (``train.checkpoint_format = "auto"``,
  :mod:`moecpt.train.checkpoint_dcp`): each rank writes its own shards, nothing is gathered, and another world size
  resumes it. With ``"single"`` rank 0 gathers the full model and optimizer state to CPU memory and every rank loads
  the full state before sharding it (one full copy in CPU memory while saving / loading; ``docs/distributed.md``).
  FSDP2 exposes no communication hook, so its traffic is *estimated* (``3 (W-1)/W`` x the fp32 parameter bytes per
  step: all-gather in forward and backward, reduce-scatter of gradients) and the emulated link does not apply.

Both reduce, every step, one small vector per worker: cross-entropy, aux loss and every bias router's load counts
(docs/design.md, rule R6: counts summed over micro-batches *and ranks*), so all ranks take the same skip decision
and the same bias update; each metric declares its reduction (:mod:`moecpt.train.reduce`), and the max-reduced
ones (peak memory, at log steps) travel in a second, MAX all-reduce.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from moecpt.distributed.accounting import ProcessComm, allreduce_bytes, fsdp_step_bytes
from moecpt.distributed.launch import gather_to_main
from moecpt.distributed.strategy import SYNC_KEY, OptimizerFactory, SyncStrategy, Worker
from moecpt.train.checkpoint import capture_rng_state
from moecpt.train.dcp_io import index_keyed
from moecpt.train.metrics import RoutingAccumulator
from moecpt.train.parallel import StepStats
from moecpt.train.reduce import Metric, ReduceType, reduce_metrics


def _router_loads(model: nn.Module) -> list[torch.Tensor]:
    """The current step's load of every bias-balanced router (``Router.is_bias_balanced``), in layer order."""
    return [r.step_load for r in model.routers() if r.is_bias_balanced]


class DataParallelSync(SyncStrategy):
    """Shared by DDP, FSDP and simulated DDP: workers agree after every step."""

    every_step = True
    reports = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.kind = self.recipe.distributed.sync.value
        self.grad_group = None  # every rank: gradients are averaged over the world
        self.grad_workers = self.num_workers
        if self.comm is None:
            self.comm = ProcessComm(self.acct)

    def reduce_step(self, workers: list[Worker], stats: list[StepStats], log: bool
                    ) -> tuple[dict[str, float], list[torch.Tensor] | None, RoutingAccumulator]:
        """Every metric reduced as it declares (docs/design.md, rule D2; :func:`moecpt.train.reduce.reduce_metrics`):
        one SUM all-reduce of a float64 vector per worker holding the means (cross-entropy, aux loss), every bias
        router's load and, at log steps, the routing accumulator's totals (tokens, micro-batches, per-layer counts
        and loss sums); plus one MAX all-reduce when a metric is a max or min (peak memory, at log steps)."""
        acc0 = stats[0].routing
        routing = log and bool(acc0.counts)
        loads0 = _router_loads(workers[0].model)
        per_worker = []
        for w, st in zip(workers, stats):
            m = dict(st.metrics)
            m |= {f"bias_load/{i}": Metric(x, ReduceType.SUM) for i, x in enumerate(_router_loads(w.model))}
            if routing:
                m |= st.routing.as_metrics()
            per_worker.append(m)
        red = reduce_metrics(per_worker, lambda flats, op: self.comm.all_reduce(flats, "stats", op),
                             self.num_workers, self.device)
        scalars = {k: float(red[k][0]) for k in stats[0].metrics}
        loads = [red[f"bias_load/{i}"].round().to(x.device, x.dtype) for i, x in enumerate(loads0)] or None
        # counts and token totals summed, loss sums added (their mean is then over every micro-batch of every
        # worker): the diagnostics of the global batch
        return scalars, loads, RoutingAccumulator.from_reduced(red, acc0) if routing else acc0

    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        self.acct.rounds += 1  # one gradient synchronisation per step
        self._end_step()

    def sharded_checkpoint_state(self, workers: list[Worker]
                                 ) -> tuple[nn.Module, torch.optim.Optimizer, dict | None, dict | None]:
        """This rank's model / optimizer; on rank 0 every rank's RNG state and the strategy marker."""
        rng = _rank0_rng(self)
        extra = {SYNC_KEY: {"kind": self.kind, "workers": self.num_workers}} if self.info.is_main else None
        return workers[0].model, workers[0].optimizer, rng, extra


# --------------------------------------------------------------------------------------------------------- DDP
def wrap_ddp(model: nn.Module, sync: Any) -> DDP:
    """``model`` in torch DDP over ``sync.grad_group`` (None: the world) with :func:`_allreduce_hook`; ``sync`` has
    ``device``, ``info``, ``acct``, ``grad_group`` and ``grad_workers`` (the group's size)."""
    dev = sync.device
    ids = [dev.index if dev.index is not None else sync.info.local_rank] if dev.type == "cuda" else None
    # no buffer broadcast in forward (torch >= 2.13 names it forward_sync_buffers; older: broadcast_buffers)
    no_fwd_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
    module = DDP(model, device_ids=ids, find_unused_parameters=False, process_group=sync.grad_group, **no_fwd_sync)
    module.register_comm_hook(sync, _allreduce_hook)
    return module


def _allreduce_hook(sync, bucket):  # no annotations: DDP checks them and this module's are strings
    """DDP's default all-reduce (divide by the group's size, sum over ``sync.grad_group``: the world, or an island)
    plus byte / time accounting and the emulated link's delay."""
    buf = bucket.buffer()
    n = sync.grad_workers
    sent = allreduce_bytes(buf.numel() * buf.element_size(), n)
    t0 = time.perf_counter()
    buf.div_(n)
    fut = dist.all_reduce(buf, group=sync.grad_group, async_op=True).get_future()

    def done(f):
        sync.acct.delay("grads", sent)
        sync.acct.record("grads", sent, sent, time.perf_counter() - t0)
        return f.value()[0]

    return fut.then(done)


class DDPSync(DataParallelSync):
    """torch DDP, one process per device (see module doc)."""

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        return [Worker(self.info.rank, model, wrap_ddp(model, self), optimizer)]

    def grad_sync(self, worker: Worker, last: bool):
        return contextlib.nullcontext() if last else worker.module.no_sync()

    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        model_state, opt_state, rng = _rank0_state(self, workers[0].model.state_dict(),
                                                   workers[0].optimizer.state_dict())
        return model_state, opt_state, rng


def _rank0_rng(sync: SyncStrategy) -> dict | None:
    """Every rank's RNG state, gathered to rank 0 (None elsewhere); rank 0's own at the top level. A collective."""
    rngs = gather_to_main(capture_rng_state())
    return {**rngs[0], "ranks": rngs} if sync.info.is_main else None


def _rank0_state(sync: SyncStrategy, model_state: dict | None, opt_state: dict | None):
    """Add the strategy marker and every rank's RNG state (gathered to rank 0)."""
    rng = _rank0_rng(sync)
    if not sync.info.is_main:
        return None, None, None
    opt_state = dict(opt_state or {})
    opt_state[SYNC_KEY] = {"kind": sync.kind, "workers": sync.num_workers}
    return model_state, opt_state, rng


# -------------------------------------------------------------------------------------------------------- FSDP2
class FSDPSync(DataParallelSync):
    """FSDP2 ``fully_shard`` (see module doc)."""

    shards_state = True

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        mesh = init_device_mesh(self.device.type, (self.num_workers,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # fully_shard replaced the parameters: build the optimizer anew and hand it the loaded (full) state
        sharded = make_optimizer(model)
        full = optimizer.state_dict()
        if full["state"]:
            set_optimizer_state_dict(model, sharded, _to_fqn(full, sharded, model),
                                     options=StateDictOptions(full_state_dict=True))
        self._n_param_bytes = sum(p.numel() * 4 for p in model.parameters())  # global numel of the DTensors
        return [Worker(self.info.rank, model, model, sharded)]

    def grad_sync(self, worker: Worker, last: bool):
        return fsdp_grad_sync(worker.model, last)

    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        est = fsdp_step_bytes(self._n_param_bytes, self.num_workers)
        self.acct.record("fsdp", est, est, 0.0)
        super().after_optimizer_step(workers, step, boundary)

    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        w = workers[0]
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(w.model, options=opts)  # full tensors on rank 0, empty elsewhere
        opt = get_optimizer_state_dict(w.model, w.optimizer, options=opts)
        opt = index_keyed(opt) if self.info.is_main else None
        return _rank0_state(self, model_state, opt)


@contextlib.contextmanager
def fsdp_grad_sync(model: nn.Module, last: bool):
    """FSDP2's no-sync for gradient accumulation: reduce-scatter the gradients only on the ``last`` micro-batch
    (``set_requires_gradient_sync``), and leave the module syncing again afterwards."""
    model.set_requires_gradient_sync(last)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _fqn_order(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """FQNs of the optimizer's parameters in the order ``Optimizer.state_dict`` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _to_fqn(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """An index-keyed optimizer state dict (the checkpoint format) -> FQN-keyed (torch.distributed.checkpoint)."""
    fqns = _fqn_order(optimizer, model)
    return {"state": {fqns[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in state["param_groups"]]}

