"""Truncated Persistent Evolution Strategies (PES) for the learned outer optimizers.

Vicol, Metz, Sohl-Dickstein, "Unbiased Gradient Estimation in Unrolled Computation Graphs with Persistent
Evolution Strategies", ICML 2021, Alg. 2 (antithetic form), as used by Joseph et al. (arXiv 2312.02204, Sec. 4):
``P`` antithetic pairs of inner trainings ("trajectories") run side by side. At every meta-iteration each pair
draws a perturbation ``ε ~ N(0, σ² I)`` of the meta-parameters ``φ``, its "+" particle unrolls ``T`` rounds
(the truncation) with ``φ + ε`` and its "−" particle with ``φ − ε``, on the same mini-batches. Each pair keeps
``ξ``, the sum of the perturbations since its trajectory started (including the current ``ε``); the estimate

    ĝ = 1 / (2 σ² P T) · Σ_pairs Σ_t ξ_t · (L⁺_t − L⁻_t)

is unbiased for the gradient of the Gaussian-smoothed meta-loss over the *whole* trajectory, although no
trajectory is ever unrolled in one piece. ``L_t`` is the round-``t`` meta-loss: the workers' mean local training
loss, clipped at ``1.5 · ln(classes)`` (non-finite values count as the clip). A trajectory that reaches its length
(log-uniform in [100, 1000] rounds) restarts from a fresh model and ``ξ`` restarts at ``ε``; the first lengths are
scaled by a uniform factor so that restarts are staggered rather than synchronised.

Everything is batched: the ``2P`` particles are one batch of models ``[2P, *S]``, their ``K`` workers another
factor of the batch (``[2P·K, *S]`` during local steps), so a meta-iteration is a few large matmuls per step.
Particle ``2i`` is the "+" of pair ``i`` and particle ``2i + 1`` its "−".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moecpt.lopt.mlp import LOptSpec
from moecpt.lopt.optimizers import init_lopt_state, lopt_step
from moecpt.lopt.tasks import Task, local_round


@dataclass(frozen=True)
class PESConfig:
    """Hyperparameters of PES (defaults: Joseph et al., arXiv 2312.02204, Sec. 4) and of the inner problem.

    Attributes:
        pairs: antithetic pairs per meta-iteration (8).
        sigma: perturbation standard deviation (0.01).
        truncation: rounds unrolled per meta-iteration (50).
        min_length, max_length: trajectory lengths in rounds, log-uniform (100, 1000).
        workers: K (8).
        local_steps: H, local SGD steps per round (4).
        local_lr: workers' SGD learning rate; None uses the task's (0.5 for the MLPs).
    """

    pairs: int = 8
    sigma: float = 0.01
    truncation: int = 50
    min_length: int = 100
    max_length: int = 1000
    workers: int = 8
    local_steps: int = 4
    local_lr: float | None = None


def sample_lengths(n: int, cfg: PESConfig, gen: torch.Generator) -> Tensor:
    """``n`` trajectory lengths (int64 rounds), log-uniform in ``[min_length, max_length]``."""
    lo, hi = math.log(cfg.min_length), math.log(cfg.max_length)
    return torch.exp(lo + (hi - lo) * torch.rand(n, generator=gen)).round().long()


def _pair_expand(x: Tensor) -> Tensor:
    """``[P, ...]`` -> ``[2P, ...]`` with each pair's value repeated for its two particles."""
    return x.repeat_interleave(2, dim=0)


def init_pes_state(task: Task, spec: LOptSpec, cfg: PESConfig, gen: torch.Generator) -> dict:
    """Fresh persistent state of ``cfg.pairs`` pairs: models, optimizer accumulators, ``ξ``, positions, lengths.

    All values are tensors (or lists / dicts of them), so the state is saved with ``torch.save`` and read back
    with ``weights_only=True``.
    """
    P = cfg.pairs
    params = [_pair_expand(p) for p in task.init_params(P, gen)]
    lengths = sample_lengths(P, cfg, gen)
    stagger = torch.rand(P, generator=gen)
    lengths = torch.maximum((lengths.float() * stagger).round().long(), torch.full_like(lengths, cfg.truncation))
    return {
        "params": params,
        "opt": init_lopt_state(spec, params),
        "xi": torch.zeros(P, spec.num_meta_params),
        "round": torch.zeros(P, dtype=torch.long),
        "length": lengths,
    }


def _reset_pairs(state: dict, done: Tensor, task: Task, spec: LOptSpec, cfg: PESConfig, gen: torch.Generator) -> None:
    """Restart the trajectories of the pairs in ``done`` (``[P]`` bool) in place."""
    idx = done.nonzero()[:, 0]
    n = len(idx)
    fresh = [_pair_expand(p) for p in task.init_params(n, gen)]
    pidx = torch.stack([2 * idx, 2 * idx + 1], dim=1).reshape(-1)
    for p, f in zip(state["params"], fresh):
        p[pidx] = f
    opt = state["opt"]
    opt["t"][pidx] = 0
    for acc in opt["acc"]:
        for v in acc.values():
            v[pidx] = 0.0
    state["round"][idx] = 0
    state["length"][idx] = sample_lengths(n, cfg, gen)


class AntitheticPES:
    """The estimator itself, independent of what is unrolled (tested on a quadratic).

    Usage per meta-iteration: ``thetas = est.begin(phi, gen)`` (``[2P, N]``: pair ``i`` is rows ``2i`` (+) and
    ``2i + 1`` (−)), then for each unrolled round ``est.observe(losses)`` (``[2P]``) and ``est.restart(done)``
    (``[P]`` bool) for the pairs whose trajectory restarts after that round, then ``grad = est.end()``.

    Args:
        xi: ``[P, N]`` accumulated perturbations carried over from the previous truncation (zeros at the start).
        sigma: perturbation standard deviation.
    """

    def __init__(self, xi: Tensor, sigma: float):
        self.xi = xi.clone()
        self.sigma = sigma
        self.eps: Tensor | None = None
        self.grad: Tensor | None = None
        self.rounds = 0

    def begin(self, phi: Tensor, gen: torch.Generator) -> Tensor:
        P = self.xi.shape[0]
        self.eps = torch.randn(P, phi.numel(), generator=gen, dtype=phi.dtype) * self.sigma
        self.xi = self.xi + self.eps
        self.grad = torch.zeros_like(phi)
        self.rounds = 0
        return torch.stack([phi + self.eps, phi - self.eps], dim=1).reshape(2 * P, -1)

    def observe(self, losses: Tensor) -> None:
        self.grad += (losses[0::2] - losses[1::2]).to(self.xi.dtype) @ self.xi
        self.rounds += 1

    def restart(self, done: Tensor) -> None:
        self.xi[done] = self.eps[done]

    def end(self) -> Tensor:
        """``1 / (2 σ² P T) Σ ξ (L⁺ − L⁻)``; afterwards :attr:`xi` is the state to carry over."""
        P = self.xi.shape[0]
        return self.grad / (2 * self.sigma**2 * P * max(self.rounds, 1))


def pes_gradient(
    task: Task,
    spec: LOptSpec,
    phi: Tensor,
    state: dict,
    cfg: PESConfig,
    gen: torch.Generator,
) -> tuple[Tensor, float, dict]:
    """Unroll one truncation of every pair of a learned optimizer's inner trainings; return the PES estimate.

    Args:
        phi: flat meta-parameters ``[N]``.
        state: from :func:`init_pes_state`; updated in place (and returned).

    Returns:
        ``(grad [N], mean_loss, state)``: the estimate of d(meta-loss)/dφ (meta-loss in nats), and the mean
        clipped loss over particles and rounds (the meta-training curve).
    """
    P, K, H = cfg.pairs, cfg.workers, cfg.local_steps
    lr = cfg.local_lr if cfg.local_lr is not None else task.local_lr
    clip = 1.5 * math.log(task.num_classes)
    est = AntitheticPES(state["xi"], cfg.sigma)
    meta = spec.unflatten(est.begin(phi, gen))
    groups = torch.arange(2 * P) // 2
    loss_sum = 0.0
    params, opt = state["params"], state["opt"]
    for _ in range(cfg.truncation):
        deltas, loss = local_round(task, params, K, H, lr, gen, groups=groups)
        loss = torch.nan_to_num(loss, nan=clip, posinf=clip).clamp(max=clip)
        est.observe(loss)
        loss_sum += float(loss.mean())
        if not spec.aggregator:
            deltas = [d.mean(dim=1) for d in deltas]
        params, opt = lopt_step(spec, meta, params, deltas, opt)
        state["params"], state["opt"] = params, opt
        state["round"] += 1
        bad = torch.zeros(P, dtype=torch.bool)
        for p in params:
            bad |= ~torch.isfinite(p.reshape(P, -1)).all(dim=1)
        done = (state["round"] >= state["length"]) | bad
        if bool(done.any()):
            _reset_pairs(state, done, task, spec, cfg, gen)
            params, opt = state["params"], state["opt"]
            est.restart(done)
    state["xi"] = est.xi
    return est.end(), loss_sum / cfg.truncation, state
