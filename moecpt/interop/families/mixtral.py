"""Mixtral (``mixtral``).

**Mixtral** -- Jiang et al. 2024, "Mixtral of Experts" (arXiv 2401.04088); model card
``mistralai/Mixtral-8x7B-v0.1``. Softmax over the top-k logits, i.e. softmax top-k *renormalised*; no q/k norm;
tensors under ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down).
"""

from __future__ import annotations

from typing import Any, ClassVar

from moecpt.config import AttnKind, ModelConfig, QKNorm
from moecpt.interop.families.base import Family
from moecpt.interop.families.helpers import _all_moe, _renorm, _shared_width, _uniform_window_why_not, attn_kinds


class Mixtral(Family):
    """Mixtral (Jiang et al. 2024, arXiv 2401.04088; ``mistralai/Mixtral-8x7B-v0.1``)."""

    name = "mixtral"
    model_types = ("mixtral",)
    architecture = "MixtralForCausalLM"
    reference = "Jiang et al. 2024, Mixtral of Experts (arXiv 2401.04088); mistralai/Mixtral-8x7B-v0.1"
    moe_block = "block_sparse_moe"
    expert_proj = ("w1", "w3", "w2")
    num_experts_key = "num_local_experts"
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "initializer_range": 0.02,
        "intermediate_size": 14336}

    def renormalize(self, hf: dict) -> bool:
        return True  # softmax over the top-k logits == softmax top-k renormalised

    def attention_layers(self, hf: dict, n_layers: int) -> tuple[int | None, list[AttnKind] | None]:
        w = hf.get("sliding_window")
        return (int(w) if w else None), None  # one window for every layer

    def window_why_not(self, cfg: ModelConfig) -> str | None:
        return _uniform_window_why_not(self.name, cfg)

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.qk_norm != QKNorm.NONE:
            return f"Mixtral has no q/k norm, this model has qk_norm = {cfg.qk_norm.value!r}"
        if _shared_width(cfg):
            return "Mixtral has no shared expert"
        if cfg.attn_bias:
            return "Mixtral has no attention biases"
        if not _all_moe(cfg):
            return "Mixtral makes every layer MoE; this model has dense layers"
        if not _renorm(cfg):
            return "Mixtral always renormalises the top-k gates (k > 1); this model does not"
        return None

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"intermediate_size": cfg.resolved_expert_width, "head_dim": cfg.resolved_head_dim,
                "sliding_window": cfg.sliding_window if AttnKind.SLIDING in attn_kinds(cfg) else None,
                "router_jitter_noise": 0.0}
