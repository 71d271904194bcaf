"""One rank of the learned-outer-optimizer checks of tests/test_islands_fsdp.py and tests/test_islands_ep.py.

Launched ``WORLD_SIZE`` times by :func:`island_helpers.launch_worker` (the environment torchrun sets, a FileStore
rendezvous). It joins the default process group once and runs ``moecpt pretrain`` several times inside it (the
session leaves a group it did not create alone), so a test pays the ranks' start-up once for all its jobs:

* every job of ``jobs`` (``[recipe, out, sets]``), in order;
* then every ``resume`` entry ``[recipe, src, dst, step, sets]``: rank 0 copies the finished run ``src`` to ``dst``
  and deletes its checkpoint of ``step`` (the newest), and every rank runs ``src``'s command again on ``dst``: it
  resumes from the checkpoint before and trains to the end.

With ``"unit": true`` it first checks the learned step on pieces against the whole-tensor one on the same random
tensors (:func:`unit`, bit for bit). Argument: one JSON object ``{"unit": bool, "jobs": [...], "resume": [...]}``.
Exits 0, or non-zero with the failing job named.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from island_helpers import pretrain_argv  # noqa: E402

from moecpt.cli import main as cli_main  # noqa: E402
from moecpt.distributed.lopt_shards import Dim0Cut, ShardedLearnedOuter  # noqa: E402
from moecpt.lopt import LearnedOuterOptimizer, LOptSpec, load_pretrained  # noqa: E402
from moecpt.lopt.mlp import init_meta_params  # noqa: E402

#: (shape, what it exercises): FSDP2's torch.chunk cut of dim 0 over 2 ranks
UNIT_SHAPES = [
    ((6, 4), "d0 = dim 0: Adafactor's row vector whole on every rank, col cut"),
    ((3, 8), "dim 1 the largest: row and col both cut; 3 rows: pieces of 2 and 1"),
    ((4, 5, 6), "an expert tensor [E, d, f]"),
    ((5,), "1-D: diag accumulators, pieces of 3 and 2"),
    ((1, 7), "one row: the second rank's piece is empty"),
]


def unit(rank: int) -> None:
    """The learned step on pieces = on whole tensors, bit for bit, given the same inputs: every rank builds the same
    parameters and deltas, the island pair (ranks 0-1, 2-3) steps its ``torch.chunk`` pieces 3 rounds with
    :class:`ShardedLearnedOuter` (the state saved whole and loaded into a new one after round 2) against
    :class:`LearnedOuterOptimizer` on the whole tensors; LAgg-A (K = 2) and LOpt-A."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group, index = groups[rank // 2], rank % 2
    spec = LOptSpec("lagg-a", 2)
    for name, make in [("lagg-a", lambda: LearnedOuterOptimizer(spec, init_meta_params(
                            spec, torch.Generator().manual_seed(0)))),
                       ("lopt-a", lambda: load_pretrained("lopt-a", workers=2))]:
        gen = torch.Generator().manual_seed(1)
        shapes = [s for s, _ in UNIT_SHAPES]
        whole = [torch.randn(s, generator=gen) for s in shapes]
        cuts = [Dim0Cut.chunked(group, 2, index, s) for s in shapes]
        mine = [w.narrow(0, c.start, c.rows).clone() for w, c in zip(whole, cuts)]
        ref, sharded = make(), ShardedLearnedOuter(make(), cuts, lambda kind, sent, t0: None)
        sharded.bind(mine)
        for r in range(3):
            lead = (2,) if ref.needs_worker_deltas else ()
            deltas = [1e-2 * torch.randn(*lead, *s, generator=gen) for s in shapes]
            dim = 1 if ref.needs_worker_deltas else 0
            ref.step(whole, deltas)
            sharded.step(mine, [d.narrow(dim, c.start, c.rows) for d, c in zip(deltas, cuts)])
            for i, (w, m, c) in enumerate(zip(whole, mine, cuts)):
                assert torch.equal(w.narrow(0, c.start, c.rows), m), f"{name} round {r} tensor {i} ({shapes[i]})"
            full, want = sharded.full_state_dict(), ref.state_dict()
            assert full.keys() == want.keys(), (name, sorted(full), sorted(want))
            for k in want:
                assert torch.equal(full[k], want[k]), f"{name} round {r}: {k}"
            if r == 1:  # a resume: the whole state cut again by a new optimizer
                sharded = ShardedLearnedOuter(make(), cuts, lambda kind, sent, t0: None)
                sharded.bind(mine)
                sharded.load_full_state_dict(full)
        print(f"ok unit {name}", flush=True)


def main() -> int:
    spec = json.loads(sys.argv[1])
    dist.init_process_group("gloo", init_method=os.environ["MOECPT_INIT_METHOD"], rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    if spec.get("unit"):
        unit(rank)
    for recipe, out, sets in spec.get("jobs", []):
        if cli_main(pretrain_argv(Path(recipe), Path(out), sets)) != 0:
            print(f"job {out} failed on rank {rank}", file=sys.stderr)
            return 1
    for recipe, src, dst, step, sets in spec.get("resume", []):
        if rank == 0:
            shutil.copytree(src, dst)
            shutil.rmtree(Path(dst) / "checkpoints" / f"step_{step:08d}")
        dist.barrier()
        if cli_main(pretrain_argv(Path(recipe), Path(dst), sets)) != 0:
            print(f"resume {dst} failed on rank {rank}", file=sys.stderr)
            return 1
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
