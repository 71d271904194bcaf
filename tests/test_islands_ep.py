"""Expert parallelism inside islands (moecpt.distributed.islands_ep): one 4-process gloo job of 2 islands × EP 2 on a
4-expert Switch model, launched as torchrun launches ``python -m moecpt pretrain``, against DDP inside islands
(``--simulate-workers 4`` with ``islands = 2``, which equals a real 2 × 2 DDP job bit for bit: tests/test_islands.py).

* rank 3 is killed mid-run: the others stop naming it; the same command resumes from the sharded checkpoint (each
  rank reads its experts, its island's inner state and the outer state); the resumed job equals DDP inside islands
  within fp32 rounding (losses, final weights, the outer momentum, island 1's inner AdamW moments);
* the byte counters per link equal their analytic values (the experts' pseudo-gradient crosses between islands
  once per shard, the non-expert one in S shards);
* LAgg-A (K = 2) and LOpt-A with EP = 2 inside islands (each expert tensor gathered whole over the EP group for the
  learned step) equal them with DDP inside: losses, weights and the learned accumulators after 2 rounds; the
  ``outer_gather`` bytes equal their analytic value; each job resumed from its step-2 checkpoint continues bit for
  bit (one launch of 4 ranks runs all four);
* checkpoints are sharded (DCP, the default here): the killed and resumed job equals its single-file twin bit for
  bit (weights, losses, the whole checkpointed state), and the twin resumed from its step-2 checkpoint continues
  bit for bit;
* the one-line refusals: FSDP2 inside islands, simulation, the loop dispatch, DCP for DDP islands without experts,
  a Python outer optimizer that is neither torch.optim nor learned, another layout's state.
"""

from __future__ import annotations

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
from moecpt.distributed.accounting import allgather_bytes, allreduce_bytes
from moecpt.distributed.islands_ep import IslandEPSync
from moecpt.distributed.mesh import Mesh
from moecpt.distributed.runtime import Distributed, build_sync, check_launch
from moecpt.errors import MoecptError
from moecpt.lopt import DiLoCo
from moecpt.train.checkpoint import load_checkpoint, load_model
from moecpt.train.parallel import DistInfo
from moecpt.train.trainer import Trainer

STEPS, H, S, EXPERTS = 4, 2, 2, 4
SETS = ["distributed.sync=diloco", f"distributed.local_steps={H}", "distributed.islands=2", "distributed.timeout_s=30",
        f"model.moe.num_experts={EXPERTS}"]
EP = [*SETS, "distributed.expert_parallel=2"]
#: fp32 tolerance, relative to each tensor's largest value: EP sums the expert gradients over the EP group's tokens in
#: another order than DDP's all-reduce of every expert's gradient
RTOL = 1e-5


def _raw() -> dict:
    return raw_recipe("smoke-switch", train={"steps": STEPS, "checkpoint_every": 2, "log_every": 1})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP inside islands (simulated), and the EP job killed at step >= 3 (past the checkpoint of step 2), then
    resumed by the same command (run by tests/island_lopt_worker.py, whose launch then runs the learned-outer jobs:
    their DDP references here first, island_helpers.learned_jobs)."""
    tmp = tmp_path_factory.mktemp("islands-ep")
    recipe = write_toml(tmp / "r.toml", _raw())
    with single_thread():
        assert cli_main(pretrain_argv(recipe, tmp / "ddp", SETS, workers=4)) == 0
    learned = learned_jobs(tmp, _raw(), SETS, EP, "ep", STEPS)
    out = tmp / "ep"
    procs = launch(tmp, recipe, out, EP, world=4)
    wait_until_logged(procs[0], out, 3, timeout=240)
    procs[3].send_signal(signal.SIGKILL)
    t_kill = time.time()
    killed = finish(procs, timeout=60)
    stopped_after = time.time() - t_kill
    killed_at = load_checkpoint(out).step
    # the same command again, in the worker's launch, which then runs the single-file twin (and resumes it from its
    # step-2 checkpoint) and the learned-outer jobs (one start-up of 4 ranks)
    single = [*EP, "train.checkpoint_format=single"]
    worker = {"unit": True, "jobs": [[str(recipe), str(out), EP], [str(recipe), str(tmp / "single"), single],
                                     *learned["jobs"]],
              "resume": [[str(recipe), str(tmp / "single"), str(tmp / "single-resumed"), STEPS, single],
                         *learned["resume"]]}
    resumed = finish(launch_worker(tmp, worker), timeout=400)
    return {"tmp": tmp, "recipe": recipe, "ddp": tmp / "ddp", "ep": out, "killed": killed,
            "stopped_after": stopped_after, "killed_at": killed_at, "resumed": resumed}


def test_killed_rank_stops_the_others_and_the_same_command_resumes(runs):
    *survivors, (rc3, _, _) = runs["killed"]
    assert rc3 == -signal.SIGKILL, "the run finished before rank 3 could be killed"
    for rank, (rc, _, err) in enumerate(survivors):
        assert rc == 2 and "rank 3 stopped responding" in err, f"rank {rank}: rc {rc}\n{err[-2000:]}"
    assert runs["stopped_after"] < 30
    assert 2 <= runs["killed_at"] < STEPS
    for rank, (rc, _, err) in enumerate(runs["resumed"]):
        assert rc == 0, f"resumed rank {rank} failed:\n{err[-2000:]}"
    assert [r["step"] for r in records(runs["ep"]) if "lr" in r] == list(range(1, STEPS + 1))
    ck = load_checkpoint(runs["ep"])
    sync = ck.optimizer_state()["moecpt_sync"]
    assert ck.step == STEPS and ck.meta["expert_parallel"] == 2
    assert sync["islands"] == 2 and sync["expert_parallel"] == 2 and set(sync["inner"]) == {"1"}
    assert ck.model_state()["blocks.0.ffn.experts.w_in"].shape[0] == EXPERTS  # assembled: every expert


def test_sharded_checkpoints_hold_what_the_single_file_layout_holds(runs):
    """The killed and resumed job (DCP: the experts as DTensors on the [islands, dp, ep] mesh) = its single-file
    twin, bit for bit: losses, weights and the whole checkpointed state; the twin resumed from its step-2
    checkpoint (the gather / scatter layout) continues bit for bit too."""
    dcp, single = load_checkpoint(runs["ep"]), load_checkpoint(runs["tmp"] / "single")
    assert dcp.sharded and not single.sharded
    assert train_losses(runs["ep"]) == train_losses(runs["tmp"] / "single")
    assert_same_state(dcp.model_state(), single.model_state())
    assert_same_state(dcp.optimizer_state(), single.optimizer_state())
    assert_resumed_identically(runs["tmp"] / "single", runs["tmp"] / "single-resumed", STEPS)


def test_ep_inside_islands_equals_ddp_inside_islands(runs):
    a, b = weights(runs["ep"]), weights(runs["ddp"])
    assert a.keys() == b.keys()
    # per tensor, max |difference| over max |value|: measured 2.3e-6 (blocks.0.ffn.experts.w_out; 1.2e-7 absolute);
    # the logged losses were equal
    worst = max(rel_diff(a[k], b[k]) for k in a)
    assert worst <= RTOL, f"max relative difference {worst:.3g}"
    assert train_losses(runs["ep"]) == pytest.approx(train_losses(runs["ddp"]), rel=RTOL)
    sa, sb = (load_checkpoint(r).optimizer_state()["moecpt_sync"] for r in (runs["ep"], runs["ddp"]))
    # the outer (Nesterov) momentum, gathered to whole tensors: it sums pseudo-gradients, differences of nearby
    # weights, so its relative error is larger (measured 1.4e-5; island 1's exp_avg 6.3e-7)
    ma, mb = sa["outer"]["state"], sb["outer"]["state"]
    assert ma.keys() == mb.keys()
    for i in ma:
        x, y = ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]
        assert x.shape == y.shape and rel_diff(x, y) <= 10 * RTOL, i
    # island 1's inner AdamW state (the DDP checkpoint keys it by worker: worker 2 is island 1's first rank)
    ia, ib = sa["inner"]["1"]["state"], sb["inner"]["2"]["state"]
    assert ia.keys() == ib.keys()
    for i in ia:
        assert ia[i]["exp_avg"].shape == ib[i]["exp_avg"].shape
        assert rel_diff(ia[i]["exp_avg"], ib[i]["exp_avg"]) <= 10 * RTOL, i


def test_byte_counters_per_link_equal_their_analytic_values(runs):
    model = load_model(runs["ep"])
    n = sum(p.numel() for p in model.parameters())
    n_ex = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name) // 2  # this rank's half
    n_ne = n - 2 * n_ex  # no persistent buffers (penalty-balanced Switch)
    rounds = STEPS // H
    per_round = allreduce_bytes(4 * -(-n_ne // S), 2) + allreduce_bytes(4 * n_ex, 2)  # M = 2; D = 1
    s = comm_summary(runs["ep"])
    k = s["by_kind"]
    assert s["rounds"] == rounds and s["expert_parallel"] == 2
    assert set(k) == {"grads", "stats", "all_to_all", "island_gather", "sync"}  # D = 1: no expert-DP collective
    assert k["sync"]["bytes_sent"] == k["sync"]["bytes_received"] == rounds * per_round
    assert k["island_gather"]["bytes_sent"] == rounds * allgather_bytes(4 * -(-n_ne // S), S)
    both = lambda kind: k[kind]["bytes_sent"] + k[kind]["bytes_received"]  # noqa: E731
    assert s["bytes_inter_island"] == both("sync") == rounds * 2 * per_round
    assert s["bytes_inter_island_per_round"] == 2 * per_round
    assert s["bytes_intra_island"] == sum(both(kind) for kind in ("grads", "stats", "all_to_all", "island_gather"))
    # DDP inside the island carries the non-expert gradients only: the experts are excluded from it
    assert k["grads"]["bytes_sent"] == STEPS * allreduce_bytes(4 * n_ne, S)
    train = [r for r in records(runs["ep"]) if "lr" in r]
    assert all(r["a2a_bytes_step"] > 0 for r in train)
    assert [r["bytes_inter_island"] for r in train] == [r["comm_rounds"] * 2 * per_round for r in train]


@pytest.mark.parametrize("sets, workers, needle", [
    (["distributed.island_sync=fsdp"], None, "inside islands runs with island_sync = 'ddp'"),
    ([], 4, "which --simulate-workers does not have"),
    (["model.moe.dispatch=loop"], None, "use 'grouped' with distributed.expert_parallel"),
])
def test_one_line_refusals_at_the_cli(tmp_path, capsys, sets, workers, needle):
    recipe = write_toml(tmp_path / "r.toml", _raw())
    out = tmp_path / "run"
    assert cli_main(pretrain_argv(recipe, out, [*EP, *sets], workers)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------ learned outer optimizers
#: weights relative to each tensor's largest value (the accumulators: 10x). The learned step on pieces equals the
#: whole-tensor step bit for bit on the same inputs (the worker's unit check); across layouts its inputs differ by
#: rounding, which its scale-free features and fixed-size step amplify (tests/test_islands_fsdp.py's LEARNED_RTOL).
#: Measured here: weights 3.1e-6 (LAgg-A) and 6.2e-6 (LOpt-A, both blocks.0.ffn.experts.w_out), accumulators 1.4e-5,
#: losses 5.8e-8; a wrong cut or statistic moves weights by the learned step itself (up to 0.09)
LEARNED_RTOL = 1e-4


@pytest.fixture(scope="module")
def learned(runs):
    """LAgg-A (K = 2) and the shipped LOpt-A across 2 islands, 4 steps: DDP inside (simulated, ``ddp-*``) and
    EP = 2 inside (``ep-*``), and LAgg-A again from its step-2 checkpoint (the newest deleted: a resume at a
    round boundary, ``resumed-lagg``); run by the ``runs`` fixture (island_helpers.learned_jobs)."""
    return runs["tmp"]


@pytest.mark.parametrize("name", LEARNED)
def test_learned_outer_ep_inside_islands_equals_ddp_inside_islands(learned, name):
    """The learned step with the experts split over EP = 2 (each expert tensor gathered whole over the EP group) =
    on DDP islands' whole tensors."""
    ep, ddp = learned / f"ep-{name}", learned / f"ddp-{name}"
    assert_learned_outer_matches(ep, ddp, STEPS // H, LEARNED_RTOL, RTOL)
    # only the expert tensors are cut (over the EP group); the rest is whole on every rank and gathers nothing
    shapes = [tuple(p.shape) for n, p in load_model(ep).named_parameters() if ".experts." in n]
    per_round = outer_gather_bytes(shapes, 2 if name == "lagg" else 1, 2)
    assert comm_summary(ep)["by_kind"]["outer_gather"]["bytes_sent"] == STEPS // H * per_round


@pytest.mark.parametrize("name", RESUMED)
def test_learned_outer_resumed_at_a_round_boundary_continues_identically(learned, name):
    """From the step-2 checkpoint (the expert accumulators saved whole, cut again on load) to the same weights,
    losses and learned state as the uninterrupted EP job, bit for bit."""
    run, resumed = learned / f"ep-{name}", learned / f"resumed-{name}"
    assert_resumed_identically(run, resumed, STEPS)


def test_learned_outer_optimizers_pass_the_launch_checks_and_others_are_refused():
    """LOpt-A passes the launch checks with EP inside islands (LAgg-A's K is still checked, in one line); a Python-API
    outer optimizer that is neither torch.optim nor learned is refused before any process group."""
    info = DistInfo(rank=1, world_size=4, local_rank=1)
    check_launch(recipe_from_dict(_raw(), [*EP, "distributed.outer_optimizer=lopt-a"]), info)
    with pytest.raises(MoecptError, match="for K=8 workers, not K=2") as e:
        check_launch(recipe_from_dict(_raw(), [*EP, "distributed.outer_optimizer=lagg-a"]), info)
    assert "\n" not in str(e.value)
    with pytest.raises(MoecptError, match="DiLoCo with expert parallelism inside islands is not supported"):
        IslandEPSync(recipe_from_dict(_raw(), EP), info, Mesh(world=4, islands=2, ep=2), torch.device("cpu"),
                     outer=DiLoCo())


def test_dcp_is_refused_for_ddp_islands_without_experts_in_one_line(tmp_path):
    check_launch(recipe_from_dict(_raw(), [*EP, "train.checkpoint_format=dcp"]), DistInfo(rank=0, world_size=4))
    recipe = recipe_from_dict(_raw(), [*SETS, "train.checkpoint_format=dcp"])
    with pytest.raises(MoecptError, match="checkpoint_format = 'dcp' does not apply to distributed.sync = 'diloco'"
                       ) as e:
        Trainer(recipe, tmp_path / "run", show_progress=False, parallel=Distributed())
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_expert_parallel_is_refused():
    sync = build_sync(recipe_from_dict(_raw(), SETS), DistInfo(), torch.device("cpu"), simulate_workers=4)
    with pytest.raises(MoecptError, match="written with distributed.expert_parallel=2, but this run has "
                                          "expert_parallel=1") as e:
        sync.check_resume({"kind": "diloco", "workers": 4, "islands": 2, "island_sync": "ddp", "expert_parallel": 2})
    assert "\n" not in str(e.value)
    sync.check_resume({"kind": "diloco", "workers": 4, "islands": 2})  # written before the key: no EP
