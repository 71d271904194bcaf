"""Hand-designed outer optimizers with the :class:`~moecpt.lopt.optimizers.OuterOptimizer` interface.

All take the mean delta ``Δ = mean_k(θ_k − θ)`` (one all-reduce) and use the pseudo-gradient ``g = −Δ``:

* local SGD / FedAvg (McMahan et al. 2017): ``θ ← θ + Δ``.
* SlowMo (Wang et al., ICLR 2020, Alg. 1, base optimizer SGD with local LR ``γ``): ``u ← β u + g / γ``,
  ``θ ← θ − α γ u`` (slow momentum ``β``, slow LR ``α``; the setting of Joseph et al., arXiv 2312.02204:
  ``β = 0.95``, ``α = 0.1``, ``γ = 0.1``).
  ``α = 1, β = 0`` is local SGD.
* DiLoCo outer step (Douillard et al. 2023): SGD with Nesterov momentum on ``g``: ``b ← μ b + g``,
  ``θ ← θ − η (g + μ b)`` (``η = 0.7``, ``μ = 0.9`` in the paper).

The update functions are elementwise and broadcast, so a benchmark can pass hyperparameters as tensors shaped
``[B, 1, ..., 1]`` to run a grid of settings as one batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecpt.lopt.optimizers import OuterOptimizer


def slowmo_update(p: Tensor, delta: Tensor, u: Tensor, *, local_lr, slow_lr, beta) -> tuple[Tensor, Tensor]:
    """One SlowMo outer step -> ``(new_p, new_u)``; ``u`` is the slow momentum buffer (zeros at the start)."""
    u = beta * u - delta / local_lr
    return p - slow_lr * local_lr * u, u


def nesterov_update(p: Tensor, delta: Tensor, buf: Tensor, *, lr, momentum) -> tuple[Tensor, Tensor]:
    """One DiLoCo outer step (SGD, Nesterov) on the pseudo-gradient ``−delta`` -> ``(new_p, new_buf)``."""
    g = -delta
    buf = momentum * buf + g
    return p - lr * (g + momentum * buf), buf


class _BufferedOuter(OuterOptimizer):
    """Shared state handling: one float32 buffer per parameter tensor, created at the first step."""

    def __init__(self) -> None:
        self._bufs: list[Tensor] | None = None
        self.round = 0

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        if self._bufs is None:
            self._bufs = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        return self._bufs

    def state_dict(self) -> dict[str, Tensor]:
        out = {"t": torch.tensor(self.round)}
        for i, b in enumerate(self._bufs or []):
            out[f"buf.{i}"] = b.clone().cpu()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.round = int(state["t"])
        keys = sorted((k for k in state if k.startswith("buf.")), key=lambda k: int(k.split(".")[1]))
        self._bufs = [state[k].clone().to(torch.float32) for k in keys] or None


class LocalSGD(OuterOptimizer):
    """``θ ← θ + outer_lr · Δ`` (``outer_lr = 1``: plain local SGD / FedAvg). Stateless."""

    def __init__(self, outer_lr: float = 1.0):
        self.outer_lr = outer_lr
        self.round = 0

    @torch.no_grad()
    def step(self, params: list[Tensor], deltas: list[Tensor]) -> None:
        self._check(params, deltas)
        for p, d in zip(params, deltas):
            p.add_(d.to(p.dtype), alpha=self.outer_lr)
        self.round += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"t": torch.tensor(self.round)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.round = int(state["t"])


class SlowMo(_BufferedOuter):
    """SlowMo outer step (see module doc). ``local_lr`` must be the workers' SGD learning rate."""

    def __init__(self, local_lr: float = 0.1, slow_lr: float = 0.1, beta: float = 0.95):
        super().__init__()
        self.local_lr, self.slow_lr, self.beta = local_lr, slow_lr, beta

    @torch.no_grad()
    def step(self, params: list[Tensor], deltas: list[Tensor]) -> None:
        self._check(params, deltas)
        bufs = self._buffers(params)
        for i, (p, d) in enumerate(zip(params, deltas)):
            new, bufs[i] = slowmo_update(p.float(), d.float().to(p.device), bufs[i].to(p.device),
                                         local_lr=self.local_lr, slow_lr=self.slow_lr, beta=self.beta)
            p.copy_(new.to(p.dtype))
        self.round += 1


class DiLoCo(_BufferedOuter):
    """DiLoCo's outer optimizer: Nesterov SGD on the pseudo-gradient ``−Δ`` (lr 0.7, momentum 0.9)."""

    def __init__(self, lr: float = 0.7, momentum: float = 0.9):
        super().__init__()
        self.lr, self.momentum = lr, momentum

    @torch.no_grad()
    def step(self, params: list[Tensor], deltas: list[Tensor]) -> None:
        self._check(params, deltas)
        bufs = self._buffers(params)
        for i, (p, d) in enumerate(zip(params, deltas)):
            new, bufs[i] = nesterov_update(p.float(), d.float().to(p.device), bufs[i].to(p.device),
                                           lr=self.lr, momentum=self.momentum)
            p.copy_(new.to(p.dtype))
        self.round += 1
