"""Continual pre-training: the LR starts where the CPT schedule says (never a stale parent LR), lineage is recorded,
a CPT run resumes its own checkpoint, expert biases are carried."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from moecpt.config import recipe_from_dict
from moecpt.train import trainer as trainer_mod
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.schedules import const_lr, lr_at
from moecpt.train.trainer import Trainer, lm_loss
from tiny_recipes import raw_recipe as _raw_recipe

# CPT tests run 4 steps with a checkpoint every 2
raw_recipe = functools.partial(_raw_recipe, steps=4, checkpoint_every=2)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_records(run: Path) -> list[dict]:
    return [r for r in records(run) if r.get("split") != "val" and "event" not in r]


def val_loss(run: Path, step: int, source: str) -> float:
    (rec,) = [r for r in records(run) if r.get("split") == "val" and r["step"] == step and r["source"] == source]
    return rec["loss"]


CPT_SECTIONS = dict(
    data={"mixture": {"code": 0.7, "english": 0.3}, "eval_sources": ["code", "english"]},
    optim={"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.05, "beta2": 0.99},
    schedule={"kind": "cosine", "warmup_fraction": 0.5, "warmup_start_lr": 2e-4},  # re-warm from 2e-4
    cpt={"load_optimizer": True},
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A cosine pre-training run (4 steps to min_lr) and a CPT run from it that carries the AdamW moments."""
    root = tmp_path_factory.mktemp("cpt")
    parent = root / "parent"
    Trainer(recipe_from_dict(raw_recipe(train={"eval_every": 4})), parent, show_progress=False).run()
    cpt_recipe = recipe_from_dict(raw_recipe(**CPT_SECTIONS))
    Trainer(cpt_recipe, root / "cpt", parent=parent, show_progress=False).run()
    return root, cpt_recipe


def test_cpt_starts_at_its_own_schedule_lr(runs):
    root, r = runs
    parent_lrs = [x["lr"] for x in train_records(root / "parent")]
    assert parent_lrs[-1] == pytest.approx(3e-4)  # the parent ended its cosine at min_lr
    lrs = [(x["step"], x["lr"]) for x in train_records(root / "cpt")]
    assert [s for s, _ in lrs] == [1, 2, 3, 4]  # the CPT's own step count, not the parent's 5..8
    assert lrs[0][1] == lr_at(0, r.schedule, r.optim, r.train.steps) == 2e-4
    assert lrs[0][1] not in (parent_lrs[-1], 3e-3)
    assert all(lr == lr_at(s - 1, r.schedule, r.optim, r.train.steps) for s, lr in lrs)
    assert max(lr for _, lr in lrs) == pytest.approx(1e-3)  # the CPT peak, never the parent's 3e-3


def test_cpt_loads_weights_and_moments_but_own_hyperparameters(runs):
    root, r = runs
    # step-0 evaluation of the CPT model = the parent's final evaluation: the same weights
    assert val_loss(root / "cpt", 0, "english") == val_loss(root / "parent", 4, "english")
    ck = load_checkpoint(root / "cpt")
    opt = ck.optimizer_state()
    assert {float(s["step"]) for s in opt["state"].values()} == {8.0}  # 4 parent + 4 CPT AdamW steps
    groups = {g["name"]: g for g in opt["param_groups"]}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert tuple(groups["decay"]["betas"]) == (0.9, 0.99)
    # data position and token count restart; the mixture is the CPT's
    assert ck.meta["tokens"] == 4 * 8 * 32
    assert ck.meta["sampler"]["rows"] == {"code": 22, "english": 10}  # 32 rows split 0.7 / 0.3
    assert ck.meta["tokens_per_source"] == {"code": 22 * 32, "english": 10 * 32}


def test_cpt_records_lineage(runs):
    root, _ = runs
    parent_ck = load_checkpoint(root / "parent")
    run = json.loads((root / "cpt" / "run.json").read_text())
    assert run["identity"]["mode"] == "cpt"
    assert run["lineage"]["parent_checkpoint"] == str(parent_ck.path.resolve())
    assert run["lineage"]["parent_step"] == 4 and run["lineage"]["parent_run"] == "t"
    for ck_dir in sorted((root / "cpt" / "checkpoints").iterdir()):
        ck = load_checkpoint(ck_dir)
        assert ck.meta["mode"] == "cpt"
        assert ck.meta["lineage"] == {"parent_checkpoint": str(parent_ck.path.resolve()), "parent_step": 4}
    assert [p.name for p in sorted((root / "cpt" / "checkpoints").iterdir())] == ["step_00000002",
                                                                                   "step_00000004"]


def test_cpt_resume_uses_its_own_checkpoint(runs, monkeypatch):
    """Interrupt a CPT run in step 3 (after its step-2 checkpoint); the restart resumes from that checkpoint, not
    the parent, and reproduces the uninterrupted CPT run exactly."""
    root, r = runs
    out = root / "cpt-interrupted"
    calls = {"n": 0}

    def interrupting_loss(logits, targets):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return lm_loss(logits, targets)

    monkeypatch.setattr(trainer_mod, "lm_loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        Trainer(r, out, parent=root / "parent", show_progress=False).run()
    monkeypatch.setattr(trainer_mod, "lm_loss", lm_loss)
    assert load_checkpoint(out).step == 2

    def no_parent(*_a, **_k):
        raise AssertionError("a resumed CPT run must not load the parent again")

    monkeypatch.setattr(Trainer, "_load_parent", no_parent)
    summary = Trainer(r, out, parent=root / "parent", show_progress=False).run()
    assert summary["resumed"] is True and summary["mode"] == "cpt" and summary["steps"] == 4
    got = [(x["step"], x["lr"], x["loss"]) for x in train_records(out)]
    assert got == [(x["step"], x["lr"], x["loss"]) for x in train_records(root / "cpt")]
    a, b = load_checkpoint(out).model_state(), load_checkpoint(root / "cpt").model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cosine_inf_cpt_from_pre_anneal_checkpoint_starts_at_the_constant(tmp_path):
    """Pre-train with CosineInf, stopping before the anneal (step 8 of 10); CPT from that checkpoint with
    "constant, then anneal" starts at the constant LR and anneals to min_lr."""
    sched = {"kind": "cosine-inf", "warmup_fraction": 0.1, "cooldown_fraction": 0.5, "constant_fraction": 0.2,
             "stop_before_anneal": True}
    pre = recipe_from_dict(raw_recipe(schedule=sched, train={"steps": 10, "checkpoint_every": 5}))
    summary = Trainer(pre, tmp_path / "pre", show_progress=False).run()
    assert summary["steps"] == 8
    c = const_lr(pre.schedule, pre.optim)
    assert train_records(tmp_path / "pre")[-1]["lr"] == pytest.approx(c)  # in the constant phase
    ck = load_checkpoint(tmp_path / "pre")
    assert ck.step == 8

    cpt = recipe_from_dict(raw_recipe(
        schedule={"kind": "cosine-inf", "warmup_fraction": 0.0, "cooldown_fraction": 0.0,
                  "constant_fraction": 0.5},
        train={"steps": 6, "checkpoint_every": 6}, cpt={"load_optimizer": True}))
    Trainer(cpt, tmp_path / "cpt", parent=ck.path, show_progress=False).run()
    lrs = [x["lr"] for x in train_records(tmp_path / "cpt")]
    assert lrs[0] == lr_at(0, cpt.schedule, cpt.optim, 6) == pytest.approx(c)
    assert lrs[:3] == [lrs[0]] * 3  # constant for half the steps
    assert lrs[-1] == pytest.approx(cpt.optim.min_lr)  # then the exponential anneal
    assert json.loads((tmp_path / "cpt" / "run.json").read_text())["lineage"]["parent_step"] == 8


def test_cpt_carries_expert_biases(tmp_path):
    bias = {"moe": {"router": {"kind": "bias", "bias_update_rate": 0.01}}}
    Trainer(recipe_from_dict(raw_recipe(model=bias, train={"steps": 3, "checkpoint_every": 3})),
            tmp_path / "pre", show_progress=False).run()
    parent = load_checkpoint(tmp_path / "pre").model_state()
    keys = [k for k in parent if k.endswith("expert_bias")]
    assert keys and all(parent[k].abs().max() > 0 for k in keys)
    # a CPT recipe may change the routing settings: a zero update rate keeps the parent's biases exactly
    frozen = {"moe": {"router": {"kind": "bias", "bias_update_rate": 0.0}}}
    Trainer(recipe_from_dict(raw_recipe(model=frozen, train={"steps": 1, "checkpoint_every": 1})),
            tmp_path / "cpt", parent=tmp_path / "pre", show_progress=False).run()
    child = load_checkpoint(tmp_path / "cpt").model_state()
    assert all(torch.equal(child[k], parent[k]) for k in keys)


def test_cpt_may_switch_routing_strategy(tmp_path):
    """Penalty parent -> bias-balanced CPT (fresh zero biases) -> penalty CPT (biases dropped)."""
    Trainer(recipe_from_dict(raw_recipe(train={"steps": 1, "checkpoint_every": 1})), tmp_path / "pre",
            show_progress=False).run()
    bias = {"moe": {"router": {"kind": "bias", "bias_update_rate": 0.01}}}
    Trainer(recipe_from_dict(raw_recipe(model=bias, train={"steps": 2, "checkpoint_every": 2})),
            tmp_path / "bias", parent=tmp_path / "pre", show_progress=False).run()
    state = load_checkpoint(tmp_path / "bias").model_state()
    assert sum(k.endswith("expert_bias") for k in state) == 2
    assert train_records(tmp_path / "bias")[0]["bias_absmax_mean"] == pytest.approx(0.01)  # from zero, one update
    # a CPT recipe keeps the parent's router unless it sets a key: switching back names the strategy
    penalty = {"moe": {"router": {"kind": "penalty"}}}
    Trainer(recipe_from_dict(raw_recipe(model=penalty, train={"steps": 1, "checkpoint_every": 1})),
            tmp_path / "back", parent=tmp_path / "bias", show_progress=False).run()
    assert not any(k.endswith("expert_bias") for k in load_checkpoint(tmp_path / "back").model_state())
