"""The scale-aware (delta-rms) learned step: equivariant to the deltas' scale, sgd-like init = local SGD, stored in
the weight file (old files stay fixed-step), and the fixed-step-with-decaying-schedule warning."""

from __future__ import annotations

import pytest
import torch

from moecpt.config import Recipe
from moecpt.errors import MoecptError
from moecpt.lopt import LearnedOuterOptimizer, LOptSpec, load_optimizer, load_pretrained
from moecpt.lopt.mlp import init_meta_params
from moecpt.lopt.optimizers import init_lopt_state, lopt_step
from moecpt.lopt.pretrained import load_weights, pretrained_path, save_weights
from moecpt.lopt.schedule_check import fixed_step_schedule_warning

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

SHAPES = [(6, 5), (5,), ()]


def _trajectory(spec: LOptSpec, phi: torch.Tensor, scale: float, rounds: int = 4) -> list[list[torch.Tensor]]:
    """The steps of ``rounds`` rounds on fixed parameters, with every delta multiplied by ``scale``."""
    gen = torch.Generator().manual_seed(0)
    # small parameters so that p - new_p is exact in float32 at both scales (the parameter channel is normalised,
    # so their size does not change the features)
    params = [torch.randn(1, *s, generator=gen) * 1e-7 for s in SHAPES]
    state = init_lopt_state(spec, params)
    meta = spec.unflatten(phi)
    steps = []
    for _ in range(rounds):
        deltas = [torch.randn(1, *([4] if spec.aggregator else []), *s, generator=gen) * 0.03 * scale
                  for s in SHAPES]
        new, state = lopt_step(spec, meta, params, deltas, state)
        steps.append([p - q for p, q in zip(params, new)])
    return steps


@pytest.mark.parametrize("kind", ["lopt-a", "lagg-a", "lopt"])
def test_delta_rms_step_is_scale_equivariant_and_fixed_is_not(kind):
    phi_gen = torch.Generator().manual_seed(1)
    spec = LOptSpec(kind, 4, step_scale="delta-rms")
    phi = init_meta_params(spec, phi_gen, "paper")  # a generic MLP, not the sgd-like wiring
    big, small = _trajectory(spec, phi, 1.0), _trajectory(spec, phi, 1e-4)
    for rb, rs in zip(big, small):
        for b, s in zip(rb, rs):
            assert torch.allclose(s, b * 1e-4, rtol=1e-4, atol=1e-12), (s, b)
    fixed = LOptSpec(kind, 4)
    fb, fs = _trajectory(fixed, phi, 1.0), _trajectory(fixed, phi, 1e-4)
    ratio = fs[-1][0].norm() / fb[-1][0].norm()
    assert ratio > 1e-2, ratio  # the paper's step barely shrinks: 1e-4 smaller deltas, a step of similar size


def test_sgd_like_delta_rms_init_is_local_sgd():
    gen = torch.Generator().manual_seed(0)
    spec = LOptSpec("lopt-a", step_scale="delta-rms")
    opt = LearnedOuterOptimizer(spec, init_meta_params(spec, torch.Generator().manual_seed(3)))
    params = [torch.randn(s, generator=gen) * 1e-8 for s in SHAPES]  # float32 p + Δ exact enough at Δ ~ 1e-6
    for scale in (1e-1, 1e-6, 1e-3):  # a schedule that changes the deltas' size from round to round
        deltas = [torch.randn(s, generator=gen) * scale for s in SHAPES]
        want = [p + d for p, d in zip(params, deltas)]
        opt.step(params, deltas)
        for p, w, d in zip(params, want, deltas):
            assert torch.allclose(p, w, rtol=0, atol=1e-5 * float(d.abs().max())), (p - w, d)
    zero = [torch.zeros(s) for s in SHAPES]
    before = [p.clone() for p in params]
    opt.step(params, zero)  # an all-zero delta: no step (no division by zero)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_step_scale_is_stored_and_old_files_stay_fixed(tmp_path):
    spec = LOptSpec("lopt-a", step_scale="delta-rms")
    phi = init_meta_params(spec, torch.Generator().manual_seed(0))
    save_weights(tmp_path / "a.safetensors", spec, phi)
    loaded, _, meta = load_weights(tmp_path / "a.safetensors")
    assert loaded.step_scale == "delta-rms" and meta["step_scale"] == "delta-rms"
    assert load_optimizer(tmp_path / "a.safetensors").spec == spec
    for name in ("lagg-a", "lopt-a"):  # shipped before the option existed: no key, the paper's fixed step
        _, _, meta = load_weights(pretrained_path(name))
        assert "step_scale" not in meta and load_pretrained(name).spec.step_scale == "fixed"
    with pytest.raises(MoecptError, match="unknown step scale 'rms'; use one of: fixed, delta-rms"):
        LOptSpec("lopt-a", step_scale="rms")


def _recipe(outer: str | None, kind: str = "cosine", min_lr: float = 3e-5) -> Recipe:
    d = {"distributed": {"sync": "diloco", "outer_optimizer": outer} if outer else {},
         "schedule": {"kind": kind}, "optim": {"lr": 3e-4, "min_lr": min_lr}}
    return Recipe.model_validate(d)


def test_fixed_step_with_decaying_schedule_warns_in_one_line(tmp_path):
    msg = fixed_step_schedule_warning(_recipe("lopt-a"))
    assert msg is not None and "\n" not in msg and "lopt-a" in msg and "delta-rms" in msg and "cosine" in msg
    assert fixed_step_schedule_warning(_recipe("lopt-a", "constant")) is None
    assert fixed_step_schedule_warning(_recipe("lopt-a", "cosine", min_lr=3e-4)) is None  # min = peak: no decay
    assert fixed_step_schedule_warning(_recipe("nesterov")) is None
    assert fixed_step_schedule_warning(_recipe(None)) is None
    spec = LOptSpec("lopt-a", step_scale="delta-rms")
    save_weights(tmp_path / "s.safetensors", spec, init_meta_params(spec, torch.Generator().manual_seed(0)))
    assert fixed_step_schedule_warning(_recipe(str(tmp_path / "s.safetensors"))) is None
    assert "wsd" in fixed_step_schedule_warning(_recipe("lagg-a", "wsd"))
