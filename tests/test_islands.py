"""Hierarchical DiLoCo across islands (moecpt.distributed.islands): one 4-process gloo job of 2 islands × 2 ranks,
launched as torchrun launches ``python -m moecpt pretrain``, against the in-process simulator.

* the job is killed mid-run (rank 3): the other ranks stop in bounded time naming it; the same command resumes, and
  the resumed job equals ``--simulate-workers 4`` with ``islands = 2`` bit for bit (weights, losses, byte counters),
  so resume = the uninterrupted run as well;
* the byte counters per link equal their analytic values, and the emulated link delays only the inter-island one;
* a learned aggregator (LAgg-A for K = 2) runs on 2 islands of 2 ranks and equals 2 flat workers whose two
  micro-batches are the island's two ranks;
* the one-line refusals at the CLI.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch
from island_helpers import pretrain_argv, single_thread, train_losses
from test_distributed import assert_close, comm_summary, finish, launch, n_params, wait_until_logged, weights
from test_trainer import raw_recipe, records, write_toml

from moecpt.cli import main as cli_main
from moecpt.config import recipe_from_dict
from moecpt.distributed.accounting import allgather_bytes, allreduce_bytes
from moecpt.distributed.runtime import Distributed, build_sync
from moecpt.lopt.mlp import LOptSpec, init_meta_params
from moecpt.lopt.pretrained import save_weights
from moecpt.train.parallel import DistInfo
from moecpt.train.trainer import Trainer

STEPS, H, LATENCY_MS = 8, 2, 200
SETS = ["distributed.sync=diloco", f"distributed.local_steps={H}", "distributed.islands=2", "distributed.timeout_s=30"]
SLOW = [f"distributed.emulate_latency_ms={LATENCY_MS}"]  # the simulator only: it changes no number


def _raw(**train) -> dict:
    return raw_recipe("smoke-switch", train={"steps": STEPS, "checkpoint_every": 4, "log_every": 1, **train})


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The simulator, and the real job killed at step >= 5 then resumed by the same command."""
    tmp = tmp_path_factory.mktemp("islands")
    recipe = write_toml(tmp / "r.toml", _raw())
    assert cli_main(pretrain_argv(recipe, tmp / "sim", [*SETS, *SLOW], workers=4)) == 0

    out = tmp / "real"
    procs = launch(tmp, recipe, out, SETS, world=4)
    wait_until_logged(procs[0], out, 5)  # mid-round 3, past the checkpoint of step 4
    procs[3].send_signal(signal.SIGKILL)
    t_kill = time.time()
    killed = finish(procs, timeout=60)
    stopped_after = time.time() - t_kill
    resumed = finish(launch(tmp, recipe, out, SETS, world=4), timeout=150)
    return {"tmp": tmp, "recipe": recipe, "sim": tmp / "sim", "real": out, "killed": killed,
            "stopped_after": stopped_after, "resumed": resumed}


def test_killed_rank_stops_the_others_and_the_same_command_resumes(runs):
    (rc0, _, err0), *_, (rc3, _, _) = runs["killed"]
    assert rc3 == -signal.SIGKILL
    assert rc0 == 2, f"rank 0 should stop with a one-line error, got rc {rc0}:\n{err0[-2000:]}"
    assert "rank 3 stopped responding" in err0 and "run the same command again" in err0, err0[-2000:]
    assert runs["stopped_after"] < 30
    for rank, (rc, _, err) in enumerate(runs["killed"][:3]):  # every survivor stops with the one-line message
        assert rc == 2 and "rank 3 stopped responding" in err, f"rank {rank}: rc {rc}\n{err[-2000:]}"
    for rank, (rc, _, err) in enumerate(runs["resumed"]):
        assert rc == 0, f"resumed rank {rank} failed:\n{err[-2000:]}"
    assert [r["step"] for r in records(runs["real"]) if "lr" in r] == list(range(1, STEPS + 1))


def test_two_islands_of_two_ranks_equal_the_simulator_bit_for_bit(runs):
    real, sim = runs["real"], runs["sim"]
    assert_close(weights(real), weights(sim), atol=0.0)
    assert train_losses(real) == train_losses(sim)  # island 0's mean loss, every step
    a, b = comm_summary(real), comm_summary(sim)
    for key in ("rounds", "bytes_intra_island", "bytes_inter_island", "bytes_inter_island_per_round"):
        assert a[key] == b[key], key
    assert {k: v["bytes_sent"] for k, v in a["by_kind"].items()} == {k: v["bytes_sent"] for k, v in
                                                                    b["by_kind"].items()}


def test_byte_counters_per_link_equal_their_analytic_values(runs):
    n = n_params(runs["real"])  # fp32 deltas and gradients; a penalty-router MoE has no persistent buffers
    shard = 4 * -(-n // 2)  # each rank's half of the flat delta
    rounds = STEPS // H
    s = comm_summary(runs["real"])
    k = s["by_kind"]
    assert s["rounds"] == rounds
    assert k["sync"]["bytes_sent"] == rounds * allreduce_bytes(shard, 2)  # = shard: M = 2
    assert k["island_gather"]["bytes_sent"] == rounds * allgather_bytes(shard, 2)
    assert k["grads"]["bytes_sent"] == STEPS * allreduce_bytes(4 * n, 2)  # DDP inside the island, every step
    both = lambda kind: 2 * k[kind]["bytes_sent"]  # noqa: E731  (sent + received)
    assert s["bytes_inter_island"] == both("sync") == rounds * 2 * shard  # half of a flat 4-worker ring
    assert s["bytes_intra_island"] == both("grads") + both("stats") + both("island_gather")
    assert s["bytes_inter_island_per_round"] == 2 * shard
    train = [r for r in records(runs["real"]) if "lr" in r]
    assert [r["bytes_inter_island"] for r in train] == [r["comm_rounds"] * 2 * shard for r in train]
    # the emulated link is the slow one between islands: it delays the rounds, not the every-step traffic
    sim = comm_summary(runs["sim"])["by_kind"]
    per_collective = {kind: v["time_s"] / v["collectives"] for kind, v in sim.items()}
    assert per_collective["sync"] >= LATENCY_MS / 1e3
    assert max(per_collective[kind] for kind in ("grads", "stats", "island_gather")) < LATENCY_MS / 2e3, sim


def test_learned_aggregator_runs_with_k_equal_to_the_islands(runs, one_thread):
    """LAgg-A for K = 2 on 2 islands of 2 simulated ranks = on 2 flat workers, each island's two ranks being the
    flat worker's two micro-batches (DDP's average over ranks = gradient accumulation, up to rounding)."""
    tmp = runs["tmp"]
    spec = LOptSpec("lagg-a", 2)
    save_weights(tmp / "lagg2.safetensors", spec, init_meta_params(spec, torch.Generator().manual_seed(0)))
    raw = _raw(steps=2, checkpoint_every=2)
    sets = ["distributed.sync=diloco", f"distributed.local_steps={H}",
            f"distributed.outer_optimizer={tmp / 'lagg2.safetensors'}"]
    isl = recipe_from_dict(raw, [*sets, "distributed.islands=2"])
    sync = build_sync(isl, DistInfo(), torch.device("cpu"), simulate_workers=4)
    assert sync.outer.needs_worker_deltas and sync.outer_workers == 2
    Trainer(isl, tmp / "lagg-islands", show_progress=False, simulate_workers=4, parallel=Distributed()).run()
    flat = recipe_from_dict({**raw, "train": {**raw["train"], "micro_batch_size": 2}}, sets)
    Trainer(flat, tmp / "lagg-flat", show_progress=False, simulate_workers=2, parallel=Distributed()).run()
    assert_close(weights(tmp / "lagg-islands"), weights(tmp / "lagg-flat"), atol=1e-5)
    # the shipped LAgg-A (K = 8) runs on 8 islands of any size
    eight = recipe_from_dict(raw, ["distributed.sync=diloco", "distributed.local_steps=2", "distributed.islands=8",
                                   "distributed.outer_optimizer=lagg-a", "train.batch_size=16"])
    assert build_sync(eight, DistInfo(), torch.device("cpu"), simulate_workers=16).outer_workers == 8


@pytest.mark.parametrize("sets, workers, needle", [
    (["distributed.islands=3"], 4, "distributed.islands=3 does not divide the 4 ranks"),
    (["distributed.islands=2", "distributed.island_sync=fsdp"], 4, "island_sync = 'fsdp' cannot be simulated"),
    (["distributed.islands=2", "distributed.outer_optimizer=lagg-a"], 4, "for K=8 workers, not K=2"),
    (["distributed.islands=2", "distributed.sync=ddp"], 4, "needs sync = local-sgd, slowmo or diloco"),
])
def test_one_line_refusals_at_the_cli(tmp_path, capsys, sets, workers, needle):
    recipe = write_toml(tmp_path / "r.toml", _raw())
    out = tmp_path / "run"
    assert cli_main(pretrain_argv(recipe, out, ["distributed.sync=diloco", "distributed.local_steps=2", *sets],
                          workers)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not out.exists()
