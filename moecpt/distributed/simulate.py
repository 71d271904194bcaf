"""``--simulate-workers K``: K data-parallel workers in one process, for research on one machine.

The simulator gives the updates of a K-process run (the tests check it against a real 2-process gloo run):

* worker ``k`` trains on the ``k``-th contiguous block of each global batch, exactly the rows rank ``k`` of a real
  job reads (:class:`moecpt.data.mixture.MixtureSampler` gives rank ``r`` rows ``[r b, (r + 1) b)``);
* each worker has its own model replica and inner optimizer (deep copies of worker 0's at start-up);
* collectives become sums over the workers' tensors (:class:`SimComm`), in worker order, and are accounted with the
  byte volumes of a K-worker ring (and delayed by an emulated link, if one is configured), so ``comm_bytes`` reads
  the same as in the real run.

Workers run one after the other, so the simulator needs K times the memory of one worker and reports the *sum* of
the workers' compute time. Under ``sync = ddp`` (:class:`SimulatedDDPSync`) the gradients are averaged after the
backward (pre-divided by K, then summed, as DDP's default hook does), then every replica takes the same step.
FSDP cannot be simulated. Checkpoints are interchangeable with those of a K-process run of the same recipe.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

from moecpt.distributed.accounting import Comm, allgather_bytes, allreduce_bytes
from moecpt.distributed.ddp import DataParallelSync
from moecpt.distributed.strategy import SYNC_KEY, OptimizerFactory, Worker
from moecpt.train.checkpoint import capture_rng_state


class SimComm(Comm):
    """In-process collectives over the K workers' tensors (accounted as a K-worker ring)."""

    def all_reduce_sum(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        return self._reduce(flats, kind, lambda stacked: stacked.sum(0))

    def all_reduce_max(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        return self._reduce(flats, kind, lambda stacked: stacked.amax(0))

    def _reduce(self, flats: list[torch.Tensor], kind: str, op) -> torch.Tensor:
        t0 = time.perf_counter()
        out = op(torch.stack(flats)) if len(flats) > 1 else flats[0].clone()
        self._account(kind, allreduce_bytes(flats[0].numel() * flats[0].element_size(), self.workers), t0)
        return out

    def all_gather(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        t0 = time.perf_counter()
        out = torch.stack(flats)
        self._account(kind, allgather_bytes(flats[0].numel() * flats[0].element_size(), self.workers), t0)
        return out


def make_replicas(model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
                  k: int) -> list[tuple[nn.Module, torch.optim.Optimizer]]:
    """``[(model, optimizer)]`` plus ``k - 1`` deep copies; a copy's optimizer starts from worker 0's state (e.g. the
    parent's moments of a CPT run), as every rank of a real job loads the same state."""
    out = [(model, optimizer)]
    state = optimizer.state_dict() if optimizer.state else None
    for _ in range(k - 1):
        m = copy.deepcopy(model)
        o = make_optimizer(m)
        if state is not None:  # a deep copy: load_state_dict would share worker 0's moment tensors
            o.load_state_dict(copy.deepcopy(state))
        out.append((m, o))
    return out


@torch.no_grad()
def average_grads(workers: list[Worker], all_reduce_sum: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
    """Average the workers' gradients as DDP's default hook does: each worker's flat gradient pre-divided by the
    number of workers, then summed in worker order (``all_reduce_sum``: ``[N]`` per worker -> ``[N]``); every
    worker's ``.grad`` gets the result."""
    params = [[p for p in w.model.parameters() if p.grad is not None] for w in workers]
    flats = [torch.cat([p.grad.flatten() for p in ps]) / len(workers) for ps in params]
    mean = all_reduce_sum(flats)
    for ps in params:
        pos = 0
        for p in ps:
            p.grad.copy_(mean[pos:pos + p.numel()].view_as(p.grad))
            pos += p.numel()


class SimulatedDDPSync(DataParallelSync):
    """DDP with K in-process workers (see module doc)."""

    dcp_capable = False  # K workers in one process: the single-file layout only

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.comm = SimComm(self.acct)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        return [Worker(i, m, m, o) for i, (m, o) in enumerate(make_replicas(model, optimizer, make_optimizer,
                                                                               self.local_workers))]

    def after_backward(self, workers: list[Worker]) -> None:
        average_grads(workers, lambda flats: self.comm.all_reduce_sum(flats, "grads"))

    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        opt = dict(workers[0].optimizer.state_dict())
        opt[SYNC_KEY] = {"kind": self.kind, "workers": self.num_workers}
        return workers[0].model.state_dict(), opt, capture_rng_state()
