"""The bias update runs as the optimizer's post-step hook: once per step(), from the given (reduced) loads or the
routers' own counts, and never without a step."""

from __future__ import annotations

import torch

from moecpt.config import model_preset
from moecpt.model.transformer import build_model
from moecpt.train.bias_balance import BiasUpdateHook

V = 64


def _model(kind: str):
    torch.manual_seed(0)
    return build_model(model_preset("smoke-switch", vocab_size=V, max_seq_len=16,
                                    moe={"router": {"kind": kind, "bias_update_rate": 0.01}}))


def _train_forward(model):
    ids_BT = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids_BT).float().logsumexp(-1).mean().backward()


def test_hook_moves_biases_once_per_step_from_the_given_loads():
    model = _model("bias")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hook = BiasUpdateHook.attach(model, opt)
    routers = model.routers()
    _train_forward(model)
    counted = [r.step_load.clone() for r in routers]
    assert all(c.sum() == 2 * 16 for c in counted)  # top-1: one slot per token
    before = [r.expert_bias.clone() for r in routers]
    # loads from elsewhere (all-reduced over ranks) win over the router's own count
    given = [torch.arange(r.num_experts, dtype=torch.float32) for r in routers]
    hook.loads = given
    opt.step()
    for r, b, load in zip(routers, before, given):
        want = b + 0.01 * torch.sign(load.mean() - load)
        torch.testing.assert_close(r.expert_bias, want)
        assert r.step_load.sum() == 0  # reset for the next step
    assert hook.loads is None and set(hook.stats) >= {"bias_mean_layers", "bias_mean_mean", "bias_std_mean"}
    # no step, no update: a skipped non-finite step never calls step()
    after = [r.expert_bias.clone() for r in routers]
    _train_forward(model)
    assert all(torch.equal(r.expert_bias, a) for r, a in zip(routers, after))
    # the next step uses each router's own count
    own = [r.step_load.clone() for r in routers]
    opt.step()
    for r, a, load in zip(routers, after, own):
        torch.testing.assert_close(r.expert_bias, a + 0.01 * torch.sign(load.mean() - load))


def test_no_hook_without_bias_routers():
    model = _model("penalty")
    assert BiasUpdateHook.attach(model, torch.optim.SGD(model.parameters(), lr=0.1)) is None
