"""YaRN RoPE scaling (Peng et al. 2024, "YaRN: Efficient Context Window Extension of Large Language Models",
ICLR 2024, Sec. 3.2-3.4), as GPT-OSS ships it (OpenAI 2025, arXiv 2508.10925, Sec. 2.1: factor 32 over 4096).

Each rotary frequency ``theta_d = base^(-2d / R)`` is blended between extrapolation (unchanged) and interpolation
(``theta_d / factor``) by a ramp over the dimensions: dims that turn more than ``beta_fast`` times over the
original context keep their frequency, those turning fewer than ``beta_slow`` times are interpolated, and the ramp
in between is linear ("NTK-by-parts", eq. 18-19). The correction dims are ``R ln(L / (2 pi beta)) / (2 ln base)``
(floored / ceiled when ``truncate``). cos / sin are then multiplied by the attention factor
``0.1 ln(factor) + 1`` (eq. 22's ``sqrt(1/t)``), unless the config gives one.
"""

from __future__ import annotations

import math

import torch

from moecpt.config import YarnConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """``0.1 mscale ln(factor) + 1`` (1 for ``factor <= 1``): YaRN's attention temperature, eq. 22's ``sqrt(1/t)``."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(y: YarnConfig) -> float:
    """The cos / sin multiplier: ``y.attention_factor``; else, with DeepSeek's ``mscale`` and ``mscale_all_dim``,
    ``yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)`` (1 in DeepSeek-V3, where both are 1);
    else ``yarn_mscale(factor)``."""
    if y.attention_factor is not None:
        return y.attention_factor
    if y.mscale and y.mscale_all_dim:
        return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    return yarn_mscale(y.factor)


def yarn_softmax_mscale(y: YarnConfig | None) -> float:
    """DeepSeek-V2/V3's multiplier of the MLA softmax scale under YaRN: ``yarn_mscale(factor, mscale_all_dim)^2``
    (DeepSeek-V2, arXiv 2405.04434, App. B; 1 without ``mscale_all_dim``), so that with both mscales 1 the
    temperature moves from the rotary tables into the scores."""
    if y is None or not y.mscale_all_dim:
        return 1.0
    return yarn_mscale(y.factor, y.mscale_all_dim) ** 2


def yarn_inv_freq(rot_dim: int, theta: float, y: YarnConfig, device=None) -> torch.Tensor:
    """YaRN's ``[rot_dim / 2]`` fp32 inverse frequencies for base ``theta`` (see the module doc)."""

    def correction_dim(rotations: float) -> float:
        turns = y.original_max_position_embeddings / (rotations * 2 * math.pi)
        return rot_dim * math.log(turns) / (2 * math.log(theta))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    pos_freqs = theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim)
    ramp = ((torch.arange(rot_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency (fast dims), 0: interpolate (slow dims)
    return (1.0 / (y.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
