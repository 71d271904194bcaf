"""FSDP2 inside islands (moecpt.distributed.islands_fsdp): one 4-process gloo job of 2 islands × 2 ranks, launched as
torchrun launches ``python -m moecpt pretrain``, killed mid-run and resumed by the same command, against DDP inside
islands (the in-process simulator, which tests/test_islands.py shows equals a real 2 × 2 DDP-islands job bit for bit).

* the resumed FSDP job equals DDP inside islands: every logged loss and the final weights (the reference is the
  uninterrupted run, so this is also resume = uninterrupted);
* the byte counters per link equal their analytic values: the round carries this rank's FSDP shard only, and
  nothing is all-gathered inside the island for it;
* a killed rank stops the others in bounded time with the one-line message naming it;
* LAgg-A (K = 2) and LOpt-A with FSDP2 inside islands (moecpt.distributed.lopt_shards: each tensor gathered inside
  the island for the learned step) equal them with DDP inside: losses, weights and the learned accumulators after
  2 rounds; the ``outer_gather`` bytes equal their analytic value; each job resumed from its step-2 checkpoint (a
  round boundary; the newest checkpoint deleted) continues bit for bit (one launch of 4 ranks runs all four);
* checkpoints are sharded (DCP, the default here): the killed and resumed job equals the same job with
  ``checkpoint_format = "single"`` bit for bit, weights, losses and the whole checkpointed state (``Checkpoint.
  optimizer_state()`` of the DCP checkpoint, and ``moecpt checkpoint consolidate``'s output, equal the single-file
  one: every island's inner state, the outer state), with each shard written once (the islands' equal θ and outer
  state deduplicated); a dense job's step-2 checkpoint, written by 2 islands of 2 ranks, resumes on 2 islands of 1
  rank (resharded) and ends where the uninterrupted job did, to rounding;
* the one-line refusals (simulation, a Python outer optimizer that is neither torch.optim nor learned, a
  checkpoint of another layout) and ``moecpt plan``'s per-rank bytes (weights, gradients, optimizer and outer state
  divided by S).
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from island_helpers import (
    LEARNED,
    RESUMED,
    assert_learned_outer_matches,
    assert_resumed_identically,
    assert_same_state,
    launch_worker,
    learned_jobs,
    losses_by_step,
    outer_gather_bytes,
    pretrain_argv,
    rel_diff,
    single_thread,
    train_losses,
)
from test_distributed import comm_summary, finish, launch, wait_until_logged, weights
from test_trainer import raw_recipe, records, write_toml

from moecpt.cli import main as cli_main
from moecpt.config import recipe_from_dict
from moecpt.distributed.accounting import allreduce_bytes
from moecpt.distributed.islands_fsdp import IslandFSDPSync
from moecpt.distributed.mesh import Mesh
from moecpt.distributed.runtime import build_sync, check_launch
from moecpt.errors import MoecptError
from moecpt.lopt import DiLoCo
from moecpt.train.checkpoint import load_checkpoint, load_model
from moecpt.train.dcp_io import read_full
from moecpt.train.parallel import DistInfo

STEPS, H, S = 6, 2, 2
SETS = ["distributed.sync=diloco", f"distributed.local_steps={H}", "distributed.islands=2", "distributed.timeout_s=30"]
FSDP = [*SETS, "distributed.island_sync=fsdp"]
RTOL = 1e-5  # relative to each tensor's scale: FSDP2 reduces and steps on shards in another order than DDP
DENSE_STEPS = 4  # the resharded resume: a dense model, whose step does not depend on the rows per rank (a Switch
#                  layer's capacity and aux loss do: another island size is then another computation)


def _raw(**train) -> dict:
    return raw_recipe("smoke-switch", train={"steps": STEPS, "checkpoint_every": 2, "log_every": 1, **train})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP inside islands (simulated), and the FSDP job killed at step >= 3 (past the checkpoint of step 2), then
    resumed by the same command (run by tests/island_lopt_worker.py, whose launch then runs the learned-outer jobs:
    their DDP references here first, island_helpers.learned_jobs)."""
    tmp = tmp_path_factory.mktemp("islands-fsdp")
    recipe = write_toml(tmp / "r.toml", _raw())
    with single_thread():
        assert cli_main(pretrain_argv(recipe, tmp / "ddp", SETS, workers=4)) == 0
    learned = learned_jobs(tmp, _raw(steps=LOPT_STEPS), SETS, FSDP, "fsdp", LOPT_STEPS)
    out = tmp / "fsdp"
    procs = launch(tmp, recipe, out, FSDP, world=4)
    wait_until_logged(procs[0], out, 3, timeout=240)  # mid-round 2
    procs[3].send_signal(signal.SIGKILL)
    t_kill = time.time()
    killed = finish(procs, timeout=60)
    stopped_after = time.time() - t_kill
    killed_at = load_checkpoint(out).step
    # the same command again, in the worker's launch, which then runs the single-file twin, the dense job and the
    # learned-outer jobs (one start-up of 4 ranks)
    dense = write_toml(tmp / "r-dense.toml", raw_recipe("smoke-dense", train={
        "steps": DENSE_STEPS, "checkpoint_every": 2, "log_every": 1}))
    single = [*FSDP, "train.checkpoint_format=single"]
    worker = {"unit": True, "jobs": [[str(recipe), str(out), FSDP], [str(recipe), str(tmp / "single"), single],
                                     [str(dense), str(tmp / "dense"), FSDP], *learned["jobs"]],
              "resume": [[str(recipe), str(tmp / "single"), str(tmp / "single-resumed"), STEPS, single],
                         *learned["resume"]]}
    resumed = finish(launch_worker(tmp, worker), timeout=400)
    # the dense job again from its step-2 checkpoint on 2 ranks: 2 islands of 1 rank read the shards of 2
    again = {"resume": [[str(dense), str(tmp / "dense"), str(tmp / "dense-s1"), DENSE_STEPS, FSDP]]}
    resharded = finish(launch_worker(tmp, again, world=2), timeout=200)
    return {"tmp": tmp, "recipe": recipe, "ddp": tmp / "ddp", "fsdp": out, "killed": killed,
            "stopped_after": stopped_after, "killed_at": killed_at, "resumed": resumed, "resharded": resharded}


def test_killed_rank_stops_the_others_and_the_same_command_resumes(runs):
    *survivors, (rc3, _, _) = runs["killed"]
    assert rc3 == -signal.SIGKILL, "the run finished before rank 3 could be killed"
    for rank, (rc, _, err) in enumerate(survivors):
        assert rc == 2 and "rank 3 stopped responding" in err and "run the same command again" in err, \
            f"rank {rank}: rc {rc}\n{err[-2000:]}"
    assert runs["stopped_after"] < 30
    assert 2 <= runs["killed_at"] < STEPS
    for rank, (rc, _, err) in enumerate(runs["resumed"]):
        assert rc == 0, f"resumed rank {rank} failed:\n{err[-2000:]}"
    assert [r["step"] for r in records(runs["fsdp"]) if "lr" in r] == list(range(1, STEPS + 1))
    ck = load_checkpoint(runs["fsdp"])
    sync = ck.optimizer_state()["moecpt_sync"]
    assert ck.step == STEPS and sync["islands"] == 2 and sync["island_sync"] == "fsdp" and set(sync["inner"]) == {"1"}
    assert set(ck.optimizer_state()["state"]) == set(load_checkpoint(runs["ddp"]).optimizer_state()["state"])


def test_sharded_checkpoints_hold_what_the_single_file_layout_holds(runs, tmp_path):
    dcp, single = load_checkpoint(runs["fsdp"]), load_checkpoint(runs["tmp"] / "single")
    assert dcp.sharded and not single.sharded and dcp.step == single.step == STEPS
    assert train_losses(runs["fsdp"]) == train_losses(runs["tmp"] / "single")
    assert_same_state(dcp.model_state(), single.model_state())
    assert_same_state(dcp.optimizer_state(), single.optimizer_state())  # island 1's inner state, the outer state
    # each shard written once: the islands' equal θ and outer state are deduplicated (twice: 4/3 of these bytes)
    folder = dcp.path / "dcp"
    unique = sum(t.numel() * t.element_size() for part in ("model", "optim") for t in _leaves(read_full(str(folder),
                                                                                                        part)))
    on_disk = sum(f.stat().st_size for f in folder.glob("*.distcp"))
    assert unique <= on_disk <= 1.05 * unique + 65536, (on_disk, unique)
    out = tmp_path / "consolidated"
    assert cli_main(["checkpoint", "consolidate", str(runs["fsdp"]), "--out", str(out)]) == 0
    flat = load_checkpoint(out)
    assert not flat.sharded
    assert_same_state(flat.model_state(), single.model_state())
    assert_same_state(flat.optimizer_state(), single.optimizer_state())
    # the single-file layout resumes too (from step 4: the gathered states cut again)
    assert_resumed_identically(runs["tmp"] / "single", runs["tmp"] / "single-resumed", STEPS)


def _leaves(tree):
    return [t for v in tree.values() for t in (_leaves(v) if isinstance(v, dict) else [v])]


def test_a_sharded_checkpoint_resumes_with_another_island_size(runs):
    """2 islands of 2 ranks wrote it, 2 islands of 1 rank resume it: each island's DTensors (weights, inner AdamW
    state, the outer momentum) are read into the new shards and the job ends where the uninterrupted one did."""
    for rank, (rc, _, err) in enumerate(runs["resharded"]):
        assert rc == 0, f"resharded rank {rank} failed:\n{err[-2000:]}"
    run, again = runs["tmp"] / "dense", runs["tmp"] / "dense-s1"
    assert load_checkpoint(again).step == DENSE_STEPS
    # FSDP2 over 1 rank reduces in another order than over 2: rounding. Measured: weights 7.8e-6, the momentum
    # (sums of differences of nearby weights) 1.2e-4 (tok_emb); a resume skipping the outer state, tried once by
    # hand: 4.3e-2 and 0.68
    assert losses_by_step(again) == pytest.approx(losses_by_step(run), rel=RTOL)
    a, b = weights(again), weights(run)
    assert a.keys() == b.keys() and max(rel_diff(a[k], b[k]) for k in a) <= 10 * RTOL
    mom = lambda r: load_checkpoint(r).optimizer_state()["moecpt_sync"]["outer"]["state"]  # noqa: E731
    ma, mb = mom(again), mom(run)
    assert ma.keys() == mb.keys()
    assert max(rel_diff(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma) <= 100 * RTOL


def test_fsdp_inside_islands_equals_ddp_inside_islands(runs):
    a, b = weights(runs["fsdp"]), weights(runs["ddp"])
    assert a.keys() == b.keys()
    # per tensor, max |difference| over max |value|: observed 2.7e-6 (lm_head.weight; at most 2.6e-7 absolute)
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
    assert worst <= RTOL, f"max relative difference {worst:.3g}"
    assert train_losses(runs["fsdp"]) == pytest.approx(train_losses(runs["ddp"]), rel=RTOL)
    # the outer state (Nesterov momentum) was gathered from the shards to whole tensors, equal to DDP's; it sums
    # pseudo-gradients, differences of nearby weights, so its relative error is larger (observed 2.3e-5)
    mom = lambda run: load_checkpoint(run).optimizer_state()["moecpt_sync"]["outer"]["state"]  # noqa: E731
    fa, fb = mom(runs["fsdp"]), mom(runs["ddp"])
    assert fa.keys() == fb.keys()
    for i in fa:
        x, y = fa[i]["momentum_buffer"], fb[i]["momentum_buffer"]
        assert x.shape == y.shape and float((x - y).abs().max()) <= 10 * RTOL * float(y.abs().max()), i


def test_byte_counters_per_link_equal_their_analytic_values(runs):
    shapes = [p.shape for p in load_model(runs["fsdp"]).parameters()]
    n = sum(s.numel() for s in shapes)
    # rank 0 (which logs) holds FSDP2's first chunk of dim 0 of every parameter; no persistent buffers (penalty MoE)
    local = sum(-(-s[0] // S) * (s.numel() // s[0]) for s in shapes)
    rounds = STEPS // H
    s = comm_summary(runs["fsdp"])
    k = s["by_kind"]
    assert set(k) == {"fsdp", "stats", "sync"}  # no DDP gradients, no island all-gather for the round
    assert s["rounds"] == rounds
    assert k["sync"]["bytes_sent"] == k["sync"]["bytes_received"] == rounds * allreduce_bytes(4 * local, 2)
    assert k["fsdp"]["bytes_sent"] == STEPS * 3 * (S - 1) * 4 * n // S  # estimated, per optimizer step
    both = lambda kind: k[kind]["bytes_sent"] + k[kind]["bytes_received"]  # noqa: E731
    assert s["bytes_inter_island"] == both("sync") == rounds * 2 * 4 * local
    assert s["bytes_intra_island"] == both("fsdp") + both("stats")
    assert s["bytes_inter_island_per_round"] == 2 * 4 * local
    ddp = comm_summary(runs["ddp"])  # the DDP island's round: half the zero-padded flat delta, then an all-gather
    assert ddp["bytes_inter_island_per_round"] == 2 * 4 * -(-n // S) >= s["bytes_inter_island_per_round"]
    train = [r for r in records(runs["fsdp"]) if "lr" in r]
    assert [r["bytes_inter_island"] for r in train] == [r["comm_rounds"] * 2 * 4 * local for r in train]


def test_plan_divides_the_state_by_the_island_size(runs, capsys):
    def plan(sets: list[str]) -> dict:
        argv = ["plan", "--recipe", str(runs["recipe"]), "--world", "4", "--json",
                *[a for s in sets for a in ("--set", s)]]
        assert cli_main(argv) == 0
        return json.loads(capsys.readouterr().out)

    ddp, fsdp = plan(SETS), plan(FSDP)
    assert fsdp["layout"]["step"] == "fsdp" and fsdp["layout"]["outer_workers"] == 2
    per_rank = fsdp["params"]["per_rank"]["total"]
    assert per_rank == pytest.approx(ddp["params"]["per_rank"]["total"] / S, rel=1e-3)
    for key in ("weights", "grads", "optimizer_state", "outer_state"):
        assert fsdp["memory_bytes"][key] == pytest.approx(ddp["memory_bytes"][key] / S, rel=1e-3), key


@pytest.mark.parametrize("sets, workers, needle", [
    (["distributed.island_sync=fsdp"], 4, "island_sync = 'fsdp' cannot be simulated"),
    (["distributed.island_sync=fsdp", "distributed.expert_parallel=2"], 4,
     "inside islands runs with island_sync = 'ddp'"),
])
def test_one_line_refusals_at_the_cli(tmp_path, capsys, sets, workers, needle):
    recipe = write_toml(tmp_path / "r.toml", _raw())
    out = tmp_path / "run"
    assert cli_main(pretrain_argv(recipe, out, [*SETS, *sets], workers)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------ learned outer optimizers
#: weights relative to each tensor's largest value (the accumulators: 10x). The learned step on pieces equals the
#: whole-tensor step bit for bit on the same inputs (the worker's unit check); across layouts its inputs differ by
#: rounding, which its scale-free features (Adafactor's g / sqrt(mean g²), m / sqrt(v)) and fixed-size step amplify
#: where Δ is a difference of nearby floats (embedding rows no token reached: weight decay only). Measured: weights
#: 8.3e-6 (LAgg-A, lm_head.weight) and 2.3e-4 (LOpt-A, tok_emb.weight; 3e-5 absolute), accumulators 5.8e-5 and
#: 6.8e-4, losses 5.8e-8; a wrong cut or statistic moves weights by the step itself, up to 0.09 on weights of at
#: most 0.13
LEARNED_RTOL = 1e-3
LOPT_STEPS = 4  # 2 rounds


@pytest.fixture(scope="module")
def learned(runs):
    """LAgg-A (K = 2) and the shipped LOpt-A across 2 islands, 4 steps: DDP inside (simulated, ``ddp-*``) and
    FSDP2 inside (``fsdp-*``), and LAgg-A again from its step-2 checkpoint (the newest deleted: a resume at a
    round boundary, ``resumed-lagg``); run by the ``runs`` fixture (island_helpers.learned_jobs)."""
    return runs["tmp"]


@pytest.mark.parametrize("name", LEARNED)
def test_learned_outer_fsdp_inside_islands_equals_ddp_inside_islands(learned, name):
    """The learned step on FSDP2 shards (each tensor gathered inside the island) = on DDP islands' whole tensors."""
    fsdp, ddp = learned / f"fsdp-{name}", learned / f"ddp-{name}"
    assert_learned_outer_matches(fsdp, ddp, LOPT_STEPS // H, LEARNED_RTOL, RTOL)
    k = comm_summary(fsdp)["by_kind"]
    shapes = [tuple(p.shape) for p in load_model(fsdp).parameters()]  # every tensor cut over the island
    per_round = outer_gather_bytes(shapes, 2 if name == "lagg" else 1, S)
    assert k["outer_gather"]["bytes_sent"] == LOPT_STEPS // H * per_round, k


@pytest.mark.parametrize("name", RESUMED)
def test_learned_outer_resumed_at_a_round_boundary_continues_identically(learned, name):
    """From the step-2 checkpoint (the sharded accumulators saved whole, cut again on load) to the same weights,
    losses and learned state as the uninterrupted FSDP job, bit for bit."""
    run, resumed = learned / f"fsdp-{name}", learned / f"resumed-{name}"
    assert_resumed_identically(run, resumed, LOPT_STEPS)


def test_learned_outer_optimizers_run_on_shards_and_others_are_refused():
    """LOpt-A passes the launch checks with FSDP2 inside islands (LAgg-A's K is still checked, in one line); a
    Python-API outer optimizer that is neither torch.optim nor learned is refused before any process group."""
    info = DistInfo(rank=1, world_size=4, local_rank=1)
    check_launch(recipe_from_dict(_raw(), [*FSDP, "distributed.outer_optimizer=lopt-a"]), info)
    with pytest.raises(MoecptError, match="for K=8 workers, not K=2") as e:
        check_launch(recipe_from_dict(_raw(), [*FSDP, "distributed.outer_optimizer=lagg-a"]), info)
    assert "\n" not in str(e.value)
    with pytest.raises(MoecptError, match="DiLoCo with island_sync = 'fsdp' is not supported"):
        IslandFSDPSync(recipe_from_dict(_raw(), FSDP), info, Mesh(world=4, islands=2), torch.device("cpu"),
                       outer=DiLoCo())


def test_a_checkpoint_of_another_island_sync_is_refused():
    recipe = recipe_from_dict(_raw(), SETS)
    sync = build_sync(recipe, DistInfo(), torch.device("cpu"), simulate_workers=4)
    with pytest.raises(MoecptError, match="written with distributed.island_sync='fsdp', but this run has 'ddp'"):
        sync.check_resume({"kind": "diloco", "workers": 4, "islands": 2, "island_sync": "fsdp"})
    sync.check_resume({"kind": "diloco", "workers": 4, "islands": 2})  # written before the key: DDP's
    sharded = {"kind": "diloco", "workers": 4, "islands": 2, "island_sync": "fsdp",
               "inner": {"1": {"state": {0: {"exp_avg": {"dcp_ref": ["moecpt_sync", "inner", "1", "state", "w",
                                                                     "exp_avg"], "shape": [2], "dtype": "float32"}}}}}}
    for sets, workers in ((SETS, 4), (["distributed.sync=diloco", f"distributed.local_steps={H}"], 2)):
        other = build_sync(recipe_from_dict(_raw(), sets), DistInfo(), torch.device("cpu"), simulate_workers=workers)
        with pytest.raises(MoecptError, match="the checkpoint is sharded \\(DCP\\), written by 2 islands with "
                                              "island_sync = 'fsdp'; resume it with that layout"):
            other.check_resume(sharded)
