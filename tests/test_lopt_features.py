"""Learned-optimizer features against values computed by hand on tiny tensors; input widths; MLP layout."""

from __future__ import annotations

import math

import pytest
import torch

from moecpt.lopt.features import (
    build_features,
    decays_from_offsets,
    factored_dims,
    init_accumulators,
    iter_features,
    time_features,
    update_accumulators,
)
from moecpt.lopt.mlp import LOptSpec


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


B0 = (0.9, 0.99, 0.999)  # momentum decays
R0 = 0.999  # second-moment decay
A0 = (0.9, 0.99, 0.999)  # adafactor decays


def _norm(ch: list[float]) -> list[float]:
    """x / sqrt(1e-5 + mean x^2) over the tensor's elements."""
    ms = sum(x * x for x in ch) / len(ch)
    return [x / math.sqrt(1e-5 + ms) for x in ch]


def _first_step(g_vals: list[float], p_vals: list[float], shape):
    g = torch.tensor(g_vals).reshape(1, *shape)
    p = torch.tensor(p_vals).reshape(1, *shape)
    decays = decays_from_offsets(torch.zeros(1, 7))
    state, fac_g = update_accumulators(init_accumulators(p), g, decays)
    x = build_features(g[..., None], p, torch.tensor([0]), state, fac_g)
    return x[0], state


def test_decays_and_time_features():
    assert torch.allclose(decays_from_offsets(torch.zeros(1, 7))[0], torch.tensor(B0 + (R0,) + A0))
    tf = time_features(torch.tensor([0, 7]))
    scales = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
    assert tf.shape == (2, 11)
    assert torch.allclose(tf[1], torch.tensor([math.tanh(7 / s - 1) for s in scales]))
    assert torch.allclose(tf[0], torch.full((11,), math.tanh(-1.0)))


def test_factored_dims():
    assert factored_dims((5,)) is None
    assert factored_dims(()) is None
    assert factored_dims((2, 3)) == (0, 1)  # (d1 second largest, d0 largest)
    assert factored_dims((7, 3)) == (1, 0)
    assert factored_dims((4, 4)) == (0, 1)  # ties: the later dim is d0
    assert factored_dims((2, 9, 5)) == (2, 1)


def test_unfactored_1d_features_by_hand():
    g = [0.5, -1.0, 2.0]
    p = [1.0, 0.0, -3.0]
    x, state = _first_step(g, p, (3,))
    assert x.shape == (3, 39) and set(state) == {"m", "v", "diag"}
    cols = {}
    cols["g"] = g
    cols["p"] = p
    for j, b in enumerate(B0):
        cols[f"m{j}"] = [(1 - b) * gi for gi in g]
    v = [(1 - R0) * gi * gi for gi in g]
    cols["v"] = v
    for j in range(3):
        cols[f"mr{j}"] = [m / math.sqrt(vi + 1e-6) for m, vi in zip(cols[f"m{j}"], v)]
    cols["r"] = [1 / math.sqrt(vi + 1e-6) for vi in v]
    diag = [[(1 - a) * (gi * gi + 1e-30) for gi in g] for a in A0]
    for j in range(3):
        cols[f"fg{j}"] = [gi / math.sqrt(d + 1e-9) for gi, d in zip(g, diag[j])]
    order = ["g", "p", "m0", "m1", "m2", "v", "mr0", "mr1", "mr2", "r", "fg0", "fg1", "fg2"]
    expected = [_norm(cols[k]) for k in order]
    expected += [_norm(diag[j]) for j in range(3)] * 2
    expected += [_norm([1 / math.sqrt(d + 1e-8) for d in diag[j]]) for j in range(3)] * 2
    expected += [_norm([m / math.sqrt(d + 1e-6) for m, d in zip(cols[f"m{j}"], diag[j])]) for j in range(3)]
    exp = torch.tensor(expected).T  # [3 elements, 28 channels]
    assert torch.allclose(x[:, :28], exp, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x[:, 28:], torch.full((3, 11), math.tanh(-1.0)))


def test_factored_2d_features_by_hand():
    g = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]  # shape (2, 3): d0 = 1 (columns), d1 = 0 (rows)
    p = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]
    x, state = _first_step(sum(g, []), sum(p, []), (2, 3))
    assert x.shape == (6, 39) and set(state) == {"m", "v", "row", "col"}
    assert state["row"].shape == (1, 2, 1, 3) and state["col"].shape == (1, 1, 3, 3)
    el = [(i, j) for i in range(2) for j in range(3)]
    gsq = [[g[i][j] ** 2 + 1e-30 for j in range(3)] for i in range(2)]
    chans: list[list[float]] = []
    for a in A0:
        row = [(1 - a) * sum(gsq[i]) / 3 for i in range(2)]  # mean over d0 (axis 1): one value per row
        col = [(1 - a) * (gsq[0][j] + gsq[1][j]) / 2 for j in range(3)]  # mean over d1 (axis 0)
        rcm = sum(row) / 2
        rf = [1 / math.sqrt(r / (rcm + 1e-9)) for r in row]
        cf = [1 / math.sqrt(c) for c in col]
        chans.append([g[i][j] * rf[i] * cf[j] for i, j in el])  # fac_g
        chans.append([row[i] for i, j in el])
        chans.append([col[j] for i, j in el])
        chans.append([1 / math.sqrt(row[i] + 1e-8) for i, j in el])
        chans.append([1 / math.sqrt(col[j] + 1e-8) for i, j in el])
        chans.append([(1 - B0[A0.index(a)]) * g[i][j] * rf[i] * cf[j] for i, j in el])  # m * row * col factor
    # feature layout: fac_g at 10..12, then row x3, col x3, rsqrt row x3, rsqrt col x3, m*factors x3
    got = {"fac_g": x[:, 10:13], "row": x[:, 13:16], "col": x[:, 16:19], "rrow": x[:, 19:22],
           "rcol": x[:, 22:25], "mfac": x[:, 25:28]}
    for j in range(3):
        for k, name in enumerate(["fac_g", "row", "col", "rrow", "rcol", "mfac"]):
            want = torch.tensor(_norm(chans[6 * j + k]))
            assert torch.allclose(got[name][:, j], want, rtol=1e-4, atol=1e-5), (name, j)
    assert torch.allclose(x[:, 0], torch.tensor(_norm([g[i][j] for i, j in el])), rtol=1e-5)
    assert torch.allclose(x[:, 1], torch.tensor(_norm([p[i][j] for i, j in el])), rtol=1e-5)


def test_scalar_parameter_is_supported():
    p = torch.tensor([2.0])  # B = 1, a 0-d parameter
    g = torch.tensor([0.1])
    state, fac = update_accumulators(init_accumulators(p), g, decays_from_offsets(torch.zeros(1, 7)))
    x = build_features(g[..., None], p, torch.tensor([3]), state, fac)
    assert x.shape == (1, 1, 39)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_input_widths(k):
    assert LOptSpec("lopt-a").input_width == 39
    assert LOptSpec("lagg-a", k).input_width == k + 38
    assert LOptSpec("lopt").input_width == 13
    assert LOptSpec("lagg", k).input_width == k + 12
    assert LOptSpec("lopt-a").num_meta_params == 2409
    assert LOptSpec("lagg-a", 8).num_meta_params == 2633


def test_lagg_features_have_one_channel_per_worker():
    from moecpt.lopt.mlp import init_meta_params
    from moecpt.lopt.optimizers import init_lopt_state, lopt_step

    spec = LOptSpec("lagg-a", 3)
    phi = init_meta_params(spec, torch.Generator().manual_seed(0))
    params = [torch.randn(2, 4, 5), torch.randn(2, 5)]
    deltas = [torch.randn(2, 3, 4, 5) * 0.01, torch.randn(2, 3, 5) * 0.01]
    new, state = lopt_step(spec, spec.unflatten(phi), params, deltas, init_lopt_state(spec, params))
    assert [n.shape for n in new] == [p.shape for p in params]
    assert state["t"].tolist() == [1, 1]
    # the accumulators see the mean pseudo-gradient -mean_k delta_k
    assert torch.allclose(state["acc"][1]["m"][..., 0], 0.1 * -deltas[1].mean(1), atol=1e-7)


@pytest.mark.parametrize("shape", [(23,), (9, 5), (4, 11), (3, 4, 5), (1, 6), (6, 1)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("adafactor", [True, False])
@pytest.mark.parametrize("max_elements", [1, 7, 10_000])
def test_iter_features_equals_build_features(shape, channels, adafactor, max_elements):
    """Blocks of rows, however cut (one row, a partial last block, one block), give the reference features."""
    gen = torch.Generator().manual_seed(0)
    B = 2
    p = torch.randn(B, *shape, generator=gen)
    chans = torch.randn(B, *shape, channels, generator=gen) * 1e-2
    g = chans.mean(dim=-1)
    t = torch.tensor([0, 5])
    state, fac = None, None
    if adafactor:
        decays = decays_from_offsets(torch.randn(B, 7, generator=gen) * 0.1)
        state, _ = update_accumulators(init_accumulators(p), g * 3, decays)  # a second round, non-trivial state
        state, fac = update_accumulators(state, g, decays)
    ref = build_features(chans, p, t, state, fac)
    blocks = list(iter_features(chans, p, t, g, state, max_elements))
    rows_per_block = max(1, max_elements // max(1, math.prod(shape[1:])))
    assert len(blocks) == math.ceil(shape[0] / rows_per_block)
    torch.testing.assert_close(torch.cat(blocks, dim=1), ref, rtol=1e-5, atol=1e-6)


def test_large_tensor_step_is_chunked_and_equal(monkeypatch):
    """A tensor above the chunk size takes the blocked path and steps as the all-at-once path does."""
    from moecpt.lopt import optimizers
    from moecpt.lopt.mlp import init_meta_params

    spec = LOptSpec("lagg-a", 3)
    meta = spec.unflatten(init_meta_params(spec, torch.Generator().manual_seed(1))[None])
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(1, 40, 30, generator=gen), torch.randn(1, 50, generator=gen)]
    deltas = [torch.randn(1, 3, *q.shape[1:], generator=gen) * 1e-3 for q in params]
    ref, _ = optimizers.lopt_step(spec, meta, params, deltas, optimizers.init_lopt_state(spec, params))
    calls = []
    real = optimizers.iter_features
    monkeypatch.setattr(optimizers, "iter_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(optimizers, "MLP_CHUNK", 64)
    got, _ = optimizers.lopt_step(spec, meta, params, deltas, optimizers.init_lopt_state(spec, params))
    assert len(calls) == 1  # the [40, 30] weight (1,200 elements > 64); the 50-element bias is all at once
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
