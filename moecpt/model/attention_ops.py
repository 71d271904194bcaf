"""Attention kernels beyond plain causal SDPA: sliding windows and attention sinks.

* **Sliding window** (Beltagy et al. 2020, "Longformer", Sec. 3.1; Mistral 7B, Jiang et al. 2023, Sec. 2): on a
  sliding layer query ``t`` attends to keys ``(t - W, t]``, i.e. ``t - W < s <= t`` -- transformers'
  ``sliding_window_overlay`` (``kv_idx > q_idx - sliding_window``) on top of the causal mask, so ``W`` keys
  including the query's own position.
* **Attention sinks** (GPT-OSS, OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card", arXiv 2508.10925, Sec. 2.1;
  after Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"): each head ``h`` has a
  learned logit ``s_h`` that joins the softmax denominator and attends to nothing:
  ``p_ts = exp(l_ts) / (exp(s_h) + sum_s' exp(l_ts'))``. It is computed exactly inside
  ``scaled_dot_product_attention`` as one extra key with a zero value: queries gain a constant coordinate 1 and
  keys a coordinate 0, the sink key is ``s_h / scale`` there and 0 elsewhere, so its score is ``scale * s_h /
  scale = s_h`` for every query while the real scores are unchanged. The mask stays one ``[T, T + 1]`` bool shared
  by all heads (no ``[H, T, T + 1]`` float bias is built); the extra coordinates are padded to 8 (kernels' head-dim
  alignment).

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
    scale = A ** -0.5 if scale is None else scale
    pad = 8  # one used coordinate, padded to the head-dim alignment SDPA's kernels like
    q_pad = q_BHTA.new_zeros(B, H, T, pad)
    q_pad[..., 0] = 1.0
    k_pad = k_BHTA.new_zeros(B, H, T, pad)
    sink_key = k_BHTA.new_zeros(B, H, 1, A + pad)
    sink_key[..., A] = (sinks_H.to(k_BHTA.dtype) / scale)[None, :, None]
    k_BHSB = torch.cat([torch.cat([k_BHTA, k_pad], dim=-1), sink_key], dim=2)  # S = T + 1, A + pad dims
    # values padded alike (the sink's value and the pad are zero): one head dim for q, k and v, which the fused
    # (memory-efficient) kernels need; the pad columns of the output are dropped
    v_BHSB = F.pad(v_BHTA, (0, pad, 0, 1))
    keep_TS = torch.cat([keep_TT, keep_TT.new_ones(T, 1)], dim=1)
    o_BHTB = F.scaled_dot_product_attention(torch.cat([q_BHTA, q_pad], dim=-1), k_BHSB, v_BHSB, attn_mask=keep_TS,
                                            scale=scale)
    return o_BHTB[..., :A]
