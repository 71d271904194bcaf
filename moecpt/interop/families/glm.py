"""GLM-4.5 (``glm4_moe``).

**GLM-4.5** (``glm4_moe``) -- GLM-4.5 Team 2025, "GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation
Models" (arXiv 2508.06471); model cards ``zai-org/GLM-4.5``, ``zai-org/GLM-4.5-Air``. DeepSeek-V3 routing
(DeepSeek-AI 2024, arXiv 2412.19437, Sec. 2.1.2): sigmoid scores, ``e_score_correction_bias`` for selection only
(moecpt ``router.kind = "bias"``, ``expert_bias``), group-limited top-k, ``norm_topk_prob``,
``routed_scaling_factor``; ``n_shared_experts`` ungated shared experts; the first ``first_k_dense_replace``
layers dense; partial RoPE (``partial_rotary_factor``, half-rotation on the first dims, as moecpt), q/k/v biases
(``attention_bias``), optional per-head q/k norm (``use_qk_norm``). Its multi-token-prediction layers
(``num_nextn_predict_layers``) are dropped on import with a note.
"""

from __future__ import annotations

from typing import Any, ClassVar

from moecpt.config import ModelConfig, QKNorm
from moecpt.interop.families.deepseek_routed import _DeepSeekRouted


class Glm4Moe(_DeepSeekRouted):
    """GLM-4.5 / GLM-4.5-Air (GLM-4.5 Team 2025, arXiv 2508.06471; ``zai-org/GLM-4.5-Air``): DeepSeek-V3 routing
    with partial RoPE, q/k/v biases, optional per-head q/k norm and multi-token-prediction layers."""

    name = "glm4_moe"
    model_types = ("glm4_moe",)
    architecture = "Glm4MoeForCausalLM"
    reference = ("GLM-4.5 Team 2025, GLM-4.5 (arXiv 2508.06471); zai-org/GLM-4.5-Air; routing of DeepSeek-V3 "
                 "(arXiv 2412.19437)")
    #: transformers' Glm4MoeConfig defaults (``partial_rotary_factor`` 0.5 is its backward-compatible default)
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "n_routed_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "tie_word_embeddings": False, "initializer_range": 0.02, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "n_shared_experts": 1, "routed_scaling_factor": 1.0, "n_group": 1,
        "topk_group": 1, "first_k_dense_replace": 1, "use_qk_norm": False, "attention_bias": False,
        "partial_rotary_factor": 0.5, "num_nextn_predict_layers": 0}

    def attn_bias(self, hf: dict) -> bool:
        return bool(self.get(hf, "attention_bias"))  # q/k/v only (o_proj has none), as moecpt's attn_bias

    def qk_norm_of(self, hf: dict) -> QKNorm:
        return QKNorm.HEAD if self.get(hf, "use_qk_norm") else QKNorm.NONE

    def rotary_fraction(self, hf: dict) -> float:
        rope = hf.get("rope_parameters")
        inner = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
        return float(inner if inner is not None else self.get(hf, "partial_rotary_factor"))

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.qk_norm == QKNorm.FULL:
            return "GLM-4.5's q/k norm is per head (qk_norm = 'head'); this model has 'full'"
        return super().why_not(cfg)

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**super().hf_config_extra(cfg), "use_qk_norm": cfg.qk_norm == QKNorm.HEAD,
                "attention_bias": cfg.attn_bias, "partial_rotary_factor": cfg.rotary_fraction,
                "num_nextn_predict_layers": 0}
