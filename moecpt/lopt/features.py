"""Per-parameter input features of the learned outer optimizers (LOpt-A / LAgg-A and the simple LOpt / LAgg).

Joseph, Thérien, Moudgil, Knyazev, Belilovsky, "Meta-learning Optimizers for Communication-Efficient Learning"
(arXiv 2312.02204, Sec. 3 and App. A), which uses the ``small_fc_lopt`` / Adafactor-feature MLP of
learned_optimization (Metz et al., arXiv 2203.11860). Everything here is batched: a parameter tensor of shape
``S`` is handled as ``[B, *S]`` where ``B`` indexes independent copies (the PES particles during meta-training, the
seeds of a benchmark, ``B = 1`` for the runtime), each with its own accumulator decays and round index.

Sign convention: the server receives the workers' deltas ``Δ_k = θ_k − θ`` and the optimizers work on the
*pseudo-gradients* ``g_k = −Δ_k`` (so that ``θ ← θ − step`` with a gradient-like input, as in the paper).
``g`` below is the mean pseudo-gradient over workers.

Accumulators (per tensor, after the update with this round's ``g``; decays ``β`` are meta-learned):

* ``m``  ``[B, *S, 3]``: momentum ``m ← β m + (1 − β) g`` at decays 0.9, 0.99, 0.999.
* ``v``  ``[B, *S, 1]``: second moment ``v ← β v + (1 − β) g²`` at 0.999.
* Adafactor (Shazeer & Stern 2018) at 0.9, 0.99, 0.999 with ``ĝ² = g² + 1e-30``. For a tensor of 2 or more
  dims the two largest dims are factored (``d0`` the largest, ``d1`` the second largest; ties: the later dim is
  ``d0``): ``row ← β row + (1 − β) mean_{d0}(ĝ²)``, ``col ← β col + (1 − β) mean_{d1}(ĝ²)`` (stored with the
  reduced dim kept as size 1), and the preconditioned delta ``fac_g = g · rsqrt(row / mean_{d1}(row))
  · rsqrt(col)``. Tensors of under 2 dims are unfactored: ``diag ← β diag + (1 − β) ĝ²``,
  ``fac_g = g · rsqrt(diag + 1e-9)``. Every rsqrt of an accumulator clamps its argument at 1e-9 from below.

Feature channels, in this order (``F = C + 27`` of them, ``C`` = delta channels: 1 for LOpt-A, ``K`` for LAgg-A):

====================================  ===  ===========================================================
delta(s) ``g`` or ``g_1 .. g_K``      C    LOpt-A: the mean; LAgg-A: each worker's own pseudo-gradient
parameter ``θ``                       1
momentum ``m``                        3
second moment ``v``                   1
``m · rsqrt(v + 1e-6)``               3
``rsqrt(v + 1e-6)``                   1
``fac_g``                             3
row factor (broadcast)                3    unfactored: ``diag``
column factor (broadcast)             3    unfactored: ``diag``
``rsqrt(row + 1e-8)``                 3    unfactored: ``rsqrt(diag + 1e-8)``
``rsqrt(col + 1e-8)``                 3    unfactored: ``rsqrt(diag + 1e-8)``
``m · row_factor · col_factor``       3    unfactored: ``m · rsqrt(diag + 1e-6)``
====================================  ===  ===========================================================

Each channel is then divided by its root mean square over the whole tensor, ``x / sqrt(1e-5 + mean(x²))`` (the
1e-5 of the reference implementation: channels whose RMS is far below 3e-3 are damped rather than blown up), and
11 un-normalised time features ``tanh(t / s − 1)`` for ``s`` in 1, 3, 10, ..., 100k (``t`` = round index,
0 at the first round) are appended: 39 inputs for LOpt-A, ``K + 38`` for LAgg-A. The simple LOpt / LAgg use only
the delta channel(s) and the parameter (normalised the same way) plus the time features: 13 and ``K + 12``.
"""

from __future__ import annotations

import torch
from torch import Tensor

TIMESCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
MOMENTUM_DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999)
RMS_DECAYS: tuple[float, ...] = (0.999,)
ADAFACTOR_DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999)
NUM_DECAYS = len(MOMENTUM_DECAYS) + len(RMS_DECAYS) + len(ADAFACTOR_DECAYS)  # 7 meta-learned decays
ACCUMULATOR_CHANNELS = 26  # accumulator-derived channels per element (beyond the delta channels and the parameter)
NORM_EPS = 1e-5


def num_features(delta_channels: int, adafactor: bool) -> int:
    """MLP input width: ``C + 38`` with Adafactor features (39 for LOpt-A, ``K + 38`` for LAgg-A), else ``C + 12``."""
    return delta_channels + (1 + ACCUMULATOR_CHANNELS if adafactor else 1) + len(TIMESCALES)


def time_features(t: Tensor) -> Tensor:
    """``tanh(t / s − 1)`` for the 11 timescales: ``t`` ``[B]`` (round index, any dtype) -> float32 ``[B, 11]``."""
    s = torch.tensor(TIMESCALES, dtype=torch.float32, device=t.device)
    return torch.tanh(t.to(torch.float32)[:, None] / s - 1.0)


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(d1, d0)`` of a tensor shape (no batch dim): ``d0`` the largest dim, ``d1`` the second largest (a stable
    sort, so for equal sizes the later dim is ``d0``); None for tensors of under 2 dims (unfactored)."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    return order[-2], order[-1]


def decays_from_offsets(offsets: Tensor) -> Tensor:
    """Meta-learned decays ``[B, 7]`` (momentum x3, rms x1, adafactor x3) from offsets ``[B, 7]``.

    ``β = 1 − (1 − β₀) · exp(10 · offset)`` (an additive offset on ``log(1 − β) / 10``, as in learned_optimization),
    clamped to [0, 1]; offsets of 0 give the initial decays 0.9, 0.99, 0.999 / 0.999 / 0.9, 0.99, 0.999.
    """
    base = torch.tensor(MOMENTUM_DECAYS + RMS_DECAYS + ADAFACTOR_DECAYS, dtype=offsets.dtype, device=offsets.device)
    return (1.0 - (1.0 - base) * torch.exp(10.0 * offsets)).clamp(0.0, 1.0)


def _as_batched(x: Tensor) -> Tensor:
    """Scalar parameters (``[B]``) are handled as ``[B, 1]`` so that every tensor has at least one element dim."""
    return x[:, None] if x.dim() == 1 else x


def init_accumulators(param: Tensor) -> dict[str, Tensor]:
    """Zero accumulators for one batched parameter ``[B, *S]``: ``m [B,*S,3]``, ``v [B,*S,1]`` and either
    ``row``/``col`` (factored, reduced dims kept as 1) or ``diag [B,*S,3]``."""
    p = _as_batched(param)
    shape = tuple(p.shape[1:])
    z = dict(dtype=torch.float32, device=p.device)
    state = {
        "m": torch.zeros(*p.shape, len(MOMENTUM_DECAYS), **z),
        "v": torch.zeros(*p.shape, len(RMS_DECAYS), **z),
    }
    fd = factored_dims(shape)
    n = len(ADAFACTOR_DECAYS)
    if fd is None:
        state["diag"] = torch.zeros(*p.shape, n, **z)
    else:
        d1, d0 = fd
        row = list(p.shape) + [n]
        row[1 + d0] = 1
        col = list(p.shape) + [n]
        col[1 + d1] = 1
        state["row"] = torch.zeros(row, **z)
        state["col"] = torch.zeros(col, **z)
    return state


def _bcast(decay: Tensor, ndim: int) -> Tensor:
    """``[B, c]`` -> ``[B, 1, ..., 1, c]`` with ``ndim`` element dims."""
    return decay.reshape(decay.shape[0], *([1] * ndim), decay.shape[1])


def _rsqrt_safe(x: Tensor) -> Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def update_accumulators(state: dict[str, Tensor], g: Tensor, decays: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Fold this round's mean pseudo-gradient into the accumulators.

    Args:
        state: from :func:`init_accumulators` (not modified).
        g: ``[B, *S]`` mean pseudo-gradient ``−mean_k Δ_k``.
        decays: ``[B, 7]`` from :func:`decays_from_offsets`.

    Returns:
        ``(new_state, fac_g)`` with ``fac_g`` ``[B, *S, 3]`` the Adafactor-preconditioned delta at the 3 decays.
    """
    g = _as_batched(g).to(torch.float32)
    nd = g.dim() - 1
    bm, br, bf = (_bcast(decays[:, 0:3], nd), _bcast(decays[:, 3:4], nd), _bcast(decays[:, 4:7], nd))
    g1 = g[..., None]
    new = {
        "m": bm * state["m"] + (1 - bm) * g1,
        "v": br * state["v"] + (1 - br) * g1 * g1,
    }
    gsq = g1 * g1 + 1e-30
    fd = factored_dims(tuple(g.shape[1:]))
    if fd is None:
        diag = bf * state["diag"] + (1 - bf) * gsq
        new["diag"] = diag
        fac_g = g1 * _rsqrt_safe(diag + 1e-9)
    else:
        d1, d0 = fd
        row = bf * state["row"] + (1 - bf) * gsq.mean(dim=1 + d0, keepdim=True)
        col = bf * state["col"] + (1 - bf) * gsq.mean(dim=1 + d1, keepdim=True)
        new["row"], new["col"] = row, col
        row_factor, col_factor = _row_col_factors(row, col, d1)
        fac_g = g1 * row_factor * col_factor
    return new, fac_g


def _row_col_factors(row: Tensor, col: Tensor, d1: int) -> tuple[Tensor, Tensor]:
    """Adafactor's ``rsqrt(row / mean_{d1}(row))`` and ``rsqrt(col)`` (broadcastable to ``[B, *S, 3]``)."""
    row_col_mean = row.mean(dim=1 + d1, keepdim=True)
    return _rsqrt_safe(row / (row_col_mean + 1e-9)), _rsqrt_safe(col)


def normalize_channels(x: Tensor) -> Tensor:
    """Divide each channel (last dim) of ``x`` ``[B, *S, F]`` by its RMS over the tensor: ``x / sqrt(1e-5 + mean x²)``."""
    dims = tuple(range(1, x.dim() - 1))
    return x * torch.rsqrt(NORM_EPS + x.square().mean(dim=dims, keepdim=True))


def build_features(
    deltas: Tensor,
    param: Tensor,
    t: Tensor,
    state: dict[str, Tensor] | None = None,
    fac_g: Tensor | None = None,
) -> Tensor:
    """The MLP inputs of every element of one tensor.

    Args:
        deltas: ``[B, *S, C]`` pseudo-gradient channel(s) (mean: ``C = 1``; per worker: ``C = K``).
        param: ``[B, *S]`` current parameter value.
        t: ``[B]`` round index (0-based).
        state: accumulators *after* :func:`update_accumulators`; None for the simple LOpt / LAgg.
        fac_g: ``[B, *S, 3]`` returned by :func:`update_accumulators` (with ``state``).

    Returns:
        float32 ``[B, N, F]`` with ``N = prod(S)`` elements and ``F = num_features(C, state is not None)``.
    """
    p = _as_batched(param).to(torch.float32)
    B = p.shape[0]
    if deltas.dim() == p.dim():  # a scalar parameter: [B, C] -> [B, 1, C]
        deltas = deltas[:, None]
    chans = [deltas.to(torch.float32), p[..., None]]
    if state is not None:
        m, v = state["m"], state["v"]
        rs = torch.rsqrt(v + 1e-6)
        chans += [m, v, m * rs, rs, fac_g]
        full = tuple(m.shape)
        if "diag" in state:
            d = state["diag"]
            r8 = torch.rsqrt(d + 1e-8)
            chans += [d, d, r8, r8, m * (d + 1e-6) ** -0.5]
        else:
            d1, _ = factored_dims(tuple(p.shape[1:]))
            row, col = state["row"], state["col"]
            row_feat, col_feat = row.expand(full), col.expand(full)
            row_factor, col_factor = _row_col_factors(row, col, d1)
            chans += [
                row_feat,
                col_feat,
                torch.rsqrt(row_feat + 1e-8),
                torch.rsqrt(col_feat + 1e-8),
                m * row_factor * col_factor,
            ]
    x = normalize_channels(torch.cat(chans, dim=-1)).reshape(B, -1, sum(c.shape[-1] for c in chans))
    tf = time_features(t)[:, None, :].expand(B, x.shape[1], len(TIMESCALES))
    return torch.cat([x, tf], dim=-1)
