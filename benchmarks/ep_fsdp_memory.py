"""Per-rank resident state under expert parallelism: EP × DDP (``ExpertParallelSync``) vs EP × FSDP2
(``ExpertParallelFSDPSync``), measured, next to ``moecpt plan``'s estimate.

Spawns ``--world`` gloo processes of this machine; each builds the ``--preset`` model (vocabulary 4096), sets up each
strategy with ``expert_parallel = --ep``, runs one forward / backward / AdamW step on one sequence, and counts the
bytes of its *local* tensors: parameters, gradients and AdamW moments (FSDP2's DTensor shards and the expert shards
as they lie on the rank). Rank 0 prints one JSON object: per strategy, every rank's counts and the plan's
``resident`` parameters and bytes (:func:`moecpt.distributed.plan.memory_per_rank`).

Run: ``.venv/bin/python benchmarks/ep_fsdp_memory.py [--world 4] [--ep 2] [--preset demo-switch]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moecpt.argtypes import positive_int
from moecpt.config import recipe_from_dict
from moecpt.distributed.expert_parallel import local_tensor
from moecpt.distributed.mesh import build_mesh
from moecpt.distributed.plan import memory_per_rank
from moecpt.distributed.runtime import build_sync
from moecpt.model.flops import model_stats
from moecpt.model.transformer import build_model
from moecpt.train.parallel import DistInfo, build_worker_optimizer
from moecpt.train.trainer import lm_loss

VOCAB, SEQ = 4096, 32


def _recipe(preset: str, world: int, ep: int, sync: str):
    return recipe_from_dict({
        "model": {"preset": preset, "vocab_size": VOCAB},
        "data": {"path": "demo", "mixture": {"english": 1.0}, "seq_len": SEQ},
        "train": {"batch_size": world, "device": "cpu"},
        "distributed": {"sync": sync, "expert_parallel": ep}})


def _nbytes(t: torch.Tensor) -> int:
    t = local_tensor(t)
    return t.numel() * t.element_size()


def _rank(rank: int, world: int, ep: int, preset: str, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = {}
    for kind in ("ddp", "fsdp"):
        recipe = _recipe(preset, world, ep, kind)
        sync = build_sync(recipe, DistInfo(rank=rank, world_size=world), torch.device("cpu"))
        torch.manual_seed(0)
        model = build_model(recipe.model)

        def make(m):
            return build_worker_optimizer(m, recipe, torch.device("cpu"))

        (w,) = sync.setup(model, make(model), make, None)
        x = torch.randint(0, VOCAB, (1, SEQ + 1), generator=torch.Generator().manual_seed(rank))
        with sync.grad_sync(w, True):
            lm_loss(w.module(x[:, :-1]), x[:, 1:]).backward()
        sync.after_backward([w])
        w.optimizer.step()
        params = list(model.parameters())
        mine = {"params": sum(local_tensor(p).numel() for p in params),
                "weights": sum(_nbytes(p) for p in params),
                "grads": sum(_nbytes(p.grad) for p in params if p.grad is not None),
                "moments": sum(_nbytes(v) for st in w.optimizer.state.values() for k, v in st.items() if k != "step")}
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            plan = memory_per_rank(recipe, recipe.model, model_stats(recipe.model, SEQ), build_mesh(recipe, world))
            out[f"ep_{kind}"] = {"measured_per_rank": every, "plan_resident": plan["resident"],
                                 "plan_bytes": {k: plan[k] for k in ("weights", "grads", "optimizer_state")}}
        dist.barrier()
    if rank == 0:
        print(json.dumps({"preset": preset, "world": world, "ep": ep, **out}, indent=1))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=positive_int, default=4)
    p.add_argument("--ep", type=positive_int, default=2)
    p.add_argument("--preset", default="demo-switch")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(a.world, a.ep, a.preset, os.path.join(tmp, "store")), nprocs=a.world)


if __name__ == "__main__":
    main()
