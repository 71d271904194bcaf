"""AdamW with a documented weight-decay split (Loshchilov & Hutter 2019).

Decayed: every matrix that multiplies activations (attention and FFN projections, expert weights, router weights,
the LM head). Not decayed: embeddings, norm gains and biases (OLMo 2, arXiv 2501.00656 Sec. 3.3, found decaying
embeddings harmful to stability; norms and biases are conventionally exempt). With tied embeddings the shared
table is an embedding and is not decayed.
"""

from __future__ import annotations

import torch
from torch import nn

from moecpt.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split ``model``'s trainable parameters into a decayed and a non-decayed group (see module docstring)."""
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in emb_ids or p.dim() < 2 or "norm" in name.rsplit(".", 2)[-2]:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with ``cfg``'s betas, eps and weight decay; the LR is set every step from the schedule.

    On CPU and CUDA the fused kernel runs (one pass over each parameter instead of ~10 elementwise ops per tensor),
    the fastest of the three implementations on the demo Granular MoE (``adamw_ms`` of ``benchmarks/components.py``;
    figures in ``benchmarks/README.md``). A resumed run keeps the choice its checkpoint was saved with
    (``load_state_dict`` restores it: exact resume); CPT resets it.
    """
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
    )
