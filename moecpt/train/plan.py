"""The plan of a run, for ``moecpt pretrain / cpt --dry-run``: what it will train, what it will hold in memory and
how long it will take, computed without creating or claiming the run folder. The memory formulas here are the one
source of truth; ``moecpt plan`` (:mod:`moecpt.distributed.plan`) applies them to each rank's share of a mesh.

Parameters and FLOPs come from :func:`moecpt.model.flops.model_stats` (total and *active* parameters; training
FLOPs per token as in PaLM, Chowdhery et al. 2022, App. B). Memory per process (:func:`state_bytes`,
:func:`activation_bytes`):

* weights, gradients: fp32, 4 bytes per parameter each; optimizer state: AdamW's two fp32 moments (8 bytes per
  parameter; none for ``distributed.inner_optimizer = "sgd"``). Under FSDP each rank holds ``1 / world`` of them; K
  simulated workers hold K copies. The local-SGD family's outer state (an anchor copy of the weights, and for
  SlowMo / DiLoCo a momentum buffer) comes on top: ``--dry-run`` does not count it, ``moecpt plan`` does.
* activations of one micro-batch, an estimate: ``34 s b h`` bytes per layer for 16-bit activations (Korthikanti et
  al. 2022, arXiv 2205.05198, eq. 1, without the ``5 a s^2 b`` attention-score term, which
  ``scaled_dot_product_attention`` does not keep), doubled for fp32, plus the fp32 logits, log-softmax and logit
  gradient of :func:`moecpt.storage.preflight.logit_bytes`; with ``train.activation_checkpointing`` only what
  the backward does not recompute (:func:`activation_bytes`). The dense-block formula is used for MoE blocks too
  (an approximation).

The time estimate is the median of a few timed optimizer steps (the first, a warm-up, excluded) times the steps
left; evaluations and checkpoints are not included.
"""

from __future__ import annotations

import statistics
from typing import Any

from moecpt.config import ActivationCheckpointing, InnerOptimizer, ModelConfig, Recipe, SyncKind
from moecpt.storage.preflight import logit_bytes
from moecpt.train.perf import mfu

#: bytes per parameter of the fp32 weights, and of their fp32 gradients
WEIGHT_BYTES = GRAD_BYTES = 4
#: bytes per parameter of the inner optimizer's state: AdamW's two fp32 moments; plain SGD keeps none
MOMENT_BYTES = {InnerOptimizer.ADAMW: 8, InnerOptimizer.SGD: 0}


def state_bytes(resident_params: int, inner: InnerOptimizer, copies: int = 1) -> dict[str, int]:
    """``weights``, ``grads`` and ``optimizer_state`` bytes of ``copies`` replicas of ``resident_params``
    parameters held by one process (its share under sharding: ZeRO-3's ``(2 + 2 + K) Psi / N_d`` accounting,
    Rajbhandari et al. 2019, arXiv 1910.02054, Sec. 5, with moecpt's fp32 weights and grads)."""
    return {"weights": WEIGHT_BYTES * resident_params * copies, "grads": GRAD_BYTES * resident_params * copies,
            "optimizer_state": MOMENT_BYTES[inner] * resident_params * copies}


def activation_bytes(model_cfg: ModelConfig, seq_len: int, micro: int, bf16: bool,
                     checkpointing: ActivationCheckpointing = ActivationCheckpointing.NONE) -> int:
    """Activation bytes of one training micro-batch of ``micro`` sequences of ``seq_len`` tokens (module doc:
    Korthikanti et al. 2022, eq. 1, without the attention-score term, plus the fp32 logits).

    With ``train.activation_checkpointing`` (Korthikanti et al., Sec. 4.1 and Table 2): ``full`` keeps each block's
    input (``2 s b h``) and recomputes one block at a time (its ``34 s b h`` on top); ``moe-only`` drops the FFN
    share of an MoE block (the ``19 s b h`` of eq. 1's MLP) and recomputes one MoE FFN at a time. Doubled for fp32.
    """
    sbh = seq_len * micro * model_cfg.d_model * (1 if bf16 else 2)
    L = model_cfg.n_layers
    if checkpointing == ActivationCheckpointing.FULL:
        blocks = L * 2 * sbh + 34 * sbh
    elif checkpointing == ActivationCheckpointing.MOE_ONLY:
        moe = sum(model_cfg.is_moe_layer(i) for i in range(L))
        blocks = L * 34 * sbh - moe * 19 * sbh + (19 * sbh if moe else 0)
    else:
        blocks = L * 34 * sbh
    return blocks + logit_bytes(micro, seq_len, model_cfg.vocab_size)


def memory_plan(recipe: Recipe, model_cfg: ModelConfig, total_params: int, micro: int, workers: int,
                world_size: int, bf16: bool) -> dict[str, int]:
    """Bytes per process: ``weights``, ``grads``, ``optimizer_state``, ``activations`` (estimate) and ``total``
    (see the module doc for what each counts)."""
    resident = total_params // world_size if recipe.distributed.sync == SyncKind.FSDP else total_params
    out = {**state_bytes(resident, recipe.distributed.inner_optimizer, workers),
           "activations": activation_bytes(model_cfg, recipe.data.seq_len, micro, bf16,
                                           recipe.train.activation_checkpointing)}
    out["total"] = sum(out.values())
    return out


def run_plan(recipe: Recipe, stats: dict[str, Any], memory: dict[str, int], start_step: int, end_step: int,
             step_times_s: list[float], peak_flops: float | None, devices: int) -> dict[str, Any]:
    """The plan record ``--dry-run`` prints.

    Args:
        recipe: the validated recipe.
        stats: :func:`moecpt.model.flops.model_stats` of the run's model at ``data.seq_len``.
        memory: :func:`memory_plan`.
        start_step, end_step: the step the run would start from (a resumed run: its checkpoint's) and stop at.
        step_times_s: wall seconds of the timed steps, in order (the first is a warm-up and is dropped when there
            are more).
        peak_flops: one device's peak FLOP/s (:mod:`moecpt.train.perf`), None when unknown.
        devices: devices of the job (its ranks).
    """
    tcfg = recipe.train
    tokens_per_step = tcfg.batch_size * recipe.data.seq_len
    timed = step_times_s[1:] if len(step_times_s) > 1 else step_times_s
    step_s = statistics.median(timed)
    left = max(0, end_step - start_step)
    mixture = {k: v for k, v in recipe.data.mixture.items() if v > 0}
    norm = sum(mixture.values())
    tps = tokens_per_step / step_s if step_s > 0 else None
    flops_per_token = float(stats["train_flops_per_token"])
    return {
        "dry_run": True,
        "params": {"total": int(stats["total_params"]), "active": int(stats["active_params"]),
                   "embedding": int(stats["embedding_params"]), "expert": int(stats["expert_params"])},
        "train_flops_per_token": flops_per_token,
        "memory_bytes": memory,
        "steps": {"start": start_step, "end": end_step, "left": left},
        "tokens": {"per_step": tokens_per_step, "total": end_step * tokens_per_step, "left": left * tokens_per_step,
                   "per_source": {k: round(end_step * tokens_per_step * v / norm) for k, v in mixture.items()}},
        "train_flops": flops_per_token * left * tokens_per_step,
        "timing": {"timed_steps": len(timed), "step_time_s": step_s, "tokens_per_s": tps,
                   "mfu": mfu(flops_per_token, tps, peak_flops, devices),
                   "estimated_time_s": step_s * left},
    }
