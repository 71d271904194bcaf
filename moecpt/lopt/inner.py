"""AdamW workers for the benchmark's published-DiLoCo baseline (Douillard et al., "DiLoCo: Distributed Low-Communication
Training of Language Models", arXiv 2311.08105, Alg. 1: inner AdamW, outer Nesterov SGD).

Each of the K workers of each of the B runs keeps its own AdamW state across communication rounds (DiLoCo never
synchronises the inner optimizer state); at the start of a round its parameters are reset to the global ones.
The SGD workers of :func:`moecpt.lopt.tasks.local_round` are what the learned optimizers were meta-trained with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecpt.lopt.tasks import Task

#: AdamW inner settings: DiLoCo's weight decay 0.1; β = (0.9, 0.95) as the moecpt recipes' AdamW
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8
ADAMW_WEIGHT_DECAY = 0.1


def _per_run(x: Tensor | float, ndim: int) -> Tensor | float:
    """A ``[B·K]`` LR as ``[B·K, 1, ..., 1]`` against a ``ndim``-dim tensor; a float as is."""
    return x.reshape(-1, *([1] * (ndim - 1))) if isinstance(x, Tensor) else x


def init_adamw_state(params: list[Tensor], workers: int) -> dict:
    """Zero AdamW moments for ``B`` runs of ``workers`` workers: ``{"m": [...], "v": [...], "t": 0}`` with
    tensors ``[B · K, *S]`` (float32)."""
    B = params[0].shape[0]
    z = [torch.zeros(B * workers, *p.shape[1:]) for p in params]
    return {"m": z, "v": [t.clone() for t in z], "t": 0}


def local_round_adamw(task: Task, params: list[Tensor], workers: int, steps: int, lr: Tensor | float,
                      state: dict, gen: torch.Generator) -> tuple[list[Tensor], Tensor, dict]:
    """One round of ``steps`` (H) AdamW steps on every worker, from the global ``params`` ``[B, *S]``.

    Args:
        lr: the inner AdamW LR, a float or ``[B]`` (one per run).
        state: from :func:`init_adamw_state` (or a previous round); not modified.

    Returns:
        ``(deltas, loss, new_state)``: ``Δ_k = θ_k − θ`` as ``[B, K, *S]`` per tensor, the workers' mean
        mini-batch loss over the round ``[B]``, and the AdamW state after the round.
    """
    B, K = params[0].shape[0], workers
    b1, b2 = ADAMW_BETAS
    w = [p[:, None].expand(B, K, *p.shape[1:]).reshape(B * K, *p.shape[1:]).float() for p in params]
    lr_bk = lr.repeat_interleave(K) if isinstance(lr, Tensor) else lr
    m, v, t = list(state["m"]), list(state["v"]), int(state["t"])
    total = torch.zeros(B * K)
    for _ in range(steps):
        t += 1
        loss, grads = task.loss_and_grads(w, task.sample(B * K, gen))
        total += loss
        new_w = []
        for i, (wi, gi) in enumerate(zip(w, grads)):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            upd = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + ADAMW_EPS)
            a = _per_run(lr_bk, wi.dim())
            new_w.append(wi * (1 - a * ADAMW_WEIGHT_DECAY) - a * upd)
        w = new_w
    deltas = [wi.reshape(B, K, *wi.shape[1:]) - p[:, None].float() for wi, p in zip(w, params)]
    return deltas, (total / steps).reshape(B, K).mean(dim=1), {"m": m, "v": v, "t": t}
