"""Helpers shared by the island and multi-process tests (tests/test_islands*.py, tests/test_ep_dcp.py): the
``moecpt pretrain`` argv, a run's logged losses, "has rank 0 logged step s yet", one-thread kernels, the per-tensor
relative difference the fp32 comparisons use, and the launch of tests/island_lopt_worker.py."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch
from test_trainer import records, write_toml

from moecpt.cli import main as cli_main
from moecpt.distributed.accounting import allgather_bytes
from moecpt.lopt.features import factored_dims
from moecpt.lopt.mlp import LOptSpec, init_meta_params
from moecpt.lopt.pretrained import save_weights


def pretrain_argv(recipe: Path, out: Path, sets: list[str], workers: int | None = None) -> list[str]:
    """``moecpt pretrain`` arguments for :func:`moecpt.cli.main` (``workers``: ``--simulate-workers``)."""
    sim = ["--simulate-workers", str(workers)] if workers else []
    return ["pretrain", "--recipe", str(recipe), "--out", str(out), "--no-progress", *sim,
            *[a for s in sets for a in ("--set", s)]]


def train_losses(run: Path) -> list[float]:
    """Every train record's loss, in log order (a resumed run continues the list)."""
    return [r["loss"] for r in records(run) if "lr" in r]


def losses_by_step(run: Path) -> dict[int, float]:
    """The train losses keyed by step (a step logged twice keeps its last record)."""
    return {r["step"]: r["loss"] for r in records(run) if "lr" in r}


def logged(run: Path, step: int) -> bool:
    """True once ``run/metrics.jsonl`` holds a record of ``step`` or later."""
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # whole lines: the last may be mid-write
    return any(json.loads(x).get("step", 0) >= step for x in lines if x.strip())


@contextlib.contextmanager
def single_thread():
    """Run in-process jobs on one thread, as the launched ranks (``OMP_NUM_THREADS=1``): the same kernels."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max |b|`` in fp32 (a tensor's difference relative to its scale)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


WORKER = Path(__file__).resolve().parent / "island_lopt_worker.py"


def launch_worker(tmp: Path, spec: dict, world: int = 4) -> list[subprocess.Popen]:
    """Start ``world`` ranks of tests/island_lopt_worker.py with ``spec`` as torchrun would (RANK / WORLD_SIZE /
    LOCAL_RANK, a FileStore rendezvous, one thread each); :func:`test_distributed.finish` collects them."""
    store = tmp / f"store-{uuid.uuid4().hex[:8]}"
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MOECPT_INIT_METHOD": f"file://{store}", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=WORKER.parent.parent))
    return procs


#: the learned outer optimizers of the island tests: LAgg-A for K = 2 (its initial meta-parameters) and LOpt-A
LEARNED = ("lagg", "lopt")
#: resumed at a round boundary: LAgg-A (gather mode and the accumulators); the worker's unit check round-trips
#: LOpt-A's state too
RESUMED = ("lagg",)


def learned_jobs(tmp: Path, raw: dict, ref_sets: list[str], sets: list[str], layout: str, steps: int) -> dict:
    """The learned-outer part of an island test: writes LAgg-A's K = 2 weights and a ``steps``-step recipe under
    ``tmp``, runs the references ``ddp-{lagg,lopt}`` (DDP inside islands, ``--simulate-workers 4``, in this
    process) and returns the worker's ``jobs`` / ``resume`` entries for ``{layout}-{name}`` (with ``sets``) and
    ``resumed-{name}`` (the job again from its second-to-last checkpoint)."""
    spec = LOptSpec("lagg-a", 2)
    save_weights(tmp / "lagg2.safetensors", spec, init_meta_params(spec, torch.Generator().manual_seed(0)))
    recipe = write_toml(tmp / "r-lopt.toml", raw)
    outer = {"lagg": [f"distributed.outer_optimizer={tmp / 'lagg2.safetensors'}"],
             "lopt": ["distributed.outer_optimizer=lopt-a"]}
    with single_thread():
        for name in LEARNED:
            assert cli_main(pretrain_argv(recipe, tmp / f"ddp-{name}", [*ref_sets, *outer[name]], workers=4)) == 0
    return {"jobs": [[str(recipe), str(tmp / f"{layout}-{n}"), [*sets, *outer[n]]] for n in LEARNED],
            "resume": [[str(recipe), str(tmp / f"{layout}-{n}"), str(tmp / f"resumed-{n}"), steps, [*sets, *outer[n]]]
                       for n in RESUMED]}


def outer_gather_bytes(shapes: list[tuple[int, ...]], channels: int, ranks: int) -> int:
    """What one rank sends per round gathering whole tensors for a learned outer step on dim-0 pieces
    (:mod:`moecpt.distributed.lopt_shards`): per tensor of ``shape`` (cut over ``ranks``), its rows of θ, Δ
    (``channels``: 1, or K for LAgg-A), momentum x3, second moment and Adafactor's diag x3, or its row / column
    vectors x3 unless the dim they reduce is dim 0, padded to ``ceil(d0 / ranks)`` rows."""
    total = 0
    for shape in shapes:
        rest = math.prod(shape[1:])
        cols = rest * (1 + channels + 3 + 1)
        fd = factored_dims(shape)
        if fd is None:
            cols += 3 * rest
        for reduced in fd or ():
            if reduced != 0:
                cols += 3 * math.prod(1 if d == reduced else n for d, n in enumerate(shape) if d > 0)
        total += allgather_bytes(4 * -(-shape[0] // ranks) * cols, ranks)
    return total


def outer_state(run: Path) -> dict[str, torch.Tensor]:
    """The outer optimizer's state in ``run``'s newest checkpoint (the learned accumulators as ``acc.*``)."""
    from moecpt.train.checkpoint import load_checkpoint

    return load_checkpoint(run).optimizer_state()["moecpt_sync"]["outer"]


def assert_resumed_identically(run: Path, resumed: Path, steps: int) -> None:
    """``resumed`` (a resume of ``run``'s job from an earlier checkpoint) ends where ``run`` did, bit for bit: every
    step logged once with the same loss, the same weights and the same outer-optimizer state."""
    from moecpt.train.checkpoint import load_checkpoint

    assert load_checkpoint(resumed).step == steps
    assert sorted(losses_by_step(resumed)) == list(range(1, steps + 1))
    assert losses_by_step(resumed) == losses_by_step(run)
    wa, wb = load_checkpoint(resumed).model_state(), load_checkpoint(run).model_state()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert_same_state(outer_state(resumed), outer_state(run))


def assert_learned_outer_matches(run: Path, ref: Path, rounds: int, rtol: float, loss_rtol: float) -> None:
    """``run`` (a learned outer optimizer on sharded islands) ends where ``ref`` (the same on DDP islands) did: every
    tensor within ``rtol`` (per tensor, max |difference| over max |value|), the losses within ``loss_rtol``, and the
    learned accumulators gathered back whole: the same keys, shapes and round, within 10 ``rtol``."""
    import pytest

    from moecpt.train.checkpoint import load_checkpoint

    a, b = load_checkpoint(run).model_state(), load_checkpoint(ref).model_state()
    assert a.keys() == b.keys()
    worst = max(rel_diff(a[k], b[k]) for k in a)
    assert worst <= rtol, f"max relative difference {worst:.3g}"
    assert train_losses(run) == pytest.approx(train_losses(ref), rel=loss_rtol)
    sa, sb = outer_state(run), outer_state(ref)
    assert sa.keys() == sb.keys() and int(sa["t"]) == int(sb["t"]) == rounds
    acc = [k for k in sa if k.startswith("acc.")]
    assert acc
    for k in acc:
        assert sa[k].shape == sb[k].shape and rel_diff(sa[k], sb[k]) <= 10 * rtol, k


def assert_same_state(a, b, path: str = "") -> None:
    """Two nested checkpoint states (dicts, lists, tensors, numbers) are equal: the same keys (``int`` and ``str``
    keys alike), the same values, every tensor bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict), path
        sa, sb = {str(k): v for k, v in a.items()}, {str(k): v for k, v in b.items()}
        assert sa.keys() == sb.keys(), f"{path}: {sorted(sa.keys() ^ sb.keys())[:5]}"
        for k in sa:
            assert_same_state(sa[k], sb[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
