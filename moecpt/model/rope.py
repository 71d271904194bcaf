"""Rotary position embedding (Su et al. 2021, "RoFormer", arXiv 2104.09864) in the half-rotation layout of Llama /
GPT-NeoX, shared by grouped-query (:mod:`.transformer`) and latent attention (:mod:`.mla`).

Shape suffixes follow the legend in :mod:`moecpt.model` (T positions, R rotary dims, A head dim).
"""

from __future__ import annotations

import torch


def rope_cos_sin(seq_len: int, rot_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (Su et al. 2021) in the half-rotation layout of Llama / GPT-NeoX.

    Returns:
        ``cos_TR, sin_TR`` fp32 of shape ``[T, rot_dim]`` (frequencies repeated for the two halves).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # [T, R / 2]
    emb_TR = torch.cat([freqs, freqs], dim=-1)
    return emb_TR.cos(), emb_TR.sin()


def apply_rope(x_BTHA: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``R = cos_TR.shape[-1]`` dims of each head (partial rotary when ``R < A``).

    ``x`` is laid out ``[B, T, heads, A]`` (query or key heads), as the q/k projections produce it, so the
    elementwise ops run on a contiguous tensor; the half rotation ``(x1, x2) -> (-x2, x1)`` is
    ``roll(x, R/2) * [-sin | sin]`` (one op fewer), and at full rotary nothing is sliced or concatenated (their
    backwards write zero tensors).
    ``benchmarks/components.py`` (``rope_ms``) times it against rotate-half on the ``[B, H, T, A]`` view, with and
    without that slicing; the figures are in ``benchmarks/README.md``.
    """
    R, A = cos_TR.shape[-1], x_BTHA.shape[-1]
    half = R // 2
    cos_T1R = cos_TR[:, None, :]
    sin_T1R = torch.cat([-sin_TR[:, :half], sin_TR[:, half:]], dim=-1)[:, None, :]
    # full rotary: no slicing (a slice's backward writes a zero tensor first); roll = cat(x2, x1), its backward a roll
    x_rot = (x_BTHA if R == A else x_BTHA[..., :R]).float()
    out = x_rot * cos_T1R + torch.roll(x_rot, half, dims=-1) * sin_T1R
    if R == A:
        return out.to(x_BTHA.dtype)
    return torch.cat([out.to(x_BTHA.dtype), x_BTHA[..., R:]], dim=-1)
