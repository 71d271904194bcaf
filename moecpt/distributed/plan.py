"""The memory and communication plan of a job on a mesh, before it runs (``moecpt plan``): pure arithmetic over a
:class:`~moecpt.config.Recipe`, its resolved model and a :class:`~moecpt.distributed.mesh.Mesh`.

Notation: ``P`` parameters, of which ``P_e`` are routed-expert weights (:func:`moecpt.model.flops.model_stats`'s
``expert_params``; shared experts and routers are not) and ``P_n = P − P_e``; a world of ``W = M · S`` ranks in
``M`` islands of ``S = D · E`` ranks (``E`` expert-parallel, ``D`` expert-data-parallel; :mod:`.mesh`).

**Layout of a step.** ``sync = ddp | fsdp`` synchronise the whole world every step (``S = W``). The local-SGD family
(``local-sgd | slowmo | diloco``) with ``islands = 1`` makes every rank its own worker (no per-step traffic,
``K = W`` workers in the outer round); with ``islands = M > 1`` the island synchronises every step with
``island_sync`` and the outer round runs across islands (``K = M``).

**Parameters resident on one rank** (what its weights, gradients and optimizer moments cover):

* DDP (or a worker of its own): ``P_n + P_e / E`` (experts split over the EP group, the rest replicated);
* FSDP with ``E > 1``: ``P_n / S + P_e / E``: ZeRO-3 sharding (Rajbhandari et al., arXiv 1910.02054, Sec. 5.3) of the
  non-expert part over the island (as torchtitan shards the dense part over ``dp_shard_cp``, EP ranks included),
  each expert shard whole on its ``D`` expert-data-parallel ranks (:mod:`moecpt.distributed.ep_fsdp`; torchtitan
  also shards it over ``dp_shard_mod_ep``, which moecpt does not); with ``E = 1`` plain FSDP, ``P / S``.

**Bytes per rank** (:mod:`moecpt.train.plan`, the formulas ``--dry-run`` uses too): weights and gradients fp32
(4 + 4 bytes per resident parameter), AdamW's two fp32 moments (8; none for ``inner_optimizer = "sgd"``); ZeRO's
``(2 + 2 + K) Psi / N_d`` with moecpt's fp32 weights. The local-SGD family's outer state, per resident parameter:
the fp32 anchor ``θ`` (4), the outer momentum (4 for ``sgd`` with momentum > 0 and ``nesterov``; 16 for the learned
``lagg-a`` / ``lopt-a``: three momenta and a second moment, their small factored accumulators not counted) and the
flat fp32 delta of the round (4; ``K × 4`` in gather mode, LAgg-A). FSDP also holds the largest unit (a decoder
block, or the root: embedding, final norm, head) unsharded while it computes: its fp32 weights and gradients, ``8 ×``
its parameters (with ``E > 1`` its non-expert part only: the expert shard is resident, never gathered); the
prefetched next unit is not counted. Activations of one micro-batch:
Korthikanti et al. (arXiv 2205.05198, eq. 1) ``34 s b h`` per layer at 16 bits, without the attention scores SDPA
does not keep, plus the fp32 logits, less what activation checkpointing recomputes
(:func:`moecpt.train.plan.activation_bytes`); ``b`` is the per-rank micro-batch (every rank reads
``batch_size / W`` rows, EP included). Under EP with a balanced router each rank's experts see as
many token slots as without EP, so the estimate is the same (a skewed router concentrates them). The dense-block
``34 s b h`` is low for MoE blocks (their ``top_k`` expert activations per token): on the ``demo-*`` models autograd
saves 1.2x (dense) to 1.7x (Granular) of the estimate. The peak is the sum. ``train.dtype = "auto"`` is planned
as bf16 unless ``train.device = "cpu"`` (the plan is of a GPU job).

**Communication per rank** (ring volumes, NCCL's bus-bandwidth convention, :mod:`.accounting`): an all-reduce of
``n`` bytes sends ``2 (G − 1) / G · n`` over a group of ``G``, an all-gather or reduce-scatter ``(G − 1) / G · n``.

* DDP, per step: gradients all-reduced, ``2 (S − 1) / S · 4 P_n`` over the island plus ``2 (D − 1) / D · 4 P_e / E``
  over the expert-data-parallel group;
* FSDP, per step: an all-gather in the forward, another in the backward and a reduce-scatter of the gradients
  (ZeRO-3's ``3 Psi``, Sec. 7.2.2): with ``E = 1`` ``3 (S − 1) / S · 4 P``; with ``E > 1`` that of the non-expert
  part, ``3 (S − 1) / S · 4 P_n``, plus the expert gradients all-reduced over the expert-data-parallel group as
  under DDP, ``2 (D − 1) / D · 4 P_e / E``;
* EP all-to-all, per step: each MoE layer dispatches every token's ``top_k`` slots to their experts and combines
  them back, in the forward and again (their gradients) in the backward; with uniform routing a share
  ``(E − 1) / E`` leaves the rank::

      4 · L_moe · (batch_size / W) · seq_len · top_k · d_model · bytes · (E − 1) / E

  (``bytes`` 2 in bf16, 4 in fp32; 6 instead of 4 with activation checkpointing, which repeats the forward's
  dispatch and combine; times ``capacity_factor`` when set: the padded slots travel too). GShard (Lepikhin et al.,
  arXiv 2006.16668) and Switch (Fedus et al., arXiv 2101.03961, Sec. 2.2) dispatch this way.
* Outer round (every ``H = local_steps`` steps), across the ``K`` workers: the fp32 pseudo-gradient of the rank's
  resident parameters all-reduced, ``2 (K − 1) / K · 4 P_res`` (gather mode: all-gathered, ``(K − 1) · 4 P_res``);
  per step, that over ``H``. The expert biases travel with it (a few floats; not counted), as does the per-step
  loss / router-load all-reduce of every-step modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moecpt.config import ActivationCheckpointing, DType, InnerOptimizer, ModelConfig, Recipe, SyncKind
from moecpt.distributed.accounting import allgather_bytes, allreduce_bytes, fsdp_step_bytes
from moecpt.distributed.mesh import LOCAL_KINDS, Mesh
from moecpt.errors import MoecptError
from moecpt.train.plan import GRAD_BYTES, WEIGHT_BYTES, activation_bytes, state_bytes

#: outer optimizers that keep a momentum-sized state per parameter beyond the anchor, in fp32 copies
LEARNED_OUTER_COPIES = 4  # LOpt-A / LAgg-A: momenta at three decays and one second moment (moecpt.lopt.features)
GATHER_OUTER = ("lagg-a",)  # read every worker's delta (an all-gather round); a weight file is planned in mean mode


@dataclass(frozen=True)
class StepLayout:
    """How one rank synchronises: ``step`` is ``"ddp"``, ``"fsdp"`` or ``"none"`` (a worker of its own) over
    ``group`` ranks every step; ``outer`` the local-SGD-family sync (None for ddp / fsdp) over ``workers`` ranks
    every ``local_steps`` steps."""

    step: str
    group: int
    outer: str | None
    workers: int
    local_steps: int


def step_layout(recipe: Recipe, mesh: Mesh) -> StepLayout:
    """The :class:`StepLayout` of ``recipe`` on ``mesh`` (module doc, "Layout of a step")."""
    d = recipe.distributed
    if d.sync not in LOCAL_KINDS:
        return StepLayout(d.sync.value, mesh.island_size, None, 1, 1)
    if mesh.islands == 1:
        return StepLayout("none", 1, d.sync.value, mesh.world, d.local_steps)
    return StepLayout(d.island_sync.value, mesh.island_size, d.sync.value, mesh.islands, d.local_steps)


def resident_params(stats: dict[str, Any], mesh: Mesh, layout: StepLayout) -> dict[str, int]:
    """Parameters one rank holds: ``{"expert", "non_expert", "total"}`` (module doc; shards rounded up)."""
    p_e, p_n = int(stats["expert_params"]), int(stats["total_params"]) - int(stats["expert_params"])
    expert = -(-p_e // mesh.ep)
    if layout.step == SyncKind.FSDP:
        non_expert = -(-p_n // layout.group)
        if mesh.ep == 1:  # plain FSDP shards the experts too; with EP the shard stays whole (ep_fsdp)
            expert = -(-expert // mesh.dp)
    else:
        non_expert = p_n
    return {"expert": expert, "non_expert": non_expert, "total": expert + non_expert}


def planned_bf16(recipe: Recipe) -> bool:
    """Whether the plan counts 16-bit activations: ``train.dtype = "bf16"``, or ``"auto"`` off the CPU."""
    t = recipe.train
    return t.dtype == DType.BF16 or (t.dtype == DType.AUTO and t.device != "cpu")


def rows_per_rank(recipe: Recipe, mesh: Mesh) -> tuple[int, int]:
    """``(rows, micro)``: sequences each rank reads per step and its micro-batch.

    Raises:
        MoecptError: ``train.micro_batch_size`` does not divide the rows of a rank.
    """
    rows = recipe.train.batch_size // mesh.world
    micro = min(recipe.train.micro_batch_size or rows, rows)
    if rows % micro:
        raise MoecptError(f"train.micro_batch_size={micro} does not divide the {rows} sequences each of the "
                          f"{mesh.world} ranks reads per step; choose a divisor of {rows}")
    return rows, micro


def outer_state_bytes(recipe: Recipe, resident: int, layout: StepLayout) -> dict[str, int]:
    """The local-SGD family's outer state on one rank: ``anchor``, ``momentum`` and ``delta`` bytes (zeros for
    ddp / fsdp; module doc)."""
    if layout.outer is None:
        return {"anchor": 0, "momentum": 0, "delta": 0}
    name, _, momentum = recipe.distributed.outer()
    if name in ("lagg-a", "lopt-a") or name.endswith(".safetensors"):
        copies = LEARNED_OUTER_COPIES
    else:
        copies = 1 if name == "nesterov" or momentum > 0 else 0
    deltas = layout.workers if name in GATHER_OUTER else 1
    return {"anchor": WEIGHT_BYTES * resident, "momentum": 4 * copies * resident, "delta": 4 * deltas * resident}


def fsdp_gathered_bytes(stats: dict[str, Any], mesh: Mesh) -> int:
    """FSDP's largest unit held unsharded (fp32 weights and gradients; module doc): with EP the block's expert
    shard is FSDP2-ignored (resident, counted there), so only its non-expert part is gathered."""
    block = int(stats["max_block_params"])
    if mesh.ep > 1:
        block -= int(stats["max_block_expert_params"])
    return (WEIGHT_BYTES + GRAD_BYTES) * max(block, int(stats["non_block_params"]))


def memory_per_rank(recipe: Recipe, model_cfg: ModelConfig, stats: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Bytes one rank holds: ``weights``, ``grads``, ``optimizer_state``, ``outer_state``, ``fsdp_gathered``,
    ``activations`` and their sum ``total``, plus ``outer_parts`` (anchor, momentum, delta) and the ``resident``
    parameter counts (module doc)."""
    layout = step_layout(recipe, mesh)
    res = resident_params(stats, mesh, layout)
    _, micro = rows_per_rank(recipe, mesh)
    outer = outer_state_bytes(recipe, res["total"], layout)
    out: dict[str, Any] = {**state_bytes(res["total"], recipe.distributed.inner_optimizer),
                           "outer_state": sum(outer.values()),
                           "fsdp_gathered": fsdp_gathered_bytes(stats, mesh) if layout.step == SyncKind.FSDP else 0,
                           "activations": activation_bytes(model_cfg, recipe.data.seq_len, micro,
                                                           planned_bf16(recipe), recipe.train.activation_checkpointing)}
    out["total"] = sum(out.values())
    return {**out, "outer_parts": outer, "resident": res, "micro_batch": micro}


def all_to_all_bytes(recipe: Recipe, model_cfg: ModelConfig, stats: dict[str, Any], mesh: Mesh) -> int:
    """EP all-to-all bytes one rank sends per step (dispatch + combine, forward and backward; module doc)."""
    if mesh.ep == 1:
        return 0
    rows, _ = rows_per_rank(recipe, mesh)
    moe = model_cfg.moe
    passes = 4 if recipe.train.activation_checkpointing == ActivationCheckpointing.NONE else 6
    act = 2 if planned_bf16(recipe) else 4
    slots = rows * recipe.data.seq_len * moe.top_k * (moe.capacity_factor or 1.0)
    return int(passes * int(stats["moe_layers"]) * slots * model_cfg.d_model * act * (mesh.ep - 1) / mesh.ep)


def grad_sync_bytes(stats: dict[str, Any], mesh: Mesh, layout: StepLayout) -> int:
    """Per-step gradient traffic of one rank inside its island (DDP all-reduce, or FSDP's two all-gathers and
    reduce-scatter; module doc)."""
    if layout.step == "none":
        return 0
    p_e = -(-int(stats["expert_params"]) // mesh.ep)
    p_n = int(stats["total_params"]) - int(stats["expert_params"])
    if layout.step == SyncKind.DDP:
        return allreduce_bytes(GRAD_BYTES * p_n, layout.group) + allreduce_bytes(GRAD_BYTES * p_e, mesh.dp)
    if mesh.ep == 1:  # plain FSDP: the experts are parameters like the others, the estimate the run records
        return fsdp_step_bytes(GRAD_BYTES * (p_n + p_e), layout.group)
    # EP x FSDP2 (ep_fsdp): the non-experts sharded over the group, the EP shards averaged as under DDP
    return fsdp_step_bytes(GRAD_BYTES * p_n, layout.group) + allreduce_bytes(GRAD_BYTES * p_e, mesh.dp)


def comm_per_rank(recipe: Recipe, model_cfg: ModelConfig, stats: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Bytes one rank sends, by link: ``per_step`` (``island``: gradient sync; ``ep``: all-to-all;
    ``cross_island``: the outer round spread over its ``H`` steps; ``total``) and ``per_round`` (the outer
    round's bytes, 0 without one). What it receives is as much."""
    layout = step_layout(recipe, mesh)
    res = resident_params(stats, mesh, layout)["total"]
    round_bytes = 0
    if layout.outer is not None:
        name = recipe.distributed.outer()[0]
        collective = allgather_bytes if name in GATHER_OUTER else allreduce_bytes
        round_bytes = collective(4 * res, layout.workers)
    step = {"island": grad_sync_bytes(stats, mesh, layout),
            "ep": all_to_all_bytes(recipe, model_cfg, stats, mesh),
            "cross_island": round_bytes // layout.local_steps}
    step["total"] = sum(step.values())
    return {"per_step": step, "per_round": round_bytes}


def job_plan(recipe: Recipe, model_cfg: ModelConfig, stats: dict[str, Any], mesh: Mesh,
             gpu_memory_bytes: int | None = None) -> dict[str, Any]:
    """The record ``moecpt plan`` prints: the mesh and its layout, parameters, memory and communication per rank,
    and (given ``gpu_memory_bytes``) whether the peak fits."""
    layout = step_layout(recipe, mesh)
    memory = memory_per_rank(recipe, model_cfg, stats, mesh)
    inner = recipe.distributed.inner_optimizer
    fits = None
    if gpu_memory_bytes is not None:
        fits = {"gpu_memory_bytes": gpu_memory_bytes, "fits": memory["total"] <= gpu_memory_bytes,
                "headroom_bytes": gpu_memory_bytes - memory["total"]}
    total, expert = int(stats["total_params"]), int(stats["expert_params"])
    return {
        "recipe": recipe.name,
        "mesh": {"world": mesh.world, "islands": mesh.islands, "island_size": mesh.island_size, "dp": mesh.dp,
                 "ep": mesh.ep},
        "layout": {"step": layout.step, "step_group": layout.group, "outer": layout.outer,
                   "outer_workers": layout.workers if layout.outer else None,
                   "local_steps": layout.local_steps if layout.outer else None,
                   "inner_optimizer": InnerOptimizer(inner).value, "bf16": planned_bf16(recipe),
                   "rows_per_rank": rows_per_rank(recipe, mesh)[0], "micro_batch": memory.pop("micro_batch")},
        "params": {"total": total, "active": int(stats["active_params"]), "expert": expert,
                   "non_expert": total - expert, "per_rank": memory.pop("resident")},
        "memory_bytes": memory,
        "comm_bytes": comm_per_rank(recipe, model_cfg, stats, mesh),
        "fits": fits,
    }
