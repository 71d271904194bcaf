"""Expert parallelism on CPU / gloo, one launch per world size checking many cases.

* 2 and 4 ranks (``tests/ep_worker.py``): EP = 2 and 4, and at 4 ranks EP = 2 (a 2 x 2 DP x EP mesh, a subset of
  the cases), against the single process on the global batch, for Switch, Granular + shared expert (grouped and
  padded layouts), penalty, Sinkhorn, bias (sigmoid) routers, a capacity factor, every token sent to one rank's
  single expert (the other experts, and the other ranks, get none) and activation checkpointing: logits, loss,
  every gradient, the global norm, the summed bias loads, the all-to-all bytes, one AdamW step and the gathered
  checkpoint.
* ``moecpt pretrain`` with EP = 2 (2 micro-batches per rank) launched as torchrun launches it: a rank killed mid-run
  stops the other in bounded time with the one-line message; the same command resumes from the intact checkpoint
  to the weights of one process on the combined batch; the all-to-all bytes are in metrics.jsonl apart from the
  gradient all-reduce; ``moecpt eval`` reads the single-file checkpoint (``checkpoint_format = "single"``; DCP under
  EP: ``tests/test_ep_dcp.py``).
* The CLI refuses, in one line and before the run folder exists: EP on a dense model, EP that does not divide the
  experts, EP with FSDP, with the loop dispatch, in a single process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from test_distributed import assert_close, finish, kill_rank1_and_check_the_stop, launch, weights
from test_trainer import raw_recipe, records, write_toml

from moecpt.cli import main as cli_main
from moecpt.config import recipe_from_dict
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.trainer import Trainer

WORKER = Path(__file__).resolve().parent / "ep_worker.py"
ROOT = Path(__file__).resolve().parent.parent
N_CASES, N_MESH_CASES = 9, 4  # CASES and MESH_CASES in ep_worker.py


def _run_worker(tmp: Path, world: int, ep_sizes: str) -> list[str]:
    store = tmp / f"store-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([sys.executable, str(WORKER)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world),
                                              "MOECPT_INIT_METHOD": f"file://{store}", "EP_SIZES": ep_sizes,
                                              "OMP_NUM_THREADS": "1"})
             for r in range(world)]
    outs = []
    for rank, (rc, out, err) in enumerate(finish(procs, timeout=240)):
        assert rc == 0, f"rank {rank} failed:\n{err[-4000:]}"
        outs.append(out)
    return outs


@pytest.mark.parametrize("world, ep_sizes, cases", [(2, "2", N_CASES), (4, "4,2", N_CASES + N_MESH_CASES)])
def test_ep_equals_the_single_process(tmp_path, world, ep_sizes, cases):
    for out in _run_worker(tmp_path, world, ep_sizes):
        assert len([x for x in out.splitlines() if x.startswith("ok ")]) == cases, out


# the single-file layout (rank 0 gathers the experts); the DCP layout, EP's default, is tests/test_ep_dcp.py's
EP_SETS = ["distributed.expert_parallel=2", "distributed.inner_optimizer=sgd", "distributed.timeout_s=30",
           "train.checkpoint_format=single"]
STEPS = 10


def test_pretrain_with_ep_survives_a_killed_rank_resumes_and_evaluates(tmp_path, capsys):
    raw = raw_recipe("smoke-switch", optim={"lr": 0.05, "min_lr": 0.005},
                     train={"steps": STEPS, "checkpoint_every": 4, "eval_every": 5, "log_every": 1,
                            "micro_batch_size": 2})  # 2 micro-batches per rank: DDP's no_sync, experts accumulate
    recipe = write_toml(tmp_path / "ep.toml", raw)
    out = tmp_path / "ep"
    kill_rank1_and_check_the_stop(launch(tmp_path, recipe, out, EP_SETS), out, step=6)  # after the step-4 save
    assert 4 <= load_checkpoint(out).step < STEPS  # verified: intact

    for rank, (rc, _, err) in enumerate(finish(launch(tmp_path, recipe, out, EP_SETS))):
        assert rc == 0, f"resumed rank {rank} failed:\n{err[-3000:]}"
    ck = load_checkpoint(out)
    assert ck.step == STEPS and ck.meta["expert_parallel"] == 2 and not ck.sharded
    assert ck.model_state()["blocks.0.ffn.experts.w_in"].shape[0] == 8  # the single-file format: every expert
    # = one process on the combined batch in the same micro-batches (the aux loss is per micro-batch)
    single = recipe_from_dict(raw, ["distributed.inner_optimizer=sgd"])
    Trainer(single, tmp_path / "single", show_progress=False).run()
    assert_close(weights(out), weights(tmp_path / "single"), atol=2e-5)
    train = [r for r in records(out) if "lr" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["a2a_bytes_step"] > 0 and r["a2a_bytes"] < r["comm_bytes"] for r in train)
    (summary,) = [r for r in records(out) if r.get("event") == "comm_summary"]
    assert summary["expert_parallel"] == 2 and {"all_to_all", "grads"} <= set(summary["by_kind"])

    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(out), "--batches", "1", "--batch-size", "4", "--json"]) == 0
    assert "loss" in capsys.readouterr().out


@pytest.mark.parametrize("sets, message", [
    (["distributed.expert_parallel=2"], "but this is one process; launch a multiple of 2 ranks with torchrun"),
    (["distributed.expert_parallel=3"], "distributed.expert_parallel=3 does not divide the model's 8 routed experts"),
    (["distributed.expert_parallel=2", "distributed.sync=local-sgd"], "runs with sync = 'ddp' or 'fsdp'"),
    (["distributed.expert_parallel=2", "model.moe.dispatch=loop"], "use 'grouped' with distributed.expert_parallel"),
    (["distributed.expert_parallel=2", "model.preset=smoke-dense"], "needs an MoE model"),
])
def test_cli_refuses_ep_in_one_line(tmp_path, capsys, sets, message):
    recipe = write_toml(tmp_path / "r.toml", raw_recipe("smoke-switch"))
    argv = ["pretrain", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--no-progress",
            *[a for s in sets for a in ("--set", s)]]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
