"""dots.llm1 (``dots1``).

**dots.llm1** (``dots1``) -- rednote-hilab 2025, "dots.llm1 Technical Report" (arXiv 2506.05767); model card
``rednote-hilab/dots.llm1.base``. The same routing, experts and dense first layers as GLM-4.5, with per-head q/k
norm always on, full RoPE and no attention biases (``attention_bias`` would also bias ``o_proj``: refused).
"""

from __future__ import annotations

from typing import Any, ClassVar

from moecpt.config import AttnKind, ModelConfig, QKNorm
from moecpt.interop.families.deepseek_routed import _DeepSeekRouted
from moecpt.interop.families.helpers import _hf_types, attn_kinds, hf_layer_types


class Dots1(_DeepSeekRouted):
    """dots.llm1 (rednote-hilab 2025, "dots.llm1 Technical Report", arXiv 2506.05767; ``rednote-hilab/dots.llm1.base``):
    DeepSeek-V3 routing with per-head q/k norm always on, full RoPE, no attention biases."""

    name = "dots1"
    model_types = ("dots1",)
    architecture = "Dots1ForCausalLM"
    reference = "rednote-hilab 2025, dots.llm1 Technical Report (arXiv 2506.05767); rednote-hilab/dots.llm1.base"
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "norm_topk_prob": False, "tie_word_embeddings": False,
        "initializer_range": 0.02, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0}
    qk_norm = QKNorm.HEAD

    def attention_layers(self, hf: dict, n_layers: int) -> tuple[int | None, list[AttnKind] | None]:
        """``layer_types``, else (transformers 5) sliding from layer ``max_window_layers`` on when a window is set."""
        w = hf.get("sliding_window")
        if not w:
            return None, None
        types = hf_layer_types(hf, self.name)
        if types is None:
            m = int(self.get(hf, "max_window_layers", 62))
            types = [AttnKind.SLIDING if i >= m else AttnKind.FULL for i in range(n_layers)]
        return int(w), types

    def window_why_not(self, cfg: ModelConfig) -> str | None:
        return None

    def routing_why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.rotary_fraction != 1.0:
            return f"dots1 rotates the whole head; this model has rotary_fraction = {cfg.rotary_fraction}"
        return super().routing_why_not(cfg)

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.qk_norm != QKNorm.HEAD:
            return f"dots1 always normalises q / k per head (qk_norm = 'head'), this model has {cfg.qk_norm.value!r}"
        if cfg.attn_bias:
            return "dots1's attention bias also covers the output projection; moecpt's q/k/v-only bias has no match"
        return super().why_not(cfg)

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        slides = AttnKind.SLIDING in attn_kinds(cfg)
        return {**super().hf_config_extra(cfg), "attention_bias": False,
                "sliding_window": cfg.sliding_window if slides else None, "max_window_layers": cfg.n_layers,
                "layer_types": _hf_types(cfg)}
