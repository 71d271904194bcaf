"""What people compare runs by: micro-batch-independent validation, per-step MFU / peak memory / tokens per source,
the resolved configuration, ``--dry-run``, and step metrics that declare their cross-rank reduction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moecpt.cli import main as cli_main
from moecpt.config import recipe_from_dict
from moecpt.errors import MoecptError
from moecpt.model.flops import model_stats
from moecpt.train.callbacks import CallbackList
from moecpt.train.parallel import SingleSync, DistInfo
from moecpt.train.trainer import Trainer

from test_trainer import train_records, write_toml
from tiny_recipes import raw_recipe


def _val_loss(tmp_path, model, micro: int | None) -> float:
    raw = raw_recipe("smoke-granular", train={"eval_batches": 2, "micro_batch_size": micro})
    r = recipe_from_dict(raw)
    tr = Trainer(r, tmp_path / f"eval-{micro}", show_progress=False)
    try:
        state = SimpleNamespace(model=model, evals=tr._make_evals(), tokens=0, callbacks=CallbackList([]),
                                sync=SingleSync(r, DistInfo(), 1, 1, torch.device("cpu")))
        return tr._evaluate(state, 0)["english"]
    finally:
        tr.release()


def test_validation_loss_does_not_depend_on_micro_batching(tmp_path):
    from moecpt.model.transformer import build_model

    torch.manual_seed(0)
    tr = Trainer(recipe_from_dict(raw_recipe("smoke-granular")), tmp_path / "cfg", show_progress=False)
    tr.release()
    model = build_model(tr.model_cfg)
    losses = [_val_loss(tmp_path, model, m) for m in (1, 2, 4, None)]
    assert max(losses) - min(losses) <= 1e-6, losses


# ----------------------------------------------------------------------------------------- per-step figures
def test_train_records_carry_mfu_peak_memory_and_tokens_per_source(tmp_path):
    from moecpt.train.perf import measured_matmul_flops

    raw = raw_recipe("smoke-granular", steps=3, data={"mixture": {"english": 0.5, "code": 0.5}})
    tr = Trainer(recipe_from_dict(raw), tmp_path / "run", show_progress=False)
    tr.run()
    train = train_records(tmp_path / "run")
    assert [r["step"] for r in train] == [1, 2, 3]
    peak = measured_matmul_flops(torch.float32, torch.get_num_threads())
    flops_per_token = model_stats(tr.model_cfg, 32)["train_flops_per_token"]
    for r in train:
        # CPU MFU is relative to the measured matmul peak: recompute it from the record's own throughput
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token / peak, rel=1e-9)
        assert 0 < r["mfu"] < 1
        assert 10e6 < r["peak_memory_bytes"] < 64e9  # a real RSS of this process, in bytes
        assert set(r["tokens_per_source"]) == {"english", "code"}
        assert sum(r["tokens_per_source"].values()) == r["tokens"]
        assert all(v > 0 for v in r["tokens_per_source"].values())
    assert train[0]["peak_memory_bytes"] <= train[-1]["peak_memory_bytes"]  # a peak never falls


def test_mfu_is_unknown_rather_than_made_up():
    from moecpt.train.perf import cuda_peak_flops, device_peak_flops, mfu

    assert cuda_peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
    assert cuda_peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert cuda_peak_flops("NVIDIA H200 NVL") == 835.5e12
    assert cuda_peak_flops("NVIDIA H200") == 989.5e12
    assert cuda_peak_flops("NVIDIA A100-SXM4-80GB") == cuda_peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert cuda_peak_flops("Tesla T4") is None
    assert device_peak_flops(torch.device("cuda"), bf16=False) is None  # the table is bf16-only: fp32 has none
    assert device_peak_flops(torch.device("mps"), bf16=False) is None
    assert mfu(6e6, 1000.0, None) is None and mfu(6e6, None, 1e12) is None
    assert mfu(6e6, 1000.0, 1e12, devices=2) == pytest.approx(3e-3)


def test_flat_scalars_give_one_tag_per_source():
    from moecpt.train.metrics import flat_scalars

    tags = flat_scalars({"step": 3, "loss": 1.0, "mfu": None, "tokens_per_source": {"a": 64, "b": 32}})
    assert tags == {"train/loss": 1.0, "train/tokens_per_source/a": 64.0, "train/tokens_per_source/b": 32.0}


# ------------------------------------------------------------------------------ resolved config and --dry-run
def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_dry_run_prints_the_plan_and_leaves_no_folder(tmp_path, capsys):
    recipe = write_toml(tmp_path / "r.toml", raw_recipe("smoke-granular", steps=5))
    out = tmp_path / "nested" / "run"
    argv = ["pretrain", "--recipe", str(recipe), "--out", str(out), "--dry-run", "--set", "train.batch_size=4"]
    assert cli_main(argv) == 0
    assert not out.exists() and not out.parent.exists()  # neither created nor claimed
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] is True and plan["resumes_from_step"] is None
    assert 0 < plan["params"]["active"] < plan["params"]["total"]  # an MoE: top-k of the experts are active
    mem = plan["memory_bytes"]
    assert mem["weights"] == mem["grads"] == 4 * plan["params"]["total"]
    assert mem["optimizer_state"] == 8 * plan["params"]["total"]  # AdamW's two fp32 moments
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total") and mem["activations"] > 0
    assert plan["steps"] == {"start": 0, "end": 5, "left": 5}
    assert plan["tokens"]["total"] == 5 * 4 * 32 == sum(plan["tokens"]["per_source"].values())
    assert plan["timing"]["timed_steps"] == 2 and plan["timing"]["step_time_s"] > 0  # 3 timed, the warm-up dropped
    assert plan["timing"]["estimated_time_s"] == pytest.approx(5 * plan["timing"]["step_time_s"])
    assert "train.batch_size=4" in plan["config"]  # the --set override, resolved


def test_dry_run_of_an_existing_run_changes_nothing_and_a_start_saves_the_resolved_config(tmp_path, capsys):
    recipe = write_toml(tmp_path / "r.toml", raw_recipe("smoke-granular", steps=2, checkpoint_every=1))
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--recipe", str(recipe), "--out", str(out), "--progress", "lines"]) == 0
    err = capsys.readouterr().err
    assert "moecpt: config: " in err and "train.steps=2" in err and "model.moe.top_k=" in err  # at start, compact
    saved = json.loads((out / "config.json").read_text())
    assert saved["recipe"]["train"]["steps"] == 2 and saved["model"]["vocab_size"] == 4096
    before = _snapshot(out)
    assert cli_main(["pretrain", "--recipe", str(recipe), "--out", str(out), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["resumes_from_step"] == 2 and plan["steps"]["left"] == 0
    assert _snapshot(out) == before  # no lock, no marker, no log line
    with pytest.raises(MoecptError, match="holds another run"):
        Trainer(recipe_from_dict(raw_recipe("smoke-granular", steps=3)), out, show_progress=False, dry_run=True)
    cpt = tmp_path / "cpt"
    assert cli_main(["cpt", "--recipe", str(recipe), "--from", str(out), "--out", str(cpt), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["mode"] == "cpt" and plan["steps"]["left"] == 2 and not cpt.exists()
    assert _snapshot(out) == before


# ------------------------------------------------------------------------------------- declared reductions
def _declared(rank: int) -> dict:
    from moecpt.train.reduce import Metric, ReduceType as R

    return {"loss": Metric(1.0 + rank, R.MEAN), "counts": Metric(torch.tensor([rank, 10.0]), R.SUM),
            "peak": Metric(100 * (rank + 1), R.MAX), "low": Metric(torch.tensor([5.0 - rank, rank]), R.MIN)}


EXPECTED = {"loss": [1.5], "counts": [1.0, 20.0], "peak": [200.0], "low": [4.0, 0.0]}

_RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from moecpt.distributed.accounting import CommAccountant, ProcessComm
from moecpt.train.reduce import reduce_metrics
from test_observability import _declared
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
comm = ProcessComm(CommAccountant(2))
out = reduce_metrics([_declared(rank)], lambda flats, op: comm.all_reduce(flats, "stats", op), 2)
print(json.dumps({**{k: v.tolist() for k, v in out.items()}, "collectives": comm.acct.kinds["stats"]["collectives"]}))
dist.destroy_process_group()
"""


def test_declared_reductions_in_process():
    from moecpt.distributed.accounting import CommAccountant
    from moecpt.distributed.simulate import SimComm
    from moecpt.train.reduce import Metric, ReduceType, reduce_metrics

    comm = SimComm(CommAccountant(2))
    out = reduce_metrics([_declared(0), _declared(1)], lambda flats, op: comm.all_reduce(flats, "stats", op), 2)
    assert {k: v.tolist() for k, v in out.items()} == EXPECTED
    assert comm.acct.kinds["stats"]["collectives"] == 2  # one SUM (mean + sum), one MAX (max + negated min)
    only_sums = reduce_metrics([{"a": Metric(1.0, ReduceType.SUM)}] * 2,
                               lambda flats, op: comm.all_reduce(flats, "stats", op), 2)
    assert only_sums["a"].tolist() == [2.0] and comm.acct.kinds["stats"]["collectives"] == 3  # no MAX for none
    with pytest.raises(ValueError, match="different step metrics"):
        reduce_metrics([{"a": Metric(1.0, ReduceType.SUM)}, {"a": Metric(1.0, ReduceType.MAX)}],
                       lambda flats, op: comm.all_reduce(flats, "stats", op), 2)


def test_declared_reductions_on_two_gloo_processes(tmp_path):
    store = f"file://{tmp_path / 'store'}"
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), store, tests], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    for so, _ in outs:  # every rank gets the same reduced values, in two collectives
        assert json.loads(so) == {**EXPECTED, "collectives": 2}


def test_a_long_metrics_record_reaches_the_file_in_one_write(tmp_path):
    """A record longer than a text buffer (per-layer vectors of a deep MoE) goes out in one write, so a reader
    polling ``metrics.jsonl`` never sees half of it; a resume drops a line torn by a kill."""
    from moecpt.train.metrics import JsonlSink

    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.write({"step": 0, "loss": 1.0})
    sizes: list[int] = []

    class Spy:  # the sink's file, counting its writes
        def __init__(self, fh):
            self.fh = fh

        def write(self, b):
            sizes.append(len(b))
            return self.fh.write(b)

        def close(self):
            self.fh.close()

    sink._fh = Spy(sink._fh)
    rec = {"step": 1, "tokens_per_expert_layers": [[float(i)] * 64 for i in range(64)]}
    sink.write(rec)
    sink.close()
    assert len(sizes) == 1 and sizes[0] > 2 * 8192
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "loss": 0.')  # torn by a kill
    sink.truncate_after(5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1] and json.loads(lines[1]) == rec
