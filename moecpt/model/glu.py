"""Gated linear unit activations (GEGLU, SwiGLU; Shazeer 2020, "GLU Variants Improve Transformer", eq. 6).

A GLU feed-forward projects ``D -> 2F`` into a gate half and an up half and keeps ``act(gate) * up``. The weights
store both halves side by side (``[gate | up]``), but the activations are computed on two *separate, contiguous*
``[N, F]`` tensors: PyTorch's CPU elementwise kernels (SiLU, GELU and their backwards, ``mul``) run 2-3x slower
on the strided halves of one ``[N, 2F]`` tensor, because they vectorise only over contiguous operands.

:func:`glu_activation` is the plain autograd form (reference paths); :func:`glu_forward` / :func:`glu_backward` are
the no-autograd halves used by fused expert kernels (:mod:`moecpt.model.expert_dispatch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moecpt.config import FFNKind


def activation(gate: torch.Tensor, kind: FFNKind) -> torch.Tensor:
    """GEGLU: tanh-approximate GELU (as Gemma / the paper's Llama-3-style GEGLU backbone); SwiGLU: SiLU."""
    return F.gelu(gate, approximate="tanh") if kind == FFNKind.GEGLU else F.silu(gate)


#: GPT-OSS's clamped SwiGLU constants (transformers ``GptOssConfig.swiglu_alpha`` / ``swiglu_limit``)
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's expert activation (OpenAI 2025, arXiv 2508.10925, Sec. 2.1; transformers
    ``GptOssExperts._apply_gate``): ``g = min(gate, 7)``, ``u = clamp(up, -7, 7)``, ``(u + 1) * g * sigmoid(1.702 g)``.
    The clamps bound the activations; the ``+ 1`` keeps a unit path through ``up``. Shapes ``[..., F]`` (autograd)."""
    g = gate.clamp(max=SWIGLU_LIMIT)
    u = up.clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
    return (u + 1) * (g * torch.sigmoid(g * SWIGLU_ALPHA))


def glu_combine(gate: torch.Tensor, up: torch.Tensor, kind: FFNKind) -> torch.Tensor:
    """The GLU output of pre-activations ``gate`` and ``up`` (``[..., F]`` each, autograd): ``act(gate) * up``, or
    :func:`clamped_swiglu` for ``swiglu_clamped``."""
    if kind == FFNKind.SWIGLU_CLAMPED:
        return clamped_swiglu(gate, up)
    return activation(gate, kind) * up


def glu_activation(h_NW: torch.Tensor, kind: FFNKind) -> torch.Tensor:
    """:func:`glu_combine` for ``h = [gate | up]`` of shape ``[..., 2F]`` -> ``[..., F]`` (autograd)."""
    gate, up = h_NW.chunk(2, dim=-1)
    return glu_combine(gate, up, kind)


def glu_forward(gate_NF: torch.Tensor, up_NF: torch.Tensor, kind: FFNKind) -> tuple[torch.Tensor, torch.Tensor]:
    """``act(gate)`` and ``act(gate) * up`` (no autograd).

    Args:
        gate_NF, up_NF: ``[N, F]`` contiguous pre-activations; kind: GEGLU or SwiGLU.

    Returns:
        ``(act_NF, a_NF)``: the activated gate (kept for the backward) and the GLU output, both ``[N, F]``.
    """
    if kind == FFNKind.SWIGLU_CLAMPED:
        g = gate_NF.clamp(max=SWIGLU_LIMIT)
        act_NF = g * torch.sigmoid(g * SWIGLU_ALPHA)  # the clamped gate's SiLU_alpha, kept for the backward
        return act_NF, (up_NF.clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT) + 1) * act_NF
    act_NF = activation(gate_NF, kind)
    return act_NF, act_NF * up_NF


def _clamped_backward(gate_NF, up_NF, act_NF, g_NF, gh_NW) -> None:
    """:func:`clamped_swiglu`'s gradient into ``gh_NW = [d gate | d up]``, with autograd's clamp convention (the
    gradient passes where ``lo <= x <= hi``): ``d up = g * act * [|up| <= L]``,
    ``d gate = g * (u + 1) * (s + alpha * g' * s * (1 - s)) * [gate <= L]``, ``g' = min(gate, L)``,
    ``s = sigmoid(alpha g')``."""
    F_ = g_NF.shape[1]
    g = gate_NF.clamp(max=SWIGLU_LIMIT)
    s = torch.sigmoid(g * SWIGLU_ALPHA)
    u1 = up_NF.clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT) + 1
    d_act = s * (1 + SWIGLU_ALPHA * g * (1 - s))
    torch.mul(g_NF * u1 * d_act, gate_NF <= SWIGLU_LIMIT, out=gh_NW[:, :F_])
    torch.mul(g_NF * act_NF, (up_NF >= -SWIGLU_LIMIT) & (up_NF <= SWIGLU_LIMIT), out=gh_NW[:, F_:])


def glu_backward(gate_NF: torch.Tensor, up_NF: torch.Tensor, act_NF: torch.Tensor, g_NF: torch.Tensor,
                 kind: FFNKind) -> torch.Tensor:
    """Gradient of ``[gate | up]`` for the GLU output gradient ``g_NF`` (no autograd).

    ``d/d up = g * act(gate)``; ``d/d gate = act'(gate) * g * up``, through ``aten.silu_backward`` /
    ``aten.gelu_backward`` (the kernels autograd uses), each on contiguous operands.

    Args:
        gate_NF, up_NF: ``[N, F]`` the forward's pre-activations; act_NF: ``[N, F]`` from :func:`glu_forward`;
        g_NF: ``[N, F]`` contiguous gradient of the GLU output; kind: GEGLU or SwiGLU.

    Returns:
        ``[N, 2F]`` contiguous gradient of ``[gate | up]``.
    """
    F_ = g_NF.shape[1]
    gh_NW = g_NF.new_empty(g_NF.shape[0], 2 * F_)
    if kind == FFNKind.SWIGLU_CLAMPED:
        _clamped_backward(gate_NF, up_NF, act_NF, g_NF, gh_NW)
        return gh_NW
    # act'(gate) * up on contiguous operands (vectorised; the *_backward kernels take `up` as their incoming
    # gradient), then the two products written into the strided halves of one [N, 2F] buffer: a strided *output*
    # drops the elementwise kernels to their scalar loop, so only cheap muls write there, not the exp/tanh
    if kind == FFNKind.GEGLU:
        d_act_up_NF = torch.ops.aten.gelu_backward(up_NF, gate_NF, approximate="tanh")
    else:
        d_act_up_NF = torch.ops.aten.silu_backward(up_NF, gate_NF)
    torch.mul(d_act_up_NF, g_NF, out=gh_NW[:, :F_])
    torch.mul(g_NF, act_NF, out=gh_NW[:, F_:])
    return gh_NW
