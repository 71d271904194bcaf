"""Next-token cross-entropy with a lean backward.

``F.cross_entropy`` = ``log_softmax`` + ``nll_loss``; its backward first writes a zero ``[N, V]`` tensor
(``nll_loss_backward``) and then runs ``log_softmax_backward`` over two ``[N, V]`` tensors. With a 4k-128k
vocabulary that is the largest elementwise work of a small model's step. The gradient of the mean cross-entropy
is simply ``(softmax - onehot) / N``: :class:`_NextTokenCE` recomputes the softmax from the saved logits, scales it
in place and subtracts ``1/N`` at the targets. ``benchmarks/components.py`` (``cross_entropy_ms``) times forward +
backward on ``[2048, 4096]`` fp32 logits against ``F.cross_entropy`` with the trainer's allocator setting, under which
torch's 34 MB zero tensor is a fresh ``mmap`` every step; the figures are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import torch


class _NextTokenCE(torch.autograd.Function):
    """Mean cross-entropy of ``logits_NV [N, V]`` against ``targets_N [N]`` (int64), in nats.

    Forward: ``log_softmax`` and the target log-probabilities. Backward: ``softmax(logits) * g / N`` (the fused
    softmax kernel, recomputed from the saved logits: faster on CPU than ``exp`` of saved log-probabilities), minus
    ``g / N`` at the targets.
    """

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits_NV, targets_N)
        return -torch.log_softmax(logits_NV, dim=-1).gather(1, targets_N[:, None]).mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        logits_NV, targets_N = ctx.saved_tensors
        scale = g / logits_NV.shape[0]
        grad_NV = torch.softmax(logits_NV, dim=-1).mul_(scale)
        grad_NV.scatter_add_(1, targets_N[:, None], (-scale).expand(targets_N.shape[0], 1))
        return grad_NV, None


def cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats (as ``F.cross_entropy(logits, targets)``; no ignore index, no smoothing).

    Args:
        logits_NV: ``[N, V]`` float logits (computed in their own dtype; pass fp32 for an fp32 loss).
        targets_N: ``[N]`` int64 class indices in ``[0, V)``.

    Returns:
        scalar loss; differentiable in ``logits_NV``.

    Raises:
        ValueError: shapes that do not match.
    """
    if logits_NV.dim() != 2 or targets_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"cross_entropy expects logits [N, V] and targets [N], got {tuple(logits_NV.shape)} "
                         f"and {tuple(targets_N.shape)}")
    return _NextTokenCE.apply(logits_NV, targets_N)
