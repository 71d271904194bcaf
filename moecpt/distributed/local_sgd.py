"""The local-SGD family: local SGD, SlowMo, DiLoCo and learned outer optimizers, as one outer loop.

Every worker ``k`` starts a communication round from the global parameters ``θ``, takes ``H =
distributed.local_steps`` steps of its inner optimizer on its own part of the data, and the round ends with one
collective and an *outer* step on the pseudo-gradient::

    Δ_k = θ_k − θ                            (each worker; fp32)
    mean mode:   Δ = (1/K) Σ_k Δ_k          (one all-reduce, 2 (K−1)/K x model bytes per worker)
    gather mode: [Δ_1 … Δ_K]                (one all-gather, (K−1) x model bytes; LAgg-A reads every Δ_k)
    θ ← outer_step(θ, Δ)                     (every worker computes the same step: no second collective)
    θ_k ← θ                                  (every worker restarts from the new global parameters)

* ``local-sgd``: outer SGD with LR 1 and no momentum, i.e. θ ← mean_k θ_k: periodic parameter averaging
  (Stich, "Local SGD converges fast and communicates little", ICLR 2019; Lin et al., "Don't use large mini-batches,
  use local SGD", ICLR 2020).
* ``slowmo``: outer heavy-ball SGD on the pseudo-gradient −Δ, outer LR α and momentum β (Wang et al., "SlowMo:
  improving communication-efficient distributed SGD with slow momentum", ICLR 2020, arXiv 1910.00643; this is
  fairscale's implementation by the same authors, which equals Algorithm 1 for a constant inner LR; defaults
  α = 1, β = 0.5 from fairscale).
* ``diloco``: inner AdamW (the recipe's ``[optim]``), outer SGD with Nesterov momentum on −Δ, LR 0.7, momentum 0.9
  (Douillard et al., "DiLoCo: distributed low-communication training of language models", arXiv 2311.08105).
* ``outer_optimizer = "lagg-a" | "lopt-a" | PATH.safetensors``: the learned outer optimizers of
  :mod:`moecpt.lopt` (Joseph et al., arXiv 2312.02204); LAgg-A needs every worker's delta (gather mode) and is
  tied to the K it was meta-trained for.
* Python API: any ``torch.optim.Optimizer`` (``Trainer(..., parallel=Distributed(), outer_optimizer=lambda params:
  torch.optim.Adam(params, lr=...))``), applied to the pseudo-gradient ``θ − mean_k θ_k`` put in ``.grad``; or any
  :class:`moecpt.lopt.OuterOptimizer` (set ``needs_worker_deltas = True`` for gather mode).

Buffers: every persistent floating-point buffer (the MoE expert biases of aux-loss-free balancing) is averaged in the
same collective. Between rounds each worker updates its own biases from its own loads (no per-step communication).

Round boundaries: every H steps, and also at every step after which the trainer evaluates, checkpoints or stops
(a round then ends early; the trainer warns when eval / checkpoint intervals are not multiples of H). So evaluation
always sees the global model and a checkpoint needs no per-worker parameters: it holds θ, the outer optimizer's
state and every worker's inner optimizer state (gathered to rank 0, ``optimizer.pt`` under ``moecpt_sync``).

Memory per worker: the model, its inner optimizer, an fp32 copy of θ, the outer optimizer's state (one more copy for
momentum) and the flat delta (gather mode: K of them).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moecpt.distributed.accounting import ProcessComm
from moecpt.distributed.launch import gather_to_main
from moecpt.distributed.simulate import SimComm, make_replicas
from moecpt.distributed.strategy import SYNC_KEY, OptimizerFactory, SyncStrategy, Worker
from moecpt.errors import MoecptError
from moecpt.lopt import load_pretrained
from moecpt.lopt.optimizers import OuterOptimizer
from moecpt.lopt.schedule_check import fixed_step_schedule_warning
from moecpt.train.checkpoint import capture_rng_state
from moecpt.train.dcp_io import has_refs

TorchOptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


class TorchOuter(OuterOptimizer):
    """Any ``torch.optim.Optimizer`` as an outer optimizer: it steps on the pseudo-gradient
    ``g = −Δ = θ − mean_k θ_k`` placed in ``.grad`` of the global parameters.

    Args:
        factory: ``params -> Optimizer`` (called once, at the first step or state load, with the global parameters).
    """

    needs_worker_deltas = False

    def __init__(self, factory: TorchOptimizerFactory):
        self.factory = factory
        self.opt: torch.optim.Optimizer | None = None
        self._params: list[Tensor] | None = None

    def bind(self, params: list[Tensor]) -> None:
        if self.opt is None:
            self._params = params
            self.opt = self.factory(params)
        elif any(a is not b for a, b in zip(self._params or [], params)):
            raise MoecptError("TorchOuter was bound to other parameter tensors; pass the same global parameters")

    @torch.no_grad()
    def step(self, params: list[Tensor], deltas: list[Tensor]) -> None:
        self._check(params, deltas)
        self.bind(params)
        for p, d in zip(params, deltas):
            p.grad = d.neg().to(p.dtype)
        self.opt.step()
        for p in params:
            p.grad = None

    def state_dict(self) -> dict:
        return self.opt.state_dict() if self.opt is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.opt is None:
            raise MoecptError("TorchOuter.load_state_dict before bind(params)")
        if state:
            self.opt.load_state_dict(state)

    def __repr__(self) -> str:
        return f"TorchOuter({self.opt!r})"


def build_outer_optimizer(name: str, lr: float, momentum: float, workers: int) -> OuterOptimizer:
    """``sgd`` (heavy-ball when momentum > 0), ``nesterov``, ``lagg-a``, ``lopt-a`` or a learned-optimizer weight file.

    Raises:
        MoecptError: unknown name; ``nesterov`` without momentum; a LAgg-A meta-trained for another K.
    """
    if name == "sgd":
        return TorchOuter(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum))
    if name == "nesterov":
        if momentum <= 0:
            raise MoecptError("distributed.outer_optimizer='nesterov' needs distributed.outer_momentum > 0")
        return TorchOuter(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, nesterov=True))
    if name in ("lagg-a", "lopt-a") or name.endswith(".safetensors"):
        return load_pretrained(name, workers=workers)
    raise MoecptError(f"distributed.outer_optimizer={name!r} is unknown; allowed: sgd, nesterov, lagg-a, lopt-a, "
                      "or a learned-optimizer .safetensors file")


def _as_outer(obj: Any) -> OuterOptimizer:
    if isinstance(obj, OuterOptimizer):
        return obj
    if callable(obj):
        return TorchOuter(obj)
    raise MoecptError(f"outer_optimizer={obj!r}: give an OuterOptimizer or a factory params -> torch.optim.Optimizer")


def persistent_float_buffers(model: nn.Module) -> list[Tensor]:
    """Buffers saved in the state dict and averaged at a round (expert biases); counters and RoPE tables are not."""
    saved = set(model.state_dict().keys())
    return [b for n, b in model.named_buffers() if n in saved and b.is_floating_point()]


class LocalSGDSync(SyncStrategy):
    """The outer loop (see module doc). Works with one worker per process (``ProcessComm``) or ``K`` simulated
    workers in one process (``SimComm``)."""

    every_step = False
    reports = True
    dcp_capable = False  # a checkpoint holds the outer state and every worker's inner state: single-file layout
    simulable = True  # --simulate-workers can run this layout (a resume hint names it)

    def __init__(self, recipe, info, num_workers: int, local_workers: int, device: torch.device,
                 outer: Any = None, outer_workers: int | None = None):
        super().__init__(recipe, info, num_workers, local_workers, device)
        d = recipe.distributed
        self.kind = d.sync.value
        self.H = d.local_steps
        #: K of the outer step: the workers whose deltas it combines (the islands of a hierarchical run)
        self.outer_workers = outer_workers or num_workers
        name, lr, momentum = d.outer()
        self.outer_name = name if outer is None else type(outer).__name__
        self.outer = (build_outer_optimizer(name, lr, momentum, self.outer_workers) if outer is None
                      else _as_outer(outer))
        if local_workers > 1 or not info.distributed:
            self.comm = SimComm(self.acct)
        else:
            self.comm = ProcessComm(self.acct)
        self.global_params: list[Tensor] = []
        self._warn_intervals()
        late_kicks = fixed_step_schedule_warning(recipe) if outer is None and info.is_main else None
        if late_kicks:
            warnings.warn(late_kicks, stacklevel=3)

    def _warn_intervals(self) -> None:
        t = self.recipe.train
        odd = [f"train.{k}={v}" for k, v in (("eval_every", t.eval_every), ("checkpoint_every", t.checkpoint_every))
               if v % self.H and v < t.steps]
        if odd and self.info.is_main:
            warnings.warn(f"{', '.join(odd)} not a multiple of distributed.local_steps={self.H}: a communication "
                          "round ends early at each evaluation / checkpoint (they need the global model); choose "
                          "multiples of H to keep every round H steps long", stacklevel=3)

    # ------------------------------------------------------------------------------------------------ set-up
    def check_resume(self, state: dict | None) -> None:
        """Refuse, in one line, a checkpointed strategy state of another layout (``state``: None for a fresh run).

        Raises:
            MoecptError: another sync or number of workers.
        """
        if state is None:
            return
        if not self.dcp_capable and has_refs(state):
            raise MoecptError(f"the checkpoint is sharded (DCP), written by {state.get('islands')} islands with "
                              f"island_sync = {state.get('island_sync')!r}; resume it with that layout")
        kind, k = state.get("kind"), state.get("workers")
        if k != self.num_workers or kind != self.kind:
            how = f"torchrun --nproc-per-node {k}" + (f", or --simulate-workers {k}" if self.simulable else "")
            raise MoecptError(
                f"the checkpoint was written by {k} workers of sync={kind!r}, but this run has "
                f"{self.num_workers} of sync={self.kind!r}; resume with the same number of workers ({how})")

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer: OptimizerFactory,
              state: dict | None) -> list[Worker]:
        self.check_resume(state)
        if self.local_workers > 1:
            pairs = make_replicas(model, optimizer, make_optimizer, self.local_workers)
            workers = [Worker(i, m, m, o) for i, (m, o) in enumerate(pairs)]
        else:
            workers = [Worker(self.info.rank, model, model, optimizer)]
            if self.info.distributed:  # start every rank from rank 0's weights (start-up: not accounted)
                with torch.no_grad():
                    for t in [*model.parameters(), *persistent_float_buffers(model)]:
                        dist.broadcast(t.data, src=0)
        inner = (state or {}).get("inner", {})
        for w in workers:
            if w.index != 0 and str(w.index) in inner:
                w.optimizer.load_state_dict(inner[str(w.index)])
        self.global_params = [nn.Parameter(p.detach().float().clone(), requires_grad=False)
                              for p in self.local_params(workers[0])]
        if isinstance(self.outer, TorchOuter):
            self.outer.bind(self.global_params)
        if state is not None and state.get("outer") is not None:
            self.outer.load_state_dict(state["outer"])
        return workers

    # ----------------------------------------------------------------------------------------------- a round
    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        if step % self.H == 0 or boundary:
            self.sync_round(workers)
        self._end_step()

    def local_params(self, w: Worker) -> list[Tensor]:
        """The parameter tensors this rank's outer step covers, in ``model.parameters()`` order: the whole
        parameters here; an FSDP2 rank's local shards (:mod:`moecpt.distributed.islands_fsdp`)."""
        return list(w.model.parameters())

    def _pack(self, w: Worker) -> Tensor:
        parts = [(p.detach().float() - g).flatten() for p, g in zip(self.local_params(w), self.global_params)]
        parts += [b.detach().float().flatten() for b in persistent_float_buffers(w.model)]
        return torch.cat(parts)

    def mean_delta(self, flats: list[Tensor]) -> Tensor:
        """Mean mode's collective: the local workers' flat deltas ``[N]`` each -> ``(1/K) Σ_k Δ_k`` ``[N]``."""
        return self.comm.all_reduce_sum(flats, "sync") / self.num_workers

    def gather_deltas(self, flats: list[Tensor]) -> Tensor:
        """Gather mode's collective: the local workers' flat deltas -> every worker's, ``[K, N]`` in worker order."""
        return self.comm.all_gather(flats, "sync")

    @torch.no_grad()
    def sync_round(self, workers: list[Worker]) -> None:
        """One communication round: collective, outer step, every worker restarts from the new global θ."""
        flats = [self._pack(w) for w in workers]
        n_param = sum(g.numel() for g in self.global_params)
        shapes = [g.shape for g in self.global_params]
        sizes = [g.numel() for g in self.global_params]
        if self.outer.needs_worker_deltas:
            every = self.gather_deltas(flats)  # [K, N]
            deltas = [d.reshape(self.outer_workers, *s)
                      for d, s in zip(every[:, :n_param].split(sizes, dim=1), shapes)]
            buffers = every[:, n_param:].mean(0)
        else:
            mean = self.mean_delta(flats)
            deltas = [d.reshape(s) for d, s in zip(mean[:n_param].split(sizes), shapes)]
            buffers = mean[n_param:]
        self.outer.step(self.global_params, deltas)
        for w in workers:
            for p, g in zip(self.local_params(w), self.global_params):
                p.copy_(g)
            bufs = persistent_float_buffers(w.model)
            for b, v in zip(bufs, buffers.split([b.numel() for b in bufs])):
                b.copy_(v.reshape(b.shape))
        self.acct.rounds += 1

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, workers: list[Worker]) -> tuple[dict | None, dict | None, dict | None]:
        """θ (every worker holds it: checkpoints fall on round boundaries), worker 0's inner optimizer state as the
        ordinary optimizer state, and under ``moecpt_sync`` the outer state and every other worker's inner state."""
        if self.local_workers > 1 or not self.info.distributed:
            inner = [w.optimizer.state_dict() for w in workers]
            rngs = [capture_rng_state()]
        else:
            inner = gather_to_main(_to_cpu(workers[0].optimizer.state_dict()))
            rngs = gather_to_main(capture_rng_state())
            if not self.info.is_main:
                return None, None, None
        opt_state = dict(inner[0])
        opt_state[SYNC_KEY] = {"kind": self.kind, "workers": self.num_workers, "outer_optimizer": self.outer_name,
                               "outer": self.outer.state_dict(),
                               "inner": {str(k): s for k, s in enumerate(inner) if k > 0}}
        rng = {**rngs[0], "ranks": rngs} if len(rngs) > 1 else rngs[0]
        return workers[0].model.state_dict(), opt_state, rng


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
