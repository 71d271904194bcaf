"""Sharded (DCP) checkpoints under expert parallelism, and killed ranks under EP and FSDP with DCP (CPU / gloo).

One module fixture runs every job once (the recipe uses micro-batches of 2 rows, so worlds 4, 2 and 1 compute the
same per-micro-batch losses and differ only in reduction order):

* EP = 4 on 4 ranks (``train.checkpoint_format = auto``: DCP), rank 1 killed after the step-4 checkpoint: the others
  stop in bounded time with the one-line message, and the same command resumes from step 4 and finishes;
* from its step-4 checkpoint, at EP = 2 on 2 ranks, one launch of two jobs: (a) the DCP checkpoint itself
  (resharded EP 4 -> 2, world 4 -> 2) after the newest one lost a shard's tail, (b) its consolidated single-file
  form; (c) EP = 2 on 4 ranks (a 2 x 2 DP x EP mesh: every expert shard on two ranks) from the DCP checkpoint;
  (d) one process without EP from the consolidated form;
* FSDP2 on 2 ranks with DCP, rank 1 killed after the step-4 checkpoint (side by side with the EP job); the same
  command resumes and finishes.

The EP degree is no part of a run's identity (a layout, as the world size), which is what lets (a), (c) and (d)
resume the EP = 4 run; a run.json from before, which still held it, resumes too.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from island_helpers import logged
from island_helpers import losses_by_step as losses
from test_dcp_checkpoint import assert_same_state, consolidate_into, max_diff, run_ok, step_dir
from test_distributed import finish, launch
from test_trainer import write_toml
from tiny_recipes import raw_recipe

from moecpt.cli import main as cli_main
from moecpt.config import recipe_from_dict
from moecpt.errors import MoecptError
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.dcp_io import SafeReader
from moecpt.train.trainer import Trainer, _fingerprint

STEPS, EXPERTS = 8, 8  # smoke-switch has 8 routed experts
TIMEOUT_S = 30
RAW = raw_recipe("smoke-switch", steps=STEPS, checkpoint_every=4, train={"micro_batch_size": 2},
                 distributed={"timeout_s": TIMEOUT_S})
EP4, EP2, FSDP = ["distributed.expert_parallel=4"], ["distributed.expert_parallel=2"], ["distributed.sync=fsdp"]
W_IN = "blocks.0.ffn.experts.w_in"
#: worlds 4, 2 and 1, EP or FSDP: the same objective, fp32 reduction order apart (measured: at most 3.4e-7)
TOL = 1e-5


def kill_rank1(jobs: list[tuple[list, Path]], step: int) -> None:
    """Launched jobs ``(procs, run)`` side by side: once a job's rank 0 has logged ``step``, SIGKILL its rank 1;
    every other rank must stop in bounded time with the one-line message (rank 0's names rank 1) saying to run the
    same command again (``test_distributed``'s check, at any world size)."""
    killed: dict[int, float] = {}
    deadline = time.time() + 600
    while len(killed) < len(jobs) and time.time() < deadline:
        for i, (procs, run) in enumerate(jobs):
            if i not in killed and (logged(run, step) or procs[0].poll() is not None):
                procs[1].send_signal(signal.SIGKILL)
                killed[i] = time.time()
        time.sleep(0.02)
    for i, (procs, run) in enumerate(jobs):
        results = finish(procs, timeout=60)
        stopped_after = time.time() - killed[i]
        assert results[1][0] == -signal.SIGKILL, f"{run.name} finished before rank 1 could be killed"
        for rank, (rc, _, err) in enumerate(results):
            if rank != 1:
                assert rc == 2, f"{run.name} rank {rank} should stop with a one-line error, got {rc}:\n{err[-2000:]}"
                assert "run the same command again" in err.strip().splitlines()[-1], err[-2000:]
        assert "rank 1 stopped responding" in results[0][2], results[0][2][-2000:]
        # bounded: gloo sees the closed connection (or, for a rank blocked in a group without rank 1, the collective
        # times out: distributed.timeout_s), plus the diagnosis window and the exit of a busy box
        assert stopped_after < TIMEOUT_S + 15, stopped_after
        assert load_checkpoint(run).step == 4  # verified (every hash): the last complete checkpoint


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every job once, side by side where they do not depend on each other (a busy 2-core box starts processes
    slowly; they then overlap their start-up)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks: same kernels, and faster on a busy box
    tmp = tmp_path_factory.mktemp("epdcp")
    recipe = write_toml(tmp / "r.toml", RAW)
    e4, fsdp = tmp / "e4", tmp / "fsdp"
    first = [(e4, EP4, 4), (fsdp, FSDP, 2)]
    kill_rank1([(launch(tmp, recipe, run, sets, world=w), run) for run, sets, w in first], step=5)
    for procs in [launch(tmp, recipe, run, sets, world=w) for run, sets, w in first]:  # the same commands again
        run_ok(finish(procs, timeout=600))

    a, b, c, d = (tmp / x for x in ("a-dcp", "b-single", "c-mesh", "d-one"))
    for run in (a, b, c, d):
        shutil.copytree(e4, run)
    shard = step_dir(a, STEPS) / "dcp" / "__2_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    for run in (b, c, d):
        shutil.rmtree(step_dir(run, STEPS))
    for run in (b, d):
        consolidate_into(run, 4, tmp)
    results = [finish(procs, timeout=600) for procs in [launch(tmp, recipe, a, EP2, world=2),
                                                        launch(tmp, recipe, b, EP2, world=2),
                                                        launch(tmp, recipe, c, EP2, world=4)]]
    for r in results:
        run_ok(r)
    Trainer(recipe_from_dict(RAW), d, show_progress=False).run()
    torch.set_num_threads(n)
    return {"tmp": tmp, "e4": e4, "a": a, "b": b, "c": c, "d": d, "fsdp": fsdp, "err_a": results[0][0][2]}


def expert_chunks(ck: Path) -> dict[str, int]:
    """Chunks DCP stored per tensor of a checkpoint's model (each written once, whatever the replicas)."""
    md = SafeReader(str(ck / "dcp")).read_metadata()
    return {k.removeprefix("model."): len(v.chunks) for k, v in md.state_dict_metadata.items()
            if k.startswith("model.")}


def test_ep_writes_dcp_each_expert_once_and_survives_a_killed_rank(jobs):
    e4, c = jobs["e4"], jobs["c"]
    for run in (e4, jobs["fsdp"]):  # killed after step 5, resumed from step 4 by the same command
        assert load_checkpoint(run).step == STEPS
        assert sorted(losses(run)) == list(range(1, STEPS + 1))  # the log continues from step 4, no duplicates
    ck = load_checkpoint(e4)
    assert ck.sharded and ck.meta["expert_parallel"] == 4  # auto: DCP under EP (no gather on rank 0)
    assert sorted(n for n in ck.manifest["files"] if n.endswith(".distcp")) == [f"dcp/__{r}_0.distcp" for r in range(4)]
    assert ck.model_state()[W_IN].shape[0] == EXPERTS  # the global tensor, assembled from 4 shards
    chunks = expert_chunks(step_dir(e4, STEPS))
    assert chunks[W_IN] == 4 and chunks["tok_emb.weight"] == 1
    # the 2 x 2 mesh: every expert shard lives on 2 ranks and is written once (2 chunks), the rest once
    chunks = expert_chunks(step_dir(c, STEPS))
    assert chunks[W_IN] == 2 and chunks["blocks.0.ffn.experts.w_out"] == 2 and chunks["tok_emb.weight"] == 1
    md = SafeReader(str(step_dir(c, STEPS) / "dcp")).read_metadata()
    moments = [k for k in md.state_dict_metadata if k.startswith("optim.") and W_IN in k and "exp_avg" in k]
    assert moments and all(len(md.state_dict_metadata[k].chunks) == 2 for k in moments)  # AdamW's moments, sharded


def test_resharded_dcp_resume_equals_the_consolidated_resume(jobs):
    a, b, e4 = jobs["a"], jobs["b"], jobs["e4"]
    err = jobs["err_a"]
    assert "dcp/__2_0.distcp is truncated" in err and "moved it aside" in err, err[-2000:]
    assert len(list((a / "checkpoints").glob(f"step_{STEPS:08d}.damaged-*"))) == 1
    # EP 4 on 4 ranks -> EP 2 on 2 ranks, from DCP and from the single-file form: the same run, bit for bit
    assert load_checkpoint(a).step == load_checkpoint(b).step == STEPS
    assert_same_state(a, b)
    la, lb = losses(a), losses(b)
    assert [la[s] for s in range(5, STEPS + 1)] == [lb[s] for s in range(5, STEPS + 1)]
    assert max_diff(a, e4) < TOL  # and as the EP = 4 run went on (reduction order only)


def test_other_layouts_and_one_process_resume_the_same_run(jobs, capsys):
    a, c, d, fsdp = jobs["a"], jobs["c"], jobs["d"], jobs["fsdp"]
    assert load_checkpoint(c).step == load_checkpoint(d).step == STEPS
    assert max_diff(c, a) < TOL  # EP 4 -> EP 2 on a 2 x 2 mesh
    assert not load_checkpoint(d).sharded and max_diff(d, a) < TOL  # one process, no EP, from consolidate
    assert max_diff(fsdp, a) < TOL  # FSDP2, killed and resumed: the same objective
    assert load_checkpoint(fsdp).sharded and load_checkpoint(fsdp).meta["sync"] == "fsdp"

    # consolidate: the EP checkpoint as one file with every expert, read by eval as the DCP one is
    out = jobs["tmp"] / "e4-consolidated"
    assert cli_main(["checkpoint", "consolidate", str(c), "--out", str(out)]) == 0
    cons = load_checkpoint(out)
    assert not cons.sharded and cons.model_state()[W_IN].shape[0] == EXPERTS
    assert_same_state(out, c)
    capsys.readouterr()
    evals = []
    for ck in (out, c):
        assert cli_main(["eval", "--checkpoint", str(ck), "--batches", "1", "--batch-size", "4", "--json"]) == 0
        evals.append(json.loads(capsys.readouterr().out))
    assert evals[0]["sources"] == evals[1]["sources"] and evals[0]["step"] == STEPS


def test_the_ep_degree_is_no_part_of_the_run_identity_and_older_run_files_still_resume(jobs, tmp_path):
    """(d) resumed an EP = 4 run folder without EP; a run.json written when the identity still held the EP degree
    is the same run too, and another recipe is still refused."""
    run = tmp_path / "legacy"
    shutil.copytree(jobs["d"], run)
    record = json.loads((run / "run.json").read_text())
    assert "expert_parallel" not in record["identity"]["recipe"]["distributed"]
    record["identity"]["recipe"]["distributed"]["expert_parallel"] = 4  # as an older moecpt wrote it
    record["fingerprint"] = _fingerprint(record["identity"])
    (run / "run.json").write_text(json.dumps(record))
    Trainer(recipe_from_dict(RAW), run, show_progress=False).run()  # resumed at its end: nothing left to train
    assert load_checkpoint(run).step == STEPS
    with pytest.raises(MoecptError, match="holds another run"):
        Trainer(recipe_from_dict(RAW, ["train.seed=5"]), run, show_progress=False)
