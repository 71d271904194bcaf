"""One rank of the expert-parallel equivalence check (launched by tests/test_expert_parallel.py, ``WORLD`` ranks).

For every case every rank builds the same full model, runs the *single-process reference* on the global batch (the
DDP objective: the mean over ranks of each rank's ``CE + aux`` on its own rows), then the same model under
:class:`~moecpt.distributed.ep_sync.ExpertParallelSync` with ``expert_parallel = EP`` on its own rows, and checks
logits, loss, every gradient, the global gradient norm, the summed bias loads, the all-to-all byte count, one AdamW
step and the gathered checkpoint against the reference. Prints ``ok <case>`` per case; any mismatch raises.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_recipes import raw_recipe  # noqa: E402

from moecpt.config import recipe_from_dict  # noqa: E402
from moecpt.distributed.ep_sync import A2A, ExpertParallelSync  # noqa: E402
from moecpt.distributed.expert_parallel import expected_a2a_bytes  # noqa: E402
from moecpt.distributed.mesh import build_mesh  # noqa: E402
from moecpt.model.transformer import build_model  # noqa: E402
from moecpt.train.metrics import RoutingAccumulator  # noqa: E402
from moecpt.train.parallel import DistInfo, SingleSync, StepStats, build_worker_optimizer  # noqa: E402
from moecpt.train.reduce import Metric, ReduceType  # noqa: E402
from moecpt.train.trainer import lm_loss  # noqa: E402

GRANULAR = {"preset": "smoke-granular", "moe": {"num_experts": 32, "top_k": 3, "granularity": 4,
                                                "num_shared_experts": 1}}
#: name -> (model section, all tokens forced onto EP rank 0's first expert, padded bmm layout for the experts,
#: activation checkpointing)
CASES = {
    "switch-penalty": ({"preset": "smoke-switch"}, False, False, None),
    "granular-shared-penalty": (GRANULAR, False, False, None),
    "granular-shared-padded": (GRANULAR, False, True, None),
    "switch-sinkhorn": ({"preset": "smoke-switch", "moe": {"router": {"kind": "sinkhorn"}}}, False, False, None),
    "granular-bias-sigmoid": ({**GRANULAR, "moe": {**GRANULAR["moe"], "router": {
        "kind": "bias", "score_fn": "sigmoid", "bias_update_rate": 0.01}}}, False, False, None),
    "switch-capacity": ({"preset": "smoke-switch", "moe": {"capacity_factor": 1.0}}, False, False, None),
    "switch-bias-all-to-rank0": ({"preset": "smoke-switch", "moe": {"router": {"kind": "bias"}}}, True, False, None),
    # the replayed forward exchanges again in the backward, in the same order on every rank (one rank gets no row)
    "all-to-rank0-moe-only-ckpt": ({"preset": "smoke-switch", "moe": {"router": {"kind": "bias"}}}, True, False,
                                   "moe-only"),
    "granular-full-ckpt": (GRANULAR, False, False, "full"),
}
#: on a DP x EP mesh (EP < world: the expert-DP all-reduce) these cases suffice; the rest test the dispatch itself
MESH_CASES = ("switch-penalty", "granular-shared-penalty", "granular-bias-sigmoid", "switch-bias-all-to-rank0")
ROWS, SEQ, VOCAB = 2, 16, 97
TOL = dict(atol=2e-5, rtol=1e-4)


def rank_loss(model, rows):
    logits, routing = model(rows[:, :-1], return_routing=True)
    aux = sum((o.weighted_aux_loss() for o in routing), logits.new_zeros(())) / len(routing)
    return logits, lm_loss(logits, rows[:, 1:]) + aux


def run_case(name: str, model_raw: dict, force: bool, padded: bool, ckpt: str | None, info: DistInfo,
             ep: int) -> None:
    W, rank = info.world_size, info.rank
    model_raw = {**model_raw, "vocab_size": VOCAB, "max_seq_len": SEQ}
    recipe = recipe_from_dict(raw_recipe(model=model_raw, train={"batch_size": ROWS * W},
                                         distributed={"expert_parallel": ep}))
    mesh = build_mesh(recipe, W)
    torch.manual_seed(1)
    full = build_model(recipe.model)
    if force:  # a selection bias that sends every token to expert 0 (EP rank 0); the rest get none
        for r in full.routers():
            r.expert_bias.zero_()[0] = 100.0
    for b in full.blocks:
        b.ffn.use_grouped_mm = False if padded else None  # None: torch._grouped_mm where it runs
    full.set_activation_checkpointing(ckpt or "none")
    batch = torch.randint(0, VOCAB, (ROWS * W, SEQ), generator=torch.Generator().manual_seed(2))
    mine = batch[rank * ROWS:(rank + 1) * ROWS]

    ref = copy.deepcopy(full)  # the single process on the global batch
    for r in range(W):
        logits_r, loss_r = rank_loss(ref, batch[r * ROWS:(r + 1) * ROWS])
        (loss_r / W).backward()
        if r == rank:
            ref_logits, ref_loss = logits_r.detach(), loss_r.detach()
    ref_norm = SingleSync(recipe, DistInfo()).grad_norm(ref, None)

    model = copy.deepcopy(full)
    dev = torch.device("cpu")
    sync = ExpertParallelSync(recipe, info, W, 1, dev, mesh=mesh, timeout_s=60)
    (w,) = sync.setup(model, build_worker_optimizer(model, recipe, dev),
                      lambda m: build_worker_optimizer(m, recipe, dev), None)
    local = model.blocks[0].ffn.experts.local_experts
    lo = sync.ep_index * local
    with sync.grad_sync(w, last=True):
        logits, loss = rank_loss(w.module, mine)
        loss.backward()
    sync.after_backward([w])
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss.detach(), ref_loss, **TOL)
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        want = ref_params[pname].grad
        if pname in sync.expert_names:
            assert p.shape[0] == local, (pname, p.shape)
            want = want[lo:lo + local]
        torch.testing.assert_close(p.grad, want, **TOL, msg=lambda m, pname=pname: f"{name} {pname}: {m}")
    assert abs(sync.grad_norm(model, None) - ref_norm) <= 1e-4 * ref_norm, name

    # bias-router loads: summed over every rank that routed tokens = the single process's counts
    scalars = {"loss": Metric(float(loss.detach()), ReduceType.MEAN), "aux_loss": Metric(0.0, ReduceType.MEAN)}
    stats = [StepStats(scalars, RoutingAccumulator())]
    _, loads, _ = sync.reduce_step([w], stats, log=False)
    biased = [r for r in ref.routers() if r.is_bias_balanced]
    assert len(loads or []) == len(biased), name
    for got, r in zip(loads or [], biased):
        torch.testing.assert_close(got, r.step_load)

    # the all-to-all bytes: my kept slots routed to a peer go out (dispatch) and the rows peers sent me go back
    # (combine), each twice with the backward; plus one count exchange per layer
    D = recipe.model.d_model
    with torch.no_grad():
        _, routing = full(mine[:, :-1], return_routing=True)
    to_rank = torch.zeros(W, dtype=torch.long)  # my kept slots per destination (global rank)
    group0 = rank - sync.ep_index
    for o in routing:
        kept = o.topk_idx_TK[o.topk_weight_TK != 0] if recipe.model.moe.capacity_factor else o.topk_idx_TK
        to_rank[group0:group0 + ep] += torch.bincount(kept.reshape(-1) // local, minlength=ep)
    to_rank[rank] = 0
    every = [torch.zeros_like(to_rank) for _ in range(W)]
    dist.all_gather(every, to_rank)
    slots_in = int(sum(t[rank] for t in every))
    counts = len(routing) * (ep - 1) * local * 8
    sent = sync.acct.kinds[A2A]["bytes_sent"]
    fwd = 2 if ckpt else 1  # a replayed forward exchanges its counts and tokens again
    want = expected_a2a_bytes(int(to_rank.sum()), slots_in, D, torch.float32) * (fwd + 1) // 2 + fwd * counts
    assert sent == want, (name, sent, want)

    # one AdamW step, then the gathered single-file checkpoint = the reference's state
    ref_opt = build_worker_optimizer(ref, recipe, dev)
    ref_opt.step()
    w.optimizer.step()
    model_state, opt_state, _ = sync.checkpoint_state([w])
    if info.is_main:
        want = ref.state_dict()
        assert model_state.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(model_state[k], want[k], **TOL, msg=lambda m, k=k: f"{name} {k}: {m}")
        want_opt = ref_opt.state_dict()["state"]
        for i, st in want_opt.items():
            for k, v in st.items():
                torch.testing.assert_close(opt_state["state"][i][k], v, **TOL)
    print(f"ok {name}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ["MOECPT_INIT_METHOD"], rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, backend="gloo")
    eps = [int(x) for x in os.environ["EP_SIZES"].split(",")]
    for ep in eps:
        for name, (model_raw, force, padded, ckpt) in CASES.items():
            if ep < world and name not in MESH_CASES:
                continue
            run_case(f"{name}@ep{ep}", model_raw, force, padded, ckpt, info, ep)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
