"""Attention kernels beyond plain causal SDPA: sliding windows and attention sinks.

* **Sliding window** (Beltagy et al. 2020, "Longformer", Sec. 3.1; Mistral 7B, Jiang et al. 2023, Sec. 2): on a
  sliding layer query ``t`` attends to keys ``(t - W, t]``, i.e. ``t - W < s <= t`` -- transformers'
  ``sliding_window_overlay`` (``kv_idx > q_idx - sliding_window``) on top of the causal mask, so ``W`` keys
  including the query's own position.
* **Attention sinks** (GPT-OSS, OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card", arXiv 2508.10925, Sec. 2.1;
  after Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"): each head ``h`` has a
  learned logit ``s_h`` that joins the softmax denominator and attends to nothing:
  ``p_ts = exp(l_ts) / (exp(s_h) + sum_s' exp(l_ts'))``. It is computed exactly inside
  ``scaled_dot_product_attention`` by one extra key column whose key and value are zero and whose additive mask is
  ``s_h``: its score is ``0 + s_h`` and its value adds nothing.

The plain causal path (no window, no sinks) stays ``is_causal=True`` with no mask (SDPA's fastest kernels).
Shape suffixes: B batch, H heads, T positions, A head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(T: int, window: int | None, device: torch.device | str | None = None) -> torch.Tensor:
    """``[T, T]`` bool, True where query ``t`` may attend key ``s``: causal ``s <= t`` and, with a window ``W``,
    ``s > t - W`` (transformers' sliding-window convention; ``W >= T`` is plain causal)."""
    t = torch.arange(T, device=device)
    keep = t[None, :] <= t[:, None]
    if window is not None:
        keep &= t[None, :] > t[:, None] - window
    return keep


def attend(q_BHTA: torch.Tensor, k_BHTA: torch.Tensor, v_BHTA: torch.Tensor, *, scale: float | None = None,
           window: int | None = None, sinks_H: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention with an optional sliding window and per-head sinks, via ``scaled_dot_product_attention``.

    Args:
        q_BHTA, k_BHTA, v_BHTA: queries / keys / values ``[B, H, T, A]`` (key heads already repeated for GQA).
        scale: softmax scale of ``q . k`` (None: ``1 / sqrt(A)``).
        window: sliding window ``W`` (keys ``(t - W, t]``); None = full causal.
        sinks_H: ``[H]`` sink logits (differentiable); None = no sinks.

    Returns:
        ``[B, H, T, A]`` in the dtype of ``q``.
    """
    T = q_BHTA.shape[2]
    if sinks_H is None and (window is None or window >= T):
        return F.scaled_dot_product_attention(q_BHTA, k_BHTA, v_BHTA, is_causal=True, scale=scale)
    keep_TT = window_mask(T, window, q_BHTA.device)
    if sinks_H is None:
        return F.scaled_dot_product_attention(q_BHTA, k_BHTA, v_BHTA, attn_mask=keep_TT, scale=scale)
    B, H, _, A = q_BHTA.shape
    dtype = q_BHTA.dtype
    zero = q_BHTA.new_zeros(B, H, 1, A)
    k_BHSA = torch.cat([k_BHTA, zero], dim=2)  # S = T + 1: the sink's key and value are zero
    v_BHSA = torch.cat([v_BHTA, zero], dim=2)
    neg = torch.finfo(dtype).min
    bias_TT = torch.zeros(T, T, dtype=dtype, device=q_BHTA.device).masked_fill_(~keep_TT, neg)
    sink_HT1 = sinks_H.to(dtype)[:, None, None].expand(H, T, 1)
    bias_HTS = torch.cat([bias_TT.expand(H, T, T), sink_HT1], dim=2)
    return F.scaled_dot_product_attention(q_BHTA, k_BHSA, v_BHSA, attn_mask=bias_HTS[None], scale=scale)
