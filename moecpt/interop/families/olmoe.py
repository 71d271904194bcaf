"""OLMoE (``olmoe``).

**OLMoE** -- Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models" (arXiv 2409.02060);
model card ``allenai/OLMoE-1B-7B-0924``. Softmax top-k *without* renormalisation (``norm_topk_prob`` false),
RMSNorm over the whole q / k projections (moecpt ``qk_norm = "full"``), every layer MoE, no shared expert.
"""

from __future__ import annotations

from typing import Any, ClassVar

from moecpt.config import ModelConfig, QKNorm
from moecpt.interop.families.base import Family
from moecpt.interop.families.helpers import _all_moe, _renorm, _shared_width


class OLMoE(Family):
    """OLMoE (Muennighoff et al. 2024, arXiv 2409.02060; ``allenai/OLMoE-1B-7B-0924``)."""

    name = "olmoe"
    model_types = ("olmoe",)
    architecture = "OlmoeForCausalLM"
    reference = "Muennighoff et al. 2024, OLMoE (arXiv 2409.02060); allenai/OLMoE-1B-7B-0924"
    num_experts_key = "num_experts"
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "initializer_range": 0.02, "intermediate_size": 1024}
    qk_norm = QKNorm.FULL

    def check(self, hf: dict) -> None:
        if hf.get("clip_qkv") is not None:
            raise self._fail(f"clip_qkv = {hf['clip_qkv']} (clamping q/k/v) is not supported by moecpt")

    def head_dim(self, hf: dict, d_model: int, n_heads: int) -> int:
        if d_model % n_heads:
            raise self._fail(f"hidden_size {d_model} is not divisible by num_attention_heads {n_heads}")
        return d_model // n_heads  # OLMoE ignores head_dim: its q-norm spans hidden_size

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.qk_norm != QKNorm.FULL:
            return ("OLMoE always normalises the full q / k projections (qk_norm = 'full'), this model has "
                    f"{cfg.qk_norm.value!r}")
        if _shared_width(cfg):
            return "OLMoE has no shared expert"
        if cfg.attn_bias:
            return "OLMoE's attention bias also covers the output projection; moecpt's q/k/v-only bias has no match"
        if not _all_moe(cfg):
            return "OLMoE makes every layer MoE; this model has dense layers"
        if cfg.resolved_head_dim * cfg.n_heads != cfg.d_model:
            return "OLMoE needs n_heads * head_dim == d_model"
        return None

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        return {"intermediate_size": cfg.resolved_expert_width, "norm_topk_prob": _renorm(cfg),
                "attention_bias": False, "clip_qkv": None}
