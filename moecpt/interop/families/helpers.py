"""What the families share besides :class:`~moecpt.interop.families.base.Family`: attention windows and
``layer_types``, transformers' ``rope_parameters`` of a moecpt model, MoE layouts, and the small export checks
(renormalised gates, every layer MoE, shared width, zero shared experts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moecpt.config import AttnKind, ModelConfig, MoELayout
from moecpt.errors import MoecptError


def _yarn_params(cfg: ModelConfig) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` of ``cfg`` (default, or YaRN from ``cfg.rope_yarn``)."""
    if cfg.rope_yarn is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    y = cfg.rope_yarn
    out = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": y.factor, "beta_fast": y.beta_fast,
           "beta_slow": y.beta_slow, "truncate": y.truncate,
           "original_max_position_embeddings": y.original_max_position_embeddings}
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(y, key) is not None:
            out[key] = getattr(y, key)
    return out


def _layout_of(moe_mask: list[bool]) -> dict[str, Any] | None:
    """moecpt layout fields that make exactly the layers of ``moe_mask`` MoE, or None."""
    n = len(moe_mask)
    if all(moe_mask):
        return {"layout": MoELayout.EVERY.value}
    for step in range(2, n + 1):
        if moe_mask == [(i + 1) % step == 0 for i in range(n)]:
            return {"layout": MoELayout.EVERY_NTH.value, "every_n": step}
    first = moe_mask.index(True) if any(moe_mask) else n
    if first < n and moe_mask == [i >= first for i in range(n)]:
        return {"layout": MoELayout.AFTER_DENSE.value, "first_dense": first}
    return None


def attn_kinds(cfg: ModelConfig) -> list[AttnKind]:
    """Every layer's attention kind (``full`` / ``sliding``) of ``cfg``."""
    return [AttnKind.FULL if cfg.window_of(i) is None else AttnKind.SLIDING for i in range(cfg.n_layers)]


_HF_KINDS = {"full_attention": AttnKind.FULL, "sliding_attention": AttnKind.SLIDING}


def hf_layer_types(hf: dict, family: str) -> list[AttnKind] | None:
    """transformers' ``layer_types`` of ``hf`` as :class:`AttnKind` (None when the config has none).

    Raises:
        MoecptError: a kind other than full / sliding attention, or not one per layer.
    """
    types = hf.get("layer_types")
    if types is None:
        return None
    bad = sorted({t for t in types if t not in _HF_KINDS})
    if bad:
        raise MoecptError(f"{family} config: layer_types {bad} are not supported (full_attention and "
                          "sliding_attention are)")
    if len(types) != int(hf["num_hidden_layers"]):
        raise MoecptError(f"{family} config: layer_types has {len(types)} entries for num_hidden_layers = "
                          f"{hf['num_hidden_layers']}; give one per layer")
    return [_HF_KINDS[t] for t in types]


def _hf_types(cfg: ModelConfig) -> list[str]:
    return [{AttnKind.FULL: "full_attention", AttnKind.SLIDING: "sliding_attention"}[t] for t in attn_kinds(cfg)]


def _normal_windows(window: int | None, types: list[AttnKind] | None) -> tuple[int | None, list[AttnKind] | None]:
    """One spelling per attention pattern: no window when no layer slides, ``layer_types = None`` when all do."""
    if window is None or (types is not None and AttnKind.SLIDING not in types):
        return None, None
    if types is None or all(t == AttnKind.SLIDING for t in types):
        return window, None
    return window, types


def _uniform_window_why_not(name: str, cfg: ModelConfig) -> str | None:
    """For families with one window for every layer or none (Mixtral, Qwen3-MoE)."""
    kinds = attn_kinds(cfg)
    if AttnKind.SLIDING in kinds and AttnKind.FULL in kinds:
        return f"{name} windows every layer or none; this model mixes full and sliding layers (layer_types)"
    return None


def _common_why_not(cfg: ModelConfig) -> str | None:
    moe = cfg.moe
    if moe is None:
        return "it is a dense model; export-hf writes MoE families only"
    if moe.capacity_factor is not None:
        return (f"moe.capacity_factor = {moe.capacity_factor} drops tokens (Switch capacity), which no Hugging Face "
                "MoE family does")
    return None


def _renorm(cfg: ModelConfig) -> bool:
    """Whether moecpt renormalises the top-k gates (it never does for k = 1)."""
    return bool(cfg.moe and cfg.moe.router.renormalize and cfg.moe.top_k > 1)


def _all_moe(cfg: ModelConfig) -> bool:
    return all(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def _synth_zero_shared(synth: dict[str, Callable], layers: list[int], D: int, F: int) -> None:
    """Synthesise, at each MoE layer of ``layers``, a shared expert of width ``F`` whose projections are zero: it
    adds exactly 0, for a family that always has one."""
    for i in layers:
        synth[f"blocks.{i}.ffn.shared.w_in.weight"] = lambda get: torch.zeros(2 * F, D)
        synth[f"blocks.{i}.ffn.shared.w_out.weight"] = lambda get: torch.zeros(D, F)


def _shared_width(cfg: ModelConfig) -> int:
    moe = cfg.moe
    return (moe.shared_expert_width or moe.num_shared_experts * cfg.resolved_expert_width) if moe else 0
