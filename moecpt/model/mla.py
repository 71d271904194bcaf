"""Multi-head latent attention (MLA): DeepSeek-V2 (arXiv 2405.04434, Sec. 2.1, eqs. 9-19) and DeepSeek-V3
(arXiv 2412.19437, Sec. 2.1.1).

Keys and values of every head are decompressed from one per-token latent ``c_kv = RMSNorm(W_DKV x)`` of
``kv_lora_rank`` dims (eq. 9-11); queries optionally from a ``q_lora_rank`` latent (eq. 12-13; none in V2-Lite:
a full projection). Each head's query and key are ``[nope | rope]``: the rope part of the query is per head, the
rope part of the key a single head computed from ``x`` and shared by all heads (the decoupled RoPE key, eq.
14-16). Scores are scaled by ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``.

DeepSeek's weights rotate interleaved pairs ``(x0, x1), (x2, x3), ...``; with ``rope_interleave`` the rope dims
are de-interleaved (evens, then odds) before the half-rotation of :func:`moecpt.model.rope.apply_rope`, which is
the same rotation (transformers' ``apply_rotary_pos_emb_interleave`` does exactly this; DeepSeek-V2's complex
product gives the same scores). Query and key are permuted alike, so the scores do not change.

This is the training form (keys / values materialised per head, attention through SDPA); the absorbed inference
form, which attends in the latent space, computes the same function.

Shape letters (legend in :mod:`moecpt.model`): B batch, T positions, D d_model, H heads, L query latent
(``q_lora_rank``), C key/value latent (``kv_lora_rank``), U un-rotated head dims (``qk_nope_head_dim``), R rotary
dims (``qk_rope_head_dim``), A = U + R the query/key head dim, M value head dim (``v_head_dim``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.config import ModelConfig
from moecpt.model.rope import apply_rope
from moecpt.model.yarn import yarn_softmax_mscale


def deinterleave(x_BTHR: torch.Tensor) -> torch.Tensor:
    """``[..., R]`` pairs ``(x0, x1), (x2, x3), ...`` -> ``[x0, x2, ..., x1, x3, ...]`` (the half-rotation layout)."""
    return torch.cat([x_BTHR[..., 0::2], x_BTHR[..., 1::2]], dim=-1)


class MLAttention(nn.Module):
    """Causal multi-head latent attention (see the module doc).

    Parameters (names as the moecpt state dict has them): ``wq [H*A, D]`` or ``wq_a [L, D]``, ``q_norm [L]``,
    ``wq_b [H*A, L]``; ``wkv_a [C+R, D]`` (latent then shared rope key), ``kv_norm [C]``, ``wkv_b [H*(U+M), C]``
    (per head: key nope dims then value dims); ``wo [D, H*M]``. No biases.

    ``forward(x_BTD, cos_TR, sin_TR)`` -> ``[B, T, D]``; ``cos_TR / sin_TR`` are the RoPE tables of ``R`` dims.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mla
        if m is None:
            raise ValueError("MLAttention needs ModelConfig.mla (attention = 'mla')")
        D, H = cfg.d_model, cfg.n_heads
        self.n_heads, self.U, self.R, self.M, self.C = H, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, \
            m.kv_lora_rank
        self.A = m.qk_head_dim
        self.interleave = m.rope_interleave
        # Granite's multiplier when set, else DeepSeek's A^-1/2 (times its YaRN mscale^2 under rope scaling)
        self.scale = cfg.attention_multiplier or self.A ** -0.5 * yarn_softmax_mscale(cfg.rope_yarn)
        self.low_rank_q = m.q_lora_rank is not None
        if self.low_rank_q:
            self.wq_a = nn.Linear(D, m.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(m.q_lora_rank, eps=m.latent_norm_eps)
            self.wq_b = nn.Linear(m.q_lora_rank, H * self.A, bias=False)
        else:
            self.wq = nn.Linear(D, H * self.A, bias=False)
        self.wkv_a = nn.Linear(D, self.C + self.R, bias=False)
        self.kv_norm = nn.RMSNorm(self.C, eps=m.latent_norm_eps)
        self.wkv_b = nn.Linear(self.C, H * (self.U + self.M), bias=False)
        self.wo = nn.Linear(H * self.M, D, bias=False)

    def _rope(self, x_BTHR: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        return apply_rope(deinterleave(x_BTHR) if self.interleave else x_BTHR, cos_TR, sin_TR)

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, U, R, M, C = self.n_heads, self.U, self.R, self.M, self.C
        q = self.wq_b(self.q_norm(self.wq_a(x_BTD))) if self.low_rank_q else self.wq(x_BTD)
        q_BTHA = q.view(B, T, H, self.A)
        ckv_BTC, k_rope_BTR = self.wkv_a(x_BTD).split([C, R], dim=-1)
        k_nope_BTHU, v_BTHM = self.wkv_b(self.kv_norm(ckv_BTC)).view(B, T, H, U + M).split([U, M], dim=-1)
        q_rope_BTHR = self._rope(q_BTHA[..., U:], cos_TR, sin_TR)
        k_rope_BT1R = self._rope(k_rope_BTR.view(B, T, 1, R), cos_TR, sin_TR)
        q_BHTA = torch.cat([q_BTHA[..., :U], q_rope_BTHR], dim=-1).transpose(1, 2)
        k_BHTA = torch.cat([k_nope_BTHU, k_rope_BT1R.expand(B, T, H, R)], dim=-1).transpose(1, 2)
        o_BHTM = F.scaled_dot_product_attention(q_BHTA, k_BHTA, v_BTHM.transpose(1, 2), is_causal=True,
                                                scale=self.scale)
        return self.wo(o_BHTM.transpose(1, 2).reshape(B, T, H * M))
