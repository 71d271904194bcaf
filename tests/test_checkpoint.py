"""Checkpoints: round trip, atomicity under a kill, corruption detection, retention, weights_only loading."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from moecpt.errors import MoecptError
from moecpt.train import checkpoint as ck
from moecpt.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    write_bytes_atomic,
    write_json_atomic,
)

class Tiny(nn.Module):
    """Tied embedding / head and a persistent buffer, like an MoE with bias balancing."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("expert_bias", torch.zeros(4))

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.emb(x))))


def trained(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.arange(5)).sum().backward()
    opt.step()
    model.expert_bias += torch.tensor([0.1, -0.2, 0.3, 0.0])
    return model, opt


def save_step(mgr: CheckpointManager, step: int, model: nn.Module, opt=None):
    return mgr.save(
        step,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict() if opt else None,
        rng_state=capture_rng_state(),
        meta={"lineage": ["pretrain"], "data_state": {"english": 3}},
    )


# --------------------------------------------------------------------------------------------------- round trip
def test_round_trip_model_optimizer_rng_meta(tmp_path):
    model, opt = trained()
    mgr = CheckpointManager(tmp_path / "run")
    path = mgr.save(
        7,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        rng_state=capture_rng_state(),
        meta={"config": {"lr": 1e-2}, "out": tmp_path / "x", "metrics": {"loss": np.float32(1.5)}},
    )
    assert path == tmp_path / "run" / "checkpoints" / "step_00000007"
    assert sorted(os.listdir(path)) == ["meta.json", "model.safetensors", "optimizer.pt", "rng.pt"]

    ckpt = load_checkpoint(tmp_path / "run")  # run folder -> latest
    assert ckpt.path == path and ckpt.step == 7
    assert ckpt.meta["config"] == {"lr": 1e-2} and ckpt.meta["out"] == str(tmp_path / "x")
    assert ckpt.meta["metrics"]["loss"] == 1.5 and "_checkpoint" not in ckpt.meta
    assert ckpt.manifest["aliases"] == {"head.weight": "emb.weight"}  # tied weight stored once

    state = ckpt.model_state()
    assert set(state) == set(model.state_dict())
    assert state["head.weight"] is state["emb.weight"]
    fresh, fresh_opt = Tiny(), None
    fresh.load_state_dict(state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.head.weight is fresh.emb.weight  # tying survives load_state_dict

    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    fresh_opt.load_state_dict(ckpt.optimizer_state())
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[key], b[key])

    # the .pt files load with weights_only=True outside our code too
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "rng.pt", weights_only=True)


def test_rng_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss_next in python's state
    np.random.standard_normal()  # and a cached gaussian in numpy's
    state = capture_rng_state()
    save_checkpoint(tmp_path / "step_00000001", model_state={"w": torch.ones(2)}, meta={}, rng_state=state)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "step_00000001").rng_state())
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]
    assert torch.equal(got[4], expected[4])


def test_views_non_contiguous_and_dtypes(tmp_path):
    big = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "col": big[:, :2],  # non-contiguous view
        "row": big[1],  # contiguous view into a shared storage
        "full": big,
        "same": big,  # alias of "full"
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "empty": torch.zeros(0),
        "flag": torch.tensor([True, False]),
    }
    save_checkpoint(tmp_path / "c", model_state=state, meta={"step": 3})
    got = load_checkpoint(tmp_path / "c").model_state()
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert got["same"] is got["full"]


# --------------------------------------------------------------------------------------------------- atomicity
def test_failure_during_save_keeps_previous(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    model, opt = trained()
    first = save_step(mgr, 1, model, opt)

    def boom(*a, **k):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(ck, "fsync_dir", boom)  # fails after all files were written, before the rename
    with pytest.raises(RuntimeError, match="disk went away"):
        save_step(mgr, 2, model, opt)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001"]  # temp folder removed
    assert mgr.latest() == first
    assert load_checkpoint(tmp_path).step == 1


def _save_then_sigkill(run: Path, where: str) -> int:
    """Fork (torch is already imported, so no interpreter start-up); the child starts saving step 2 and is
    SIGKILLed at ``where``. Returns the child's exit code."""
    pid = os.fork()
    if pid == 0:  # child: must never return into pytest
        try:
            def die(*a, **k):
                os.kill(os.getpid(), signal.SIGKILL)

            if where == "rename":  # every file written and fsynced, killed right before the rename
                os.rename = die
            else:  # killed in the middle of writing optimizer.pt

                def half_write(obj, f):
                    f.write(b"PK\x03\x04 half a zip")
                    f.flush()
                    die()

                torch.save = half_write
            CheckpointManager(run).save(2, model_state={"w": torch.ones(1000)}, meta={},
                                        optimizer_state={"state": {}, "param_groups": []})
        finally:
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("where", ["rename", "mid-write"])
def test_sigkill_mid_save_keeps_previous(tmp_path, where):
    w1 = torch.arange(1000, dtype=torch.float32)
    CheckpointManager(tmp_path).save(1, model_state={"w": w1}, meta={})
    assert _save_then_sigkill(tmp_path, where) == -signal.SIGKILL
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names[0] == "step_00000001" and len(names) == 2 and names[1].startswith("step_00000002.tmp-")
    with pytest.raises(MoecptError, match="interrupted save"):
        load_checkpoint(tmp_path / "checkpoints" / names[1])
    ckpt = load_checkpoint(tmp_path)  # the run folder resolves to the intact previous checkpoint
    assert ckpt.step == 1 and torch.equal(ckpt.model_state()["w"], w1)
    mgr = CheckpointManager(tmp_path)
    assert mgr.latest() == tmp_path / "checkpoints" / "step_00000001"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001"]  # dead writer's temp removed


def test_live_writers_temp_is_not_removed(tmp_path):
    tmp = tmp_path / "checkpoints" / f"step_00000003.tmp-{os.getpid()}-abcd"
    tmp.mkdir(parents=True)
    assert CheckpointManager(tmp_path).latest() is None
    assert tmp.exists()


def test_write_atomic_helpers(tmp_path, monkeypatch):
    f = tmp_path / "sub" / "run.json"
    write_json_atomic(f, {"a": 1, "p": tmp_path})
    assert json.loads(f.read_text()) == {"a": 1, "p": str(tmp_path)}
    write_bytes_atomic(f, b'{"a": 2}')
    assert json.loads(f.read_text()) == {"a": 2}

    def boom(*a):
        raise OSError("no")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json_atomic(f, {"a": 3})
    monkeypatch.undo()
    assert json.loads(f.read_text()) == {"a": 2}
    assert os.listdir(f.parent) == ["run.json"]  # no temp file left


# ---------------------------------------------------------------------------------------- damage detection
def _two_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model, opt = trained()
    save_step(mgr, 1, model, opt)
    return mgr, save_step(mgr, 2, model, opt)


def test_truncated_model_file(tmp_path):
    mgr, last = _two_checkpoints(tmp_path)
    f = last / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(MoecptError, match=r"model\.safetensors is truncated"):
        load_checkpoint(last)
    # a reader never falls back to an older checkpoint behind the user's back: it refuses, naming both
    assert mgr.latest() == tmp_path / "checkpoints" / "step_00000001"
    with pytest.raises(MoecptError, match=r"newest checkpoint .*step_00000002, is incomplete or damaged.*"
                                          r"step_00000001 explicitly"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000001").step == 1


def test_bit_flip_in_a_run_folder_is_refused_with_advice(tmp_path):
    _, last = _two_checkpoints(tmp_path)
    f = last / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(MoecptError, match=r"optimizer\.pt is corrupted.*re-run the training command"):
        load_checkpoint(tmp_path)


def test_corrupted_bytes(tmp_path):
    _, last = _two_checkpoints(tmp_path)
    f = last / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    with pytest.raises(MoecptError, match="corrupted"):
        load_checkpoint(last)
    # without hashing, a damaged header is still reported as a one-line MoecptError when read
    data[:8] = b"\xff" * 8
    f.write_bytes(bytes(data))
    ckpt = load_checkpoint(last, verify=False)
    with pytest.raises(MoecptError, match="unreadable") as exc:
        ckpt.model_state()
    assert "\n" not in str(exc.value)


def test_corrupted_meta_and_not_a_checkpoint(tmp_path):
    _, last = _two_checkpoints(tmp_path)
    (last / "meta.json").write_text("{not json")
    with pytest.raises(MoecptError, match="meta.json is corrupted"):
        load_checkpoint(last)
    with pytest.raises(MoecptError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoecptError, match="not a moecpt checkpoint or run folder"):
        load_checkpoint(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text('{"step": 3}')
    with pytest.raises(MoecptError, match="not a moecpt checkpoint"):
        load_checkpoint(other)


# ------------------------------------------------------------------------------------------- retention, overwrite
def test_keep_last_and_milestones(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_steps=[3])
    model = Tiny()
    for step in range(1, 7):
        save_step(mgr, step, model)
    assert [p.name for p in mgr.all()] == ["step_00000003", "step_00000005", "step_00000006"]
    assert mgr.latest().name == "step_00000006"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [p.name for p in mgr.all()]


def test_refuses_to_overwrite(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model, opt = trained()
    kwargs = dict(optimizer_state=opt.state_dict(), rng_state=capture_rng_state(), meta={"a": 1})
    path = mgr.save(4, model_state=model.state_dict(), **kwargs)
    # the very same tensors again (a resumed run re-saving its step): accepted, nothing rewritten
    for _ in range(5):
        assert mgr.save(4, model_state=model.state_dict(), **kwargs) == path
    other = Tiny()
    with pytest.raises(MoecptError, match="already exists with different contents"):
        mgr.save(4, model_state=other.state_dict(), meta={"a": 1})
    assert torch.equal(load_checkpoint(path).model_state()["mid.weight"], model.mid.weight)
    junk = tmp_path / "checkpoints" / "step_00000009"
    junk.mkdir()
    with pytest.raises(MoecptError, match="not a valid checkpoint"):
        mgr.save(9, model_state=model.state_dict(), meta={})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name] == []


# ------------------------------------------------------------------------------------------------- weights_only
def test_unsafe_states_rejected_at_save_and_load(tmp_path):
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path / "step_00000001", model_state={"w": torch.ones(1)}, meta={},
                        optimizer_state={"state": {}, "lr": np.float64(1.0)})
    with pytest.raises(TypeError, match="not a tensor"):
        save_checkpoint(tmp_path / "step_00000001", model_state={"w": [1.0]}, meta={})
    assert not (tmp_path / "step_00000001").exists()

    # an optimizer.pt holding a pickled arbitrary object is refused by weights_only loading
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"obj": Tiny}, d / "optimizer.pt")
    with pytest.raises(MoecptError, match="cannot be loaded safely"):
        Checkpoint(path=d, step=0, meta={}).optimizer_state()
    assert Checkpoint(path=d, step=0, meta={}).rng_state() is None
