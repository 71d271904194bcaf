"""Trainer end to end on tiny models: overfitting, metrics, kill-and-resume (bit for bit), atomic checkpoints under a
kill, aux losses kept out of validation, bias balancing, NaN/Inf handling."""

from __future__ import annotations

import re

import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moecpt.config import recipe_from_dict
from moecpt.storage.lock import LOCK_FILE
from moecpt.errors import MoecptError
from moecpt.train import trainer as trainer_mod
from moecpt.train.checkpoint import load_checkpoint, load_model
from moecpt.train.trainer import Trainer, lm_loss



from tiny_recipes import raw_recipe


def recipe(preset: str = "smoke-switch", **sections):
    return recipe_from_dict(raw_recipe(preset, **sections))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_records(run: Path) -> list[dict]:
    return [r for r in records(run) if r.get("split") != "val" and "event" not in r]


def write_toml(path: Path, raw: dict) -> Path:
    """Minimal TOML writer for the recipe dicts above (tables one level deep, inline tables below)."""

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {val(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for k, v in raw.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {val(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def moecpt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "moecpt", *args]


# --------------------------------------------------------------------------------------------------- learning
def test_overfits_a_fixed_batch(tmp_path, monkeypatch):
    """The same batch every step: a small model must memorise it (loss from ~8.3 nats to below 1.5)."""
    from moecpt.data.mixture import MixtureSampler

    first: dict[str, torch.Tensor] = {}
    real_next = MixtureSampler.next_batch

    def fixed_batch(self):
        b = real_next(self)
        return first.setdefault("b", b).clone()

    monkeypatch.setattr(MixtureSampler, "next_batch", fixed_batch)
    r = recipe("smoke-dense", optim={"lr": 1e-2, "min_lr": 1e-3, "weight_decay": 0.0},
               schedule={"kind": "constant", "warmup_fraction": 0.05},
               train={"steps": 40, "checkpoint_every": 40})
    Trainer(r, tmp_path / "run", show_progress=False).run()
    losses = [rec["loss"] for rec in train_records(tmp_path / "run")]
    assert len(losses) == 40
    assert losses[0] > 7.5  # ln(4096) = 8.32 at initialisation
    assert losses[-1] < 1.5, losses[-5:]


def test_metrics_schema_and_values(tmp_path):
    r = recipe("smoke-switch", data={"eval_sources": ["english", "code"]}, train={"steps": 4, "eval_every": 2})
    summary = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 8 * 32 and summary["skipped_steps"] == 0
    recs = records(tmp_path / "run")
    train = [x for x in recs if x.get("split") != "val"]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    from moecpt.train.schedules import lr_at

    for x in train:
        for key in ("step", "tokens", "lr", "loss", "aux_loss", "mri_mean", "tokens_per_s"):
            assert key in x, key
        assert x["tokens"] == x["step"] * 8 * 32
        assert x["lr"] == lr_at(x["step"] - 1, r.schedule, r.optim, r.train.steps)
        assert 0 < x["loss"] < 9 and math.isfinite(x["loss"])
        assert x["aux_loss"] > 0  # penalty router: weighted load-balancing + z-loss, reported apart
        assert 1 / 8 <= x["mri_mean"] <= 1  # top-1 of 8 experts
        assert x["tokens_per_s"] > 0
        assert len(x["mri_layers"]) == 2 and len(x["lb_loss_layers"]) == 2
    val = [x for x in recs if x.get("split") == "val"]
    assert {(x["step"], x["source"]) for x in val} == {(s, src) for s in (0, 2, 4) for src in ("english", "code")}
    assert all(math.isfinite(x["loss"]) for x in val)


def test_validation_loss_is_plain_cross_entropy(tmp_path):
    """A penalty MoE with a large aux weight: the logged val loss equals hand-computed CE on the val batches and
    differs from CE + aux."""
    from moecpt.data.mixture import val_batches
    from moecpt.data.prepared import PreparedData

    r = recipe("smoke-switch", model={"moe": {"router": {"aux_loss_weight": 1.0, "z_loss_weight": 0.1}}},
               train={"steps": 2, "eval_batches": 2, "checkpoint_every": 2})
    Trainer(r, tmp_path / "run", show_progress=False).run()
    logged = [x for x in records(tmp_path / "run") if x.get("split") == "val" and x["step"] == 2]
    assert len(logged) == 1 and logged[0]["source"] == "english"

    model = load_model(tmp_path / "run")
    batches = val_batches(PreparedData.open("demo"), "english", 32, 8, 2)
    assert len(batches) == 2
    ce_total, aux_total, n = 0.0, 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits, routing = model(b[:, :-1], return_routing=True)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
            ce_total += ce.item() * b.shape[0]
            aux_total += float(sum(o.weighted_aux_loss() for o in routing) / len(routing)) * b.shape[0]
            n += b.shape[0]
    ce_hand, aux_hand = ce_total / n, aux_total / n
    assert logged[0]["loss"] == pytest.approx(ce_hand, rel=1e-6, abs=1e-6)
    assert aux_hand > 1e-3  # so that "CE + aux" is measurably different
    assert abs(logged[0]["loss"] - (ce_hand + aux_hand)) > 1e-3


# ------------------------------------------------------------------------------------------- kill and resume
def _run_cmd(toml: Path, out: Path) -> list[str]:
    return moecpt_cmd("pretrain", "--recipe", str(toml), "--out", str(out), "--no-progress")


def _losses(run: Path) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in train_records(run)}


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    """An uninterrupted reference run (in this process) of the recipe the kill tests run as a command."""
    root = tmp_path_factory.mktemp("resume")
    raw = raw_recipe("smoke-granular", train={"steps": 10, "checkpoint_every": 2, "eval_every": 5})
    toml = write_toml(root / "r.toml", raw)
    Trainer(recipe_from_dict(raw), root / "ref", show_progress=False).run()
    return root, toml


def test_kill_and_resume_is_bit_identical(resume_setup):
    """SIGKILL the command after its first checkpoint, run the same command again: every step's loss (and every
    val loss) equals the uninterrupted run's exactly."""
    root, toml = resume_setup
    out = root / "killed"
    proc = subprocess.Popen(_run_cmd(toml, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints").is_dir() and any(p.name.startswith("step_") and "tmp" not in p.name
                                                  for p in (out / "checkpoints").iterdir()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    partial = _losses(out)
    assert len(partial) < 10

    res = subprocess.run(_run_cmd(toml, out), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["resumed"] is True and summary["steps"] == 10

    ref, got = _losses(root / "ref"), _losses(out)
    assert sorted(got) == list(range(1, 11))
    assert got == ref  # bit for bit (floats compared with ==)
    val = lambda run: [(x["step"], x["source"], x["loss"]) for x in records(run) if x.get("split") == "val"]
    assert val(out) == val(root / "ref")
    ck_ref, ck_got = load_checkpoint(root / "ref"), load_checkpoint(out)
    assert ck_ref.step == ck_got.step == 10
    a, b = ck_ref.model_state(), ck_got.model_state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_completed_run_does_nothing(resume_setup):
    root, _ = resume_setup
    run = root / "ref"

    def files():  # the lock file's note names its latest holder: it is rewritten by design
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*")
                if p.is_file() and p.name != LOCK_FILE}

    before = files()
    summary = Trainer(recipe_from_dict(raw_recipe("smoke-granular", train={
        "steps": 10, "checkpoint_every": 2, "eval_every": 5})), run, show_progress=False).run()
    assert summary["resumed"] is True and summary["steps"] == 10
    after = files()
    assert after.keys() == before.keys()
    assert all(after[p][1] == before[p][1] for p in before)  # same bytes (metrics.jsonl included)


_KILL_IN_SAVE = textwrap.dedent("""
    import os, signal, sys
    from moecpt.train import checkpoint
    real = checkpoint.fsync_file
    def fsync_then_die(path):
        real(path)
        if "step_00000006.tmp-" in str(path):  # model.safetensors of step 6 written, folder not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.fsync_file = fsync_then_die
    from moecpt.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_checkpoint_save_keeps_latest_intact(resume_setup):
    """SIGKILL inside the save of step 6 (after its weights were written, before the rename): the restart finds an
    intact step-4 checkpoint, removes the dead writer's temp folder and reproduces the reference run."""
    root, toml = resume_setup
    out = root / "killed-in-save"
    args = ["pretrain", "--recipe", str(toml), "--out", str(out), "--no-progress"]
    res = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr
    ckdir = out / "checkpoints"
    assert any(".tmp-" in p.name for p in ckdir.iterdir())  # the interrupted save
    assert not (ckdir / "step_00000006").exists()
    latest = load_checkpoint(out)  # verifies sizes and sha256 of every file
    assert latest.step == 4
    assert latest.meta["tokens"] == 4 * 8 * 32

    raw = raw_recipe("smoke-granular", train={"steps": 10, "checkpoint_every": 2, "eval_every": 5})
    trainer = Trainer(recipe_from_dict(raw), out, show_progress=False)
    assert trainer.ckpts.latest() == latest.path
    assert not any(".tmp-" in p.name for p in ckdir.iterdir())  # stale temp folder removed
    summary = trainer.run()
    assert summary["resumed"] is True
    assert _losses(out) == _losses(root / "ref")


# ------------------------------------------------------------------------------------------------ bias router
def test_bias_router_biases_change_and_are_checkpointed(tmp_path):
    # 5 steps, an odd number: a bias moved by +-0.01 every step cannot be back at exactly 0 (an oscillating
    # expert, over- then under-loaded, is back at 0 after any even number of updates)
    r = recipe("smoke-switch", model={"moe": {"router": {"kind": "bias", "bias_update_rate": 0.01}}},
               train={"steps": 5, "checkpoint_every": 2})
    Trainer(r, tmp_path / "run", show_progress=False).run()
    ck2, ck4 = (load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{s:08d}") for s in (4, 5))
    keys = [k for k in ck4.model_state() if k.endswith("expert_bias")]
    assert len(keys) == 2  # one per MoE layer
    assert any(not torch.equal(ck2.model_state()[k], ck4.model_state()[k]) for k in keys)
    for k in keys:
        b4 = ck4.model_state()[k]
        # sign updates of +-0.01 per step (0 only for an expert exactly at the mean load): after 5 steps every
        # bias is a multiple of 0.01 with |b| <= 0.05, and one that moved every step is an odd multiple
        assert torch.allclose(b4 * 100, (b4 * 100).round(), atol=1e-4) and b4.abs().max() <= 0.05 + 1e-6
        assert b4.abs().max() > 0
    rec = train_records(tmp_path / "run")
    assert all(x["aux_loss"] == 0.0 for x in rec)  # aux-loss-free: nothing but CE is optimised
    stds = [tuple(x["bias_std_layers"]) for x in rec]
    assert len(set(stds)) > 1 and all(s > 0 for s in stds[0])  # logged after every update, and they move
    model = load_model(tmp_path / "run")
    assert torch.equal(model.routers()[0].expert_bias, ck4.model_state()[keys[0]])


# ---------------------------------------------------------------------------------------------------- NaN / Inf
def test_huge_lr_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
    """lr = 1e6: the weights blow up after one update and the gradient of step 2 is NaN (its loss may still be
    finite). The trainer stops naming step 2 before writing NaN weights; checkpoint 1 is intact."""
    r = recipe("smoke-switch", optim={"lr": 1e6, "min_lr": 0.0}, schedule={"kind": "constant", "warmup_fraction": 0},
               train={"steps": 6, "checkpoint_every": 1})
    with pytest.raises(MoecptError, match=r"non-finite .* at step [23]\b") as info:
        Trainer(r, tmp_path / "run", show_progress=False).run()
    # which step overflows first depends on the kernels' summation order; the rule does not: the run stops
    # at the first non-finite step and the checkpoint before it is the last one, intact
    bad = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    assert f"step_{bad - 1:08d}" in str(info.value)
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == bad - 1
    assert all(torch.isfinite(t).all() for t in ck.model_state().values())
    assert not (tmp_path / "run" / "checkpoints" / f"step_{bad:08d}").exists()


def _nan_at(monkeypatch, bad_steps: set[int]):
    """Make the training loss NaN at the given 1-based optimizer steps (evaluation untouched)."""
    calls = {"n": 0}

    def loss(logits, targets):
        out = lm_loss(logits, targets)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in bad_steps:
                return out * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "lm_loss", loss)


def test_nan_loss_stops_naming_the_step(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {5})
    r = recipe("smoke-switch", train={"steps": 8, "checkpoint_every": 2})
    with pytest.raises(MoecptError, match=r"non-finite loss .* at step 5;.*step_00000004"):
        Trainer(r, tmp_path / "run", show_progress=False).run()
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 4
    assert all(torch.isfinite(t).all() for t in ck.model_state().values())
    assert [x["step"] for x in train_records(tmp_path / "run")] == [1, 2, 3, 4]


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {3, 6})  # step 6 is the last: the run must still end with its final checkpoint
    r = recipe("smoke-switch", train={"steps": 6, "checkpoint_every": 2, "skip_nonfinite": True})
    summary = Trainer(r, tmp_path / "run", show_progress=False).run()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    events = [x for x in records(tmp_path / "run") if x.get("event") == "skipped_nonfinite"]
    assert [e["step"] for e in events] == [3, 6] and all(math.isnan(e["loss"]) for e in events)
    assert [x["step"] for x in train_records(tmp_path / "run")] == [1, 2, 4, 5]
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 6 and ck.meta["skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in ck.model_state().values())
    # AdamW took 4 steps, not 6
    opt = ck.optimizer_state()
    assert {float(s["step"]) for s in opt["state"].values()} == {4.0}


def test_too_many_nonfinite_steps_stop(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2, 3})
    r = recipe("smoke-switch", train={"steps": 4, "checkpoint_every": 1, "skip_nonfinite": True, "max_skips": 1})
    with pytest.raises(MoecptError, match=r"at step 3;"):
        Trainer(r, tmp_path / "run", show_progress=False).run()
    assert load_checkpoint(tmp_path / "run").step == 2
