"""Distributed training end to end: 2 CPU processes on gloo (FileStore rendezvous, loopback only), launched exactly
as torchrun launches ``python -m moecpt pretrain`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment), against
one process and the in-process simulator. Tiny models (smoke presets, seq 32, batch 8) on the bundled demo data.

* DDP = one process on the combined batch = FSDP2; local SGD with H = 1 = DDP with SGD;
* DiLoCo on 2 processes = the 2-worker simulator;
* byte counts = model size x the ring factor; only rank 0 writes; every rank's RNG is checkpointed;
* a worker killed mid-round: the other stops within a bounded time naming it, the last checkpoint is intact, and
  the same command resumes to the uninterrupted run's weights;
* a configuration that differs across ranks is refused at start-up, before anything is written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from island_helpers import logged
from test_trainer import raw_recipe, records, write_toml

from moecpt.cli import main as cli_main
from moecpt.config import recipe_from_dict
from moecpt.distributed.runtime import Distributed
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.trainer import Trainer

WORLD = 2
SGD_NO_CLIP = {"optim": {"lr": 0.05, "min_lr": 0.005, "grad_clip": 1e9}}  # clipping is per worker in local SGD
DDP_SETS = ["distributed.inner_optimizer=sgd"]
DILOCO_SETS = ["distributed.sync=diloco", "distributed.local_steps=2"]
DILOCO_STEPS = 24


# --------------------------------------------------------------------------------------------------- helpers
def _raw(**sections) -> dict:
    return raw_recipe("smoke-switch", **sections)


def launch(tmp: Path, recipe: Path, out: Path, sets: list[str], per_rank_sets: dict[int, list[str]] | None = None,
           world: int = WORLD) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``moecpt pretrain`` the way torchrun does, rendezvousing through a FileStore."""
    store = tmp / f"store-{uuid.uuid4().hex[:8]}"
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MOECPT_INIT_METHOD": f"file://{store}", "OMP_NUM_THREADS": "1"}
        extra = [a for s in [*sets, *(per_rank_sets or {}).get(rank, [])] for a in ("--set", s)]
        cmd = [sys.executable, "-m", "moecpt", "pretrain", "--recipe", str(recipe), "--out", str(out),
               "--no-progress", *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parent.parent))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out.append((p.returncode, so, se))
    return out


def wait_until_logged(rank0: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    """Wait until rank 0 has logged ``step`` in ``run/metrics.jsonl`` (or exited, or ``timeout`` passed)."""
    deadline = time.time() + timeout
    while time.time() < deadline and rank0.poll() is None:
        if logged(run, step):
            return
        time.sleep(0.02)


def kill_rank1_and_check_the_stop(procs: list[subprocess.Popen], out: Path, step: int) -> None:
    """Once rank 0 has logged ``step``, SIGKILL rank 1; rank 0 must stop within a bounded time with the one-line
    message that names rank 1 and says to run the same command again."""
    wait_until_logged(procs[0], out, step, timeout=90)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    (rc0, _, err0), (rc1, _, _) = finish(procs, timeout=60)
    stopped_after = time.time() - t_kill
    assert rc1 == -signal.SIGKILL, "the run finished before rank 1 could be killed"
    assert rc0 == 2, f"rank 0 should stop with a one-line error, got rc {rc0}:\n{err0[-2000:]}"
    assert "rank 1 stopped responding" in err0 and "run the same command again" in err0, err0[-2000:]
    assert stopped_after < 30  # bounded: gloo sees the closed connection, plus the diagnosis window


def run_job(tmp: Path, name: str, raw: dict, sets: list[str]) -> Path:
    recipe = write_toml(tmp / f"{name}.toml", raw)
    out = tmp / name
    results = finish(launch(tmp, recipe, out, sets))
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run).model_state()


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"max |difference| {worst:.3g} > {atol:g}"


def comm_summary(run: Path) -> dict:
    (rec,) = [r for r in records(run) if r.get("event") == "comm_summary"]
    return rec


def n_params(run: Path) -> int:
    from moecpt.train.checkpoint import load_model

    return sum(p.numel() for p in load_model(run).parameters())


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks (OMP_NUM_THREADS=1): same kernels, and faster on a busy box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("dist")
    ddp_raw = _raw(**SGD_NO_CLIP, train={"steps": 4, "checkpoint_every": 2})
    diloco_raw = _raw(train={"steps": DILOCO_STEPS, "checkpoint_every": 4, "log_every": 1})
    return {
        "tmp": tmp,
        "ddp_raw": ddp_raw,
        "ddp": run_job(tmp, "ddp", ddp_raw, DDP_SETS),
        "diloco_raw": diloco_raw,
        "diloco": run_job(tmp, "diloco", diloco_raw, DILOCO_SETS),
    }


# ----------------------------------------------------------------------------------------------------- tests
def test_ddp_equals_one_process_on_the_combined_batch(jobs):
    tmp = jobs["tmp"]
    raw = jobs["ddp_raw"]
    # the 2 ranks' 4-row halves are the 2 micro-batches of one process (the aux loss is per micro-batch / rank)
    single = recipe_from_dict({**raw, "train": {**raw["train"], "micro_batch_size": 4}}, DDP_SETS)
    Trainer(single, tmp / "single", show_progress=False).run()
    assert_close(weights(jobs["ddp"]), weights(tmp / "single"), atol=1e-6)
    # only rank 0 wrote: one record per step; losses are the mean over ranks = the single process's
    ddp_losses = [r["loss"] for r in records(jobs["ddp"]) if "lr" in r]
    one_losses = [r["loss"] for r in records(tmp / "single") if "lr" in r]
    assert ddp_losses == pytest.approx(one_losses, abs=1e-6)
    ck = load_checkpoint(jobs["ddp"])
    assert ck.meta["workers"] == 2 and ck.meta["sync"] == "ddp"
    assert len(ck.rng_state()["ranks"]) == 2  # every rank's RNG state


def test_fsdp_equals_ddp(jobs):
    """FSDP2 (fully_shard on a CPU device mesh, gloo) trains the same weights and, asked for the single-file layout,
    gathers ordinary checkpoints (its default DCP layout: tests/test_dcp_checkpoint.py)."""
    fsdp = run_job(jobs["tmp"], "fsdp", jobs["ddp_raw"], [*DDP_SETS, "distributed.sync=fsdp",
                                                          "train.checkpoint_format=single"])
    assert_close(weights(fsdp), weights(jobs["ddp"]), atol=1e-5)
    ck = load_checkpoint(fsdp)
    assert not ck.sharded and ck.meta["sync"] == "fsdp" and set(ck.optimizer_state()["state"]) == set(
        load_checkpoint(jobs["ddp"]).optimizer_state()["state"])  # index-keyed, as a plain run's


def test_local_sgd_with_h1_equals_ddp_with_sgd(jobs):
    tmp = jobs["tmp"]
    r = recipe_from_dict(jobs["ddp_raw"], [*DDP_SETS, "distributed.sync=local-sgd", "distributed.local_steps=1"])
    Trainer(r, tmp / "local-h1", show_progress=False, simulate_workers=2, parallel=Distributed()).run()
    assert_close(weights(tmp / "local-h1"), weights(jobs["ddp"]), atol=1e-5)


def test_diloco_on_two_processes_equals_the_simulator(jobs):
    tmp = jobs["tmp"]
    recipe = write_toml(tmp / "diloco-sim.toml", jobs["diloco_raw"])
    argv = ["pretrain", "--recipe", str(recipe), "--out", str(tmp / "diloco-sim"), "--no-progress",
            "--simulate-workers", "2", *[a for s in DILOCO_SETS for a in ("--set", s)]]
    assert cli_main(argv) == 0
    assert_close(weights(jobs["diloco"]), weights(tmp / "diloco-sim"), atol=1e-6)
    real, sim = comm_summary(jobs["diloco"]), comm_summary(tmp / "diloco-sim")
    assert real["by_kind"]["sync"]["bytes_sent"] == sim["by_kind"]["sync"]["bytes_sent"]
    assert [r["loss"] for r in records(jobs["diloco"]) if "lr" in r] == pytest.approx(
        [r["loss"] for r in records(tmp / "diloco-sim") if "lr" in r], abs=1e-6)  # worker 0's local losses


def test_byte_counts_are_the_model_size_times_the_ring_factor(jobs):
    ring = 2 * (WORLD - 1) / WORLD  # all-reduce: each worker sends (and receives) 2 (W-1)/W of the payload
    for run, kind, rounds in ((jobs["ddp"], "grads", 4), (jobs["diloco"], "sync", DILOCO_STEPS // 2)):
        model_bytes = 4 * n_params(run)  # fp32 gradients / deltas; no persistent buffers in a penalty-router MoE
        s = comm_summary(run)
        assert s["rounds"] == rounds
        k = s["by_kind"][kind]
        assert k["bytes_sent"] == k["bytes_received"] == rounds * ring * model_bytes
        assert all("comm_bytes" in r for r in records(run))  # every entry: train, validation, summary
        train = [r for r in records(run) if "lr" in r]
        assert all(a["comm_bytes"] < b["comm_bytes"] for a, b in zip(train, train[1:]) if a["comm_rounds"]
                   < b["comm_rounds"])
        assert train[-1]["comm_bytes"] == s["comm_bytes"]
    # H = 2: half the gradient traffic per token
    ddp, dil = comm_summary(jobs["ddp"]), comm_summary(jobs["diloco"])
    per_token = lambda s, kind: s["by_kind"][kind]["bytes_sent"] / (s["tokens"] / WORLD)  # noqa: E731
    assert per_token(ddp, "grads") == pytest.approx(2 * per_token(dil, "sync"))


def test_killed_worker_stops_the_other_and_the_same_command_resumes(jobs):
    tmp = jobs["tmp"]
    recipe = write_toml(tmp / "kill.toml", jobs["diloco_raw"])
    out = tmp / "kill"
    sets = [*DILOCO_SETS, "distributed.timeout_s=30"]
    kill_rank1_and_check_the_stop(launch(tmp, recipe, out, sets), out, step=5)  # mid-round 3
    ck = load_checkpoint(out)  # verified (sha256): the last complete checkpoint is intact
    assert 4 <= ck.step < DILOCO_STEPS
    for rank, (rc, _, err) in enumerate(finish(launch(tmp, recipe, out, sets))):
        assert rc == 0, f"resumed rank {rank} failed:\n{err[-2000:]}"
    assert load_checkpoint(out).step == DILOCO_STEPS
    assert_close(weights(out), weights(jobs["diloco"]), atol=1e-6)
    steps = [r["step"] for r in records(out) if "lr" in r]
    assert steps == list(range(1, DILOCO_STEPS + 1))  # the log continues from the checkpoint, no duplicates


def test_mismatched_configuration_is_refused_at_start_up(tmp_path):
    recipe = write_toml(tmp_path / "r.toml", _raw())
    out = tmp_path / "run"
    results = finish(launch(tmp_path, recipe, out, [], per_rank_sets={1: ["train.seed=7"]}), timeout=90)
    for rc, _, err in results:
        assert rc == 2, err[-2000:]
        assert "the configuration differs across ranks: recipe.train.seed is 0 on rank 0 but 7 on rank 1" in err
    assert not out.exists()  # refused before anything was written
