"""Outer-optimizer interface: state save / restore continues identically; bad inputs give one-line errors."""

from __future__ import annotations

import io

import pytest
import torch

from moecpt.errors import MoecptError
from moecpt.lopt import DiLoCo, LearnedOuterOptimizer, LocalSGD, LOptSpec, SlowMo
from moecpt.lopt.mlp import init_meta_params


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


SHAPES = [(5, 3), (3,), ()]


def _learned(kind: str, k: int = 4) -> LearnedOuterOptimizer:
    spec = LOptSpec(kind, k)
    return LearnedOuterOptimizer(spec, init_meta_params(spec, torch.Generator().manual_seed(0)))


def _rounds(opt, params, n: int, seed: int, k: int = 4):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        deltas = [torch.randn(k, *p.shape, generator=gen) * 0.01 for p in params]
        if not opt.needs_worker_deltas:
            deltas = [d.mean(0) for d in deltas]
        opt.step(params, deltas)


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("make", [lambda: _learned("lagg-a"), lambda: _learned("lopt-a"), lambda: _learned("lagg"),
                                  lambda: _learned("lopt"), lambda: SlowMo(0.5, 0.1, 0.95), lambda: DiLoCo(),
                                  lambda: LocalSGD()])
def test_save_restore_continues_identically(make):
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SHAPES]
    a = make()
    _rounds(a, params, 3, seed=1)
    saved_params = [p.clone() for p in params]
    state = _roundtrip(a.state_dict())
    _rounds(a, params, 2, seed=2)

    b = make()
    b.load_state_dict(state)  # restored before its first step: applied when shapes are known
    resumed = [p.clone() for p in saved_params]
    _rounds(b, resumed, 2, seed=2)
    for x, y in zip(params, resumed):
        assert torch.equal(x, y)
    if isinstance(a, LearnedOuterOptimizer):
        assert a.round == b.round == 5
        c = make()  # restoring into an optimizer that has already stepped works too
        other = [torch.randn(s) for s in SHAPES]
        _rounds(c, other, 1, seed=3)
        c.load_state_dict(state)
        again = [p.clone() for p in saved_params]
        _rounds(c, again, 2, seed=2)
        assert all(torch.equal(x, y) for x, y in zip(params, again))


def test_learned_step_changes_params_in_place_and_keeps_dtype():
    opt = _learned("lopt-a")
    p = [torch.randn(4, 3, dtype=torch.float64)]
    ref = p[0].clone()
    opt.step(p, [torch.full((4, 3), 0.01, dtype=torch.float64)])
    assert p[0].dtype == torch.float64 and not torch.equal(p[0], ref)
    assert opt.round == 1


def test_lagg_with_other_k_is_a_one_line_error():
    opt = _learned("lagg-a", 8)
    params = [torch.zeros(3)]
    with pytest.raises(MoecptError, match=r"K=8 workers but got deltas from K=4.*lopt-a") as e:
        opt.step(params, [torch.zeros(4, 3)])
    assert "\n" not in str(e.value)


def test_wrong_delta_shapes_are_one_line_errors():
    with pytest.raises(MoecptError, match="mean delta"):
        _learned("lopt-a").step([torch.zeros(3)], [torch.zeros(4, 3)])
    with pytest.raises(MoecptError, match="every worker's delta"):
        _learned("lagg-a", 4).step([torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(MoecptError, match="one delta per parameter"):
        LocalSGD().step([torch.zeros(3)], [])


def test_state_for_another_model_is_refused():
    a = _learned("lopt-a")
    _rounds(a, [torch.zeros(5, 3)], 1, seed=0)
    b = _learned("lopt-a")
    _rounds(b, [torch.zeros(2)], 1, seed=0)
    with pytest.raises(MoecptError, match="another model"):
        b.load_state_dict(a.state_dict())


def test_slowmo_with_unit_lr_and_no_momentum_is_local_sgd():
    p1, p2 = [torch.randn(4)], None
    p2 = [p1[0].clone()]
    d = [torch.randn(4)]
    SlowMo(local_lr=0.3, slow_lr=1.0, beta=0.0).step(p1, d)
    LocalSGD().step(p2, d)
    assert torch.allclose(p1[0], p2[0])


@pytest.mark.parametrize("step_scale", ["fixed", "delta-rms"])
def test_chunked_mlp_matches_unchunked(monkeypatch, step_scale):
    from moecpt.lopt import optimizers

    spec = LOptSpec("lagg-a", 2, step_scale=step_scale)
    meta = spec.unflatten(init_meta_params(spec, torch.Generator().manual_seed(0)))
    params = [torch.randn(1, 30, 10)]
    deltas = [torch.randn(1, 2, 30, 10) * 0.01]
    whole, _ = optimizers.lopt_step(spec, meta, params, deltas, optimizers.init_lopt_state(spec, params))
    monkeypatch.setattr(optimizers, "MLP_CHUNK", 64)
    chunked, _ = optimizers.lopt_step(spec, meta, params, deltas, optimizers.init_lopt_state(spec, params))
    assert torch.allclose(whole[0], chunked[0], atol=1e-7)
