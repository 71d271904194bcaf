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


def update_accumulators(state: dict[str, Tensor], g: Tensor, decays: Tensor, with_fac_g: bool = True
                        ) -> tuple[dict[str, Tensor], Tensor | None]:
    """Fold this round's mean pseudo-gradient into the accumulators.

    Args:
        state: from :func:`init_accumulators` (not modified).
        g: ``[B, *S]`` mean pseudo-gradient ``−mean_k Δ_k``.
        decays: ``[B, 7]`` from :func:`decays_from_offsets`.
        with_fac_g: False skips ``fac_g`` (:func:`iter_features` computes it a block at a time).

    Returns:
        ``(new_state, fac_g)`` with ``fac_g`` ``[B, *S, 3]`` the Adafactor-preconditioned delta at the 3 decays
        (None without ``with_fac_g``).
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
        new["diag"] = bf * state["diag"] + (1 - bf) * gsq
    else:
        d1, d0 = fd
        new["row"] = bf * state["row"] + (1 - bf) * gsq.mean(dim=1 + d0, keepdim=True)
        new["col"] = bf * state["col"] + (1 - bf) * gsq.mean(dim=1 + d1, keepdim=True)
    del gsq
    return new, (_fac_g(g1, new, _factors(new, fd)) if with_fac_g else None)


def _factors(state: dict[str, Tensor], fd: tuple[int, int] | None) -> tuple[Tensor, Tensor] | None:
    """Adafactor's row and column factors of a factored state (over the whole tensor), None if unfactored."""
    return None if fd is None else _row_col_factors(state["row"], state["col"], fd[0])


def _fac_g(g1: Tensor, state: dict[str, Tensor], factors: tuple[Tensor, Tensor] | None) -> Tensor:
    """The Adafactor-preconditioned delta ``[B, *S, 3]`` of ``g1 = g[..., None]`` (or of a block of rows of it,
    with ``state`` and ``factors`` sliced alike)."""
    if factors is None:
        return g1 * _rsqrt_safe(state["diag"] + 1e-9)
    return g1 * factors[0] * factors[1]


def _row_col_factors(row: Tensor, col: Tensor, d1: int) -> tuple[Tensor, Tensor]:
    """Adafactor's ``rsqrt(row / mean_{d1}(row))`` and ``rsqrt(col)`` (broadcastable to ``[B, *S, 3]``)."""
    row_col_mean = row.mean(dim=1 + d1, keepdim=True)
    return _rsqrt_safe(row / (row_col_mean + 1e-9)), _rsqrt_safe(col)


def normalize_channels(x: Tensor) -> Tensor:
    """Divide each channel (last dim) of ``x`` ``[B, *S, F]`` by its RMS over the tensor: ``x / sqrt(1e-5 + mean x²)``."""
    dims = tuple(range(1, x.dim() - 1))
    return x * torch.rsqrt(NORM_EPS + x.square().mean(dim=dims, keepdim=True))


def _raw_channels(deltas: Tensor, p: Tensor, state: dict[str, Tensor] | None, fac_g: Tensor | None,
                  factors: tuple[Tensor, Tensor] | None) -> Tensor:
    """The feature channels before normalisation, ``[B, *S, C + 27]`` (or ``[B, *S, C + 1]`` without ``state``),
    in the order of the module docstring; ``p`` is batched float32, ``deltas`` ``[B, *S, C]``."""
    chans = [deltas.to(torch.float32), p[..., None]]
    if state is not None:
        m, v = state["m"], state["v"]
        rs = torch.rsqrt(v + 1e-6)
        chans += [m, v, m * rs, rs, fac_g]
        if "diag" in state:
            d = state["diag"]
            r8 = torch.rsqrt(d + 1e-8)
            chans += [d, d, r8, r8, m * (d + 1e-6) ** -0.5]
        else:
            full = tuple(m.shape)
            row_feat, col_feat = state["row"].expand(full), state["col"].expand(full)
            row_factor, col_factor = factors
            chans += [
                row_feat,
                col_feat,
                torch.rsqrt(row_feat + 1e-8),
                torch.rsqrt(col_feat + 1e-8),
                m * row_factor * col_factor,
            ]
    return torch.cat(chans, dim=-1)


def _with_time(x: Tensor, t: Tensor) -> Tensor:
    """``[B, N, F']`` normalised channels -> ``[B, N, F' + 11]`` with the time features appended."""
    B, N = x.shape[:2]
    return torch.cat([x, time_features(t)[:, None, :].expand(B, N, len(TIMESCALES))], dim=-1)


def build_features(
    deltas: Tensor,
    param: Tensor,
    t: Tensor,
    state: dict[str, Tensor] | None = None,
    fac_g: Tensor | None = None,
) -> Tensor:
    """The MLP inputs of every element of one tensor, all at once (the reference; :func:`iter_features` gives
    the same features a block of rows at a time, in bounded memory).

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
    if deltas.dim() == p.dim():  # a scalar parameter: [B, C] -> [B, 1, C]
        deltas = deltas[:, None]
    fd = factored_dims(tuple(p.shape[1:]))
    factors = _factors(state, fd) if state is not None else None
    x = normalize_channels(_raw_channels(deltas, p, state, fac_g, factors))
    return _with_time(x.reshape(p.shape[0], -1, x.shape[-1]), t)


def _row_block(x: Tensor, a: int, b: int) -> Tensor:
    """Rows ``a:b`` of element dim 0 of ``x [B, S0, ...]``; a dim kept as 1 (a broadcast factor) is not cut."""
    return x if x.shape[1] == 1 else x[:, a:b]


def iter_features(
    deltas: Tensor,
    param: Tensor,
    t: Tensor,
    g: Tensor | None = None,
    state: dict[str, Tensor] | None = None,
    max_elements: int = 1 << 18,
    negate_deltas: bool = False,
):
    """:func:`build_features` a block of rows at a time, so that a large tensor never holds all its features.

    The channels' RMS normalisation is over the whole tensor, so it takes two passes over blocks of whole rows of
    element dim 0 (``max(1, max_elements // row size)`` rows each): the first sums each channel's squares, the
    second builds, normalises and yields. The transient memory is a small multiple of one block's features
    (``benchmarks/lopt_meta_iter.py`` measures it), the compute about twice the channels' (cheap against the MLP).
    Equal to :func:`build_features` up to the order of the float32 sums (``tests/test_lopt_features.py``).

    Args:
        deltas, param, t, state: as :func:`build_features` (``state`` from ``update_accumulators(...,
            with_fac_g=False)``).
        g: ``[B, *S]`` the mean pseudo-gradient (needed with ``state``, for ``fac_g``).
        max_elements: target elements per block.
        negate_deltas: ``deltas`` are the workers' ``Δ`` (a view), negated a block at a time into pseudo-gradients
            instead of copied whole.

    Yields:
        float32 ``[B, n_i, F]`` blocks whose concatenation along dim 1 is :func:`build_features`' ``[B, N, F]``.
    """
    p = _as_batched(param).to(torch.float32)
    if deltas.dim() == p.dim():
        deltas = deltas[:, None]
    B, rows = p.shape[0], p.shape[1]
    row_size = max(1, p[0, 0].numel())
    step = max(1, max_elements // row_size)
    fd = factored_dims(tuple(p.shape[1:]))
    factors = _factors(state, fd) if state is not None else None
    g1 = None if g is None else _as_batched(g).to(torch.float32)[..., None]

    def block(a: int, b: int) -> Tensor:
        d = -deltas[:, a:b] if negate_deltas else deltas[:, a:b]
        if state is None:
            return _raw_channels(d, p[:, a:b], None, None, None)
        st = {k: _row_block(v, a, b) for k, v in state.items()}
        fs = None if factors is None else tuple(_row_block(f, a, b) for f in factors)
        return _raw_channels(d, p[:, a:b], st, _fac_g(g1[:, a:b], st, fs), fs)

    spans = [(a, min(a + step, rows)) for a in range(0, rows, step)]
    sumsq = None
    for a, b in spans:
        x = block(a, b)
        part = x.square().reshape(B, -1, x.shape[-1]).sum(dim=1)
        sumsq = part if sumsq is None else sumsq + part
    scale = torch.rsqrt(NORM_EPS + sumsq / p[0].numel())  # [B, F']
    for a, b in spans:
        x = block(a, b)
        yield _with_time(x.reshape(B, -1, x.shape[-1]) * scale[:, None, :], t)
