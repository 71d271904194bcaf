"""Expert parallelism × FSDP2 (moecpt.distributed.ep_fsdp): ``sync = "fsdp"`` with ``expert_parallel = 2``, gloo on
CPU, launched as torchrun launches ``python -m moecpt pretrain``, against EP × DDP (ExpertParallelSync).

One module fixture runs every job once, two launches side by side each time (a busy 2-core box starts processes
slowly; they then overlap their start-up):

1. EP 2 × DDP and EP 2 × FSDP2 on 4 ranks (a 2 × 2 DP × EP mesh: every expert shard on two ranks, the non-expert
   parameters in 4 FSDP2 shards), DCP checkpoints every 3 steps; the FSDP2 job's rank 1 is killed once step 4 is
   logged (past the step-3 checkpoint);
2. the FSDP2 job's command again (it resumes from step 3 and must log step 4 exactly as before the kill), and, side
   by side, a copy of its step-3 state resumed on 2 ranks (world 4 -> 2: FSDP2 shards 4 -> 2, expert replicas
   2 -> 1) writing the single-file format (rank 0 gathers both kinds of shard).
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from island_helpers import logged
from island_helpers import losses_by_step as losses
from test_dcp_checkpoint import max_diff, run_ok, step_dir
from test_distributed import finish, launch
from test_trainer import records, write_toml
from tiny_recipes import raw_recipe

from moecpt.config import recipe_from_dict
from moecpt.distributed.runtime import check_launch
from moecpt.errors import MoecptError
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.dcp_io import SafeReader
from moecpt.train.parallel import DistInfo

STEPS, EVERY, EXPERTS, TIMEOUT_S = 6, 3, 8, 30  # smoke-switch: 8 routed experts
RAW = raw_recipe("smoke-switch", steps=STEPS, checkpoint_every=EVERY,
                 train={"micro_batch_size": 2, "log_every": 1}, distributed={"timeout_s": TIMEOUT_S})
EP, FSDP = ["distributed.expert_parallel=2"], ["distributed.expert_parallel=2", "distributed.sync=fsdp"]
W_IN = "blocks.0.ffn.experts.w_in"
#: EP × FSDP2 against EP × DDP: the same gradients reduced in another order (FSDP2's reduce-scatter, the global norm
#: summed from shards). Measured on 4 ranks: losses 2.4e-7 apart, weights after 6 steps 1.3e-7, grad norms 2.5e-5
#: relative (torch's fp32 vector_norm of the 262k-element embedding gradient, whole or in shards)
TOL, NORM_RTOL = 1e-5, 1e-4


def grad_norms(run: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in records(run) if "lr" in r}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks
    tmp = tmp_path_factory.mktemp("epfsdp")
    recipe = write_toml(tmp / "r.toml", RAW)
    t0 = time.time()
    ddp, fsdp, reshard = tmp / "ddp", tmp / "fsdp", tmp / "reshard"
    ref, procs = launch(tmp, recipe, ddp, EP, world=4), launch(tmp, recipe, fsdp, FSDP, world=4)
    deadline = time.time() + 600
    while time.time() < deadline and not logged(fsdp, EVERY + 1) and procs[0].poll() is None:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    stopped = finish(procs, timeout=60)
    stopped_after = time.time() - t_kill
    before = {"losses": losses(fsdp), "grad_norms": grad_norms(fsdp), "checkpoint": load_checkpoint(fsdp).step}
    run_ok(finish(ref, timeout=600))
    shutil.copytree(fsdp, reshard)
    again = launch(tmp, recipe, fsdp, FSDP, world=4)  # the same command
    run_ok(finish(launch(tmp, recipe, reshard, [*FSDP, "train.checkpoint_format=single"], world=2), timeout=600))
    run_ok(finish(again, timeout=600))
    torch.set_num_threads(n)
    return {"ddp": ddp, "fsdp": fsdp, "reshard": reshard, "stopped": stopped, "stopped_after": stopped_after,
            "before": before, "wall_s": time.time() - t0}


def test_ep_fsdp_equals_ep_ddp_on_the_same_global_batch(jobs):
    ddp, fsdp = jobs["ddp"], jobs["fsdp"]
    ld, lf = losses(ddp), losses(fsdp)
    assert sorted(lf) == list(range(1, STEPS + 1))  # killed after step 4, resumed from step 3: no duplicates
    assert all(abs(lf[s] - ld[s]) <= TOL for s in ld), (lf, ld)
    gd, gf = grad_norms(ddp), grad_norms(fsdp)
    assert all(abs(gf[s] - gd[s]) <= NORM_RTOL * gd[s] for s in gd), (gf, gd)
    assert max_diff(fsdp, ddp) <= TOL  # every weight (experts, non-experts) after 6 AdamW steps
    ck = load_checkpoint(fsdp)
    assert ck.sharded and ck.meta["sync"] == "fsdp" and ck.meta["expert_parallel"] == 2
    assert ck.model_state()[W_IN].shape[0] == EXPERTS  # the global tensor
    (summary,) = [r for r in records(fsdp) if r.get("event") == "comm_summary"]
    assert {"all_to_all", "expert_grads", "fsdp"} <= set(summary["by_kind"])  # the 2 x 2 mesh: expert-DP reduce
    md = SafeReader(str(step_dir(fsdp, STEPS) / "dcp")).read_metadata().state_dict_metadata
    # each expert shard (on 2 ranks) written once; the non-expert tensors as FSDP2's 4 shards
    assert len(md[f"model.{W_IN}"].chunks) == 2 and len(md["model.tok_emb.weight"].chunks) == 4


def test_a_killed_rank_stops_the_others_and_the_resume_continues_exactly(jobs):
    stopped, fsdp, before = jobs["stopped"], jobs["fsdp"], jobs["before"]
    assert stopped[1][0] == -signal.SIGKILL, "the job finished before rank 1 could be killed"
    for rank, (rc, _, err) in enumerate(stopped):
        if rank != 1:
            assert rc == 2, f"rank {rank} should stop with a one-line error, got {rc}:\n{err[-2000:]}"
            assert "run the same command again" in err.strip().splitlines()[-1], err[-2000:]
    assert "rank 1 stopped responding" in stopped[0][2], stopped[0][2][-2000:]
    assert jobs["stopped_after"] < TIMEOUT_S + 15
    assert before["checkpoint"] == EVERY  # killed between the checkpoints of steps 3 and 6
    # resumed from the step-3 DCP checkpoint: the steps logged before the kill again, bit for bit
    after_losses, after_norms = losses(fsdp), grad_norms(fsdp)
    assert before["losses"] and all(after_losses[s] == v for s, v in before["losses"].items())
    assert all(after_norms[s] == v for s, v in before["grad_norms"].items())


def test_a_resharded_resume_writes_the_gathered_single_file(jobs):
    reshard, ddp = jobs["reshard"], jobs["ddp"]
    # world 4 -> 2 from DCP (FSDP2 shards 4 -> 2, expert replicas 2 -> 1): the same run, reduction order apart
    assert load_checkpoint(reshard).step == STEPS and max_diff(reshard, ddp) <= TOL
    lr, ld = losses(reshard), losses(ddp)
    assert all(abs(lr[s] - ld[s]) <= TOL for s in range(EVERY + 1, STEPS + 1))
    ck = load_checkpoint(reshard)  # rank 0 gathered FSDP2's full state and its EP group's experts
    assert not ck.sharded and ck.model_state()[W_IN].shape[0] == EXPERTS
    opt = ck.optimizer_state()
    exp_avg = [e["exp_avg"] for e in opt["state"].values() if e["exp_avg"].dim() == 3]
    assert len(exp_avg) == 4 and all(m.shape[0] == EXPERTS for m in exp_avg)  # w_in, w_out of 2 layers
    # the layout of every other sync's optimizer state (EP x DDP's, read from its DCP checkpoint): same entries,
    # same global shapes, same param groups
    ref = load_checkpoint(ddp).optimizer_state()
    assert opt["state"].keys() == ref["state"].keys()
    assert all(v.shape == ref["state"][i][k].shape for i, e in opt["state"].items() for k, v in e.items())
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref["param_groups"]]


def test_ep_inside_islands_with_fsdp_stays_refused():
    raw = raw_recipe("smoke-switch", model={"preset": "smoke-switch", "moe": {"num_experts": 4}})
    recipe = recipe_from_dict(raw, ["distributed.sync=diloco", "distributed.islands=2", "distributed.island_sync=fsdp",
                                    "distributed.expert_parallel=2"])
    with pytest.raises(MoecptError, match="inside islands runs with island_sync = 'ddp'"):
        check_launch(recipe, DistInfo(rank=0, world_size=4))
    assert check_launch(recipe_from_dict(raw, FSDP), DistInfo(rank=0, world_size=4)).ep == 2
