"""The plan of a run, for ``moecpt pretrain / cpt --dry-run``: what it will train, what it will hold in memory and
how long it will take, computed without creating or claiming the run folder.

Parameters and FLOPs come from :func:`moecpt.model.flops.model_stats` (total and *active* parameters; training
FLOPs per token as in PaLM, Chowdhery et al. 2022, App. B). Memory per process:

* weights, gradients: fp32, 4 bytes per parameter each; optimizer state: AdamW's two fp32 moments (8 bytes per
  parameter; none for ``distributed.inner_optimizer = "sgd"``). Under FSDP each rank holds ``1 / world`` of them; K
  simulated workers hold K copies. The local-SGD family's outer state (an anchor copy of the weights, and for
  SlowMo / DiLoCo a momentum buffer) comes on top and is not counted.
* activations of one micro-batch, an estimate: ``34 s b h`` bytes per layer for 16-bit activations (Korthikanti et
  al. 2022, arXiv 2205.05198, eq. 1, without the ``5 a s^2 b`` attention-score term, which
  ``scaled_dot_product_attention`` does not keep), doubled for fp32, plus the fp32 logits, log-softmax and logit
  gradient of :func:`moecpt.storage.preflight.training_memory_bytes`. The dense-block formula is used for MoE
  blocks too (an approximation).

The time estimate is the median of a few timed optimizer steps (the first, a warm-up, excluded) times the steps
left; evaluations and checkpoints are not included.
"""

from __future__ import annotations

import statistics
from typing import Any

from moecpt.config import ModelConfig, Recipe, SyncKind
from moecpt.train.perf import mfu


def memory_plan(recipe: Recipe, model_cfg: ModelConfig, total_params: int, micro: int, workers: int,
                world_size: int, bf16: bool) -> dict[str, int]:
    """Bytes per process: ``weights``, ``grads``, ``optimizer_state``, ``activations`` (estimate) and ``total``
    (see the module doc for what each counts)."""
    resident = total_params // world_size if recipe.distributed.sync == SyncKind.FSDP else total_params
    moments = 0 if recipe.distributed.inner_optimizer == "sgd" else 8
    T, V = recipe.data.seq_len, model_cfg.vocab_size
    per_layer = 34 * T * micro * model_cfg.d_model * (1 if bf16 else 2)
    out = {"weights": 4 * resident * workers, "grads": 4 * resident * workers,
           "optimizer_state": moments * resident * workers,
           "activations": model_cfg.n_layers * per_layer + 3 * 4 * micro * T * V}
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
