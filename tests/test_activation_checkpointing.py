"""Activation checkpointing (``train.activation_checkpointing``): the same outputs, gradients and bias-balancing
counts as without it, fewer saved activations, and a training run whose losses do not change."""

from __future__ import annotations

import json

import pytest
import torch

from moecpt.config import model_preset, recipe_from_dict
from moecpt.model.flops import saved_activation_bytes
from moecpt.model.transformer import build_model
from moecpt.train.trainer import Trainer, lm_loss

from tiny_recipes import raw_recipe

V = 96

ROUTERS = {
    "switch-penalty": ("smoke-switch", {"kind": "penalty"}),
    "granular-shared-penalty": ("smoke-granular", {"kind": "penalty"}),
    "granular-sinkhorn": ("smoke-granular", {"kind": "sinkhorn"}),
    "switch-sinkhorn": ("smoke-switch", {"kind": "sinkhorn"}),
    "granular-bias": ("smoke-granular", {"kind": "bias"}),
    "dense": ("smoke-dense", None),
}


def _model(name: str):
    preset, router = ROUTERS[name]
    over = {"vocab_size": V, "max_seq_len": 32}
    if router is not None:
        over["moe"] = {"router": router}
    torch.manual_seed(0)
    return build_model(model_preset(preset, **over))


def _step(model, ids_BT):
    """One training forward + backward; logits, loss, every gradient and every router's step load."""
    logits_BTV, routing = model(ids_BT[:, :-1], return_routing=True)
    aux = sum((sum(w * r.aux_losses[k] for k, w in r.aux_weights.items()) for r in routing), torch.zeros(()))
    loss = lm_loss(logits_BTV, ids_BT[:, 1:]) + aux
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads = [r.step_load.clone() for r in model.routers() if r.is_bias_balanced]
    return logits_BTV.detach(), loss.detach(), grads, loads


@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("mode", ["full", "moe-only"])
def test_checkpointing_changes_nothing_but_memory(name, mode):
    ids_BT = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(1))
    ref_model, ck_model = _model(name), _model(name)
    ck_model.set_activation_checkpointing(mode)
    ref, got = _step(ref_model, ids_BT), _step(ck_model, ids_BT)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
    assert got[2].keys() == ref[2].keys()
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=0, atol=0, msg=n)
    # a bias-balanced router counts each routed slot once, not again when the backward replays its forward
    assert len(got[3]) == len(ref[3])
    for a, b in zip(got[3], ref[3]):
        assert torch.equal(a, b) and a.sum().item() == 4 * 32 * ck_model.cfg.moe.top_k
    saved_ref = saved_activation_bytes(_model(name), ids_BT[:, :-1])
    saved_ck = saved_activation_bytes(ck_model, ids_BT[:, :-1])
    if mode == "full" or name != "dense":
        assert saved_ck < 0.6 * saved_ref, (saved_ck, saved_ref)
    else:  # moe-only on a dense model has nothing to recompute
        assert saved_ck == saved_ref


def test_evaluation_and_no_grad_never_checkpoint():
    model = _model("granular-bias")
    model.set_activation_checkpointing("full")
    ids_BT = torch.randint(0, V, (2, 17))
    model.eval()
    with torch.no_grad():
        model(ids_BT)
    assert all(r.step_load.sum() == 0 for r in model.routers())  # evaluation never counts load


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="everything"):
        _model("dense").set_activation_checkpointing("everything")


def test_training_run_losses_unchanged(tmp_path, monkeypatch):
    from moecpt.model import transformer

    calls = []
    real = transformer.checkpoint
    monkeypatch.setattr(transformer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, n_calls = {}, {}
    for mode in ("none", "moe-only"):
        raw = raw_recipe("smoke-granular", steps=3, checkpoint_every=3,
                         train={"activation_checkpointing": mode})
        Trainer(recipe_from_dict(raw), tmp_path / mode).run()
        n_calls[mode], calls[:] = len(calls), []
        out[mode] = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    losses = {m: [(r["step"], r["loss"]) for r in rs if "loss" in r and r.get("split") != "val" and "event" not in r]
              for m, rs in out.items()}
    assert len(losses["none"]) == 3 and losses["moe-only"] == losses["none"]
    assert n_calls == {"none": 0, "moe-only": 3 * 2}  # 3 steps x 2 MoE layers (one micro-batch per step)
