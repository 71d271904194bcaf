"""The Qwen MoE families: Qwen2-MoE (``qwen2_moe``) and Qwen3-MoE (``qwen3_moe``).

* **Qwen2-MoE** -- Qwen team 2024, "Qwen1.5-MoE: Matching 7B Model Performance with 1/3 Activated Parameters"
  (blog) and "Qwen2 Technical Report" (arXiv 2407.10671); model cards ``Qwen/Qwen1.5-MoE-A2.7B``,
  ``Qwen/Qwen2-57B-A14B``. Fine-grained experts plus one always-on shared expert scaled by ``sigmoid(w . x)``
  (moecpt ``moe.shared_expert_gate``), biases on q/k/v, ``norm_topk_prob`` from the config; dense layers through
  ``decoder_sparse_step`` / ``mlp_only_layers``.
* **Qwen3-MoE** -- Qwen team 2025, "Qwen3 Technical Report" (arXiv 2505.09388); model card
  ``Qwen/Qwen3-30B-A3B``. As Qwen2-MoE without the shared expert and the q/k/v biases, plus per-head RMSNorm on
  queries and keys (moecpt ``qk_norm = "head"``); ``norm_topk_prob`` true in the released models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from moecpt.config import AttnKind, ModelConfig, QKNorm
from moecpt.interop.families.base import Family
from moecpt.interop.families.helpers import (
    _hf_types,
    _renorm,
    _shared_width,
    _synth_zero_shared,
    _uniform_window_why_not,
    attn_kinds,
    hf_layer_types,
)


class _Qwen(Family):
    has_dense_layers = True

    def attention_layers(self, hf: dict, n_layers: int) -> tuple[int | None, list[AttnKind] | None]:
        """Qwen3-MoE (transformers 5): ``sliding_window`` on every layer when ``use_sliding_window``."""
        w = hf.get("sliding_window")
        return (int(w) if hf.get("use_sliding_window") and w else None), None

    def window_why_not(self, cfg: ModelConfig) -> str | None:
        return _uniform_window_why_not(self.name, cfg)

    def _layers_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        slides = AttnKind.SLIDING in attn_kinds(cfg)
        return {"intermediate_size": cfg.ffn_width, "moe_intermediate_size": cfg.resolved_expert_width,
                "decoder_sparse_step": 1, "norm_topk_prob": _renorm(cfg),
                "mlp_only_layers": [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)],
                "head_dim": cfg.resolved_head_dim, "use_sliding_window": slides,
                "sliding_window": cfg.sliding_window if slides else None, "max_window_layers": cfg.n_layers}


class Qwen2MoE(_Qwen):
    """Qwen2-MoE (Qwen1.5-MoE blog 2024; Qwen2 Technical Report, arXiv 2407.10671; ``Qwen/Qwen1.5-MoE-A2.7B``)."""

    name = "qwen2_moe"
    model_types = ("qwen2_moe",)
    architecture = "Qwen2MoeForCausalLM"
    reference = ("Qwen team 2024, Qwen1.5-MoE (blog) and Qwen2 Technical Report (arXiv 2407.10671); "
                 "Qwen/Qwen1.5-MoE-A2.7B")
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_experts": 60, "num_experts_per_tok": 4,
        "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
        "initializer_range": 0.02, "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1, "qkv_bias": True}
    has_shared = True

    def attn_bias(self, hf: dict) -> bool:
        return bool(self.get(hf, "qkv_bias", True))  # transformers < 5 hard-codes the q/k/v biases

    def attention_layers(self, hf: dict, n_layers: int) -> tuple[int | None, list[AttnKind] | None]:
        """transformers 5's Qwen2-MoE: ``layer_types`` if the config has them, else sliding on the even-numbered
        layers (0, 2, ...) below ``max_window_layers`` when ``use_sliding_window``."""
        w = hf.get("sliding_window")
        if not hf.get("use_sliding_window") or not w:
            return None, None
        types = hf_layer_types(hf, self.name)
        if types is None:
            m = int(self.get(hf, "max_window_layers", 28))
            types = [AttnKind.SLIDING if (i + 1) % 2 and i < m else AttnKind.FULL for i in range(n_layers)]
        return int(w), types

    def window_why_not(self, cfg: ModelConfig) -> str | None:
        return None  # layer_types carries any pattern

    def shared(self, hf: dict) -> tuple[int, bool]:
        width = int(self.get(hf, "shared_expert_intermediate_size") or 0)
        if width < 1:
            raise self._fail("shared_expert_intermediate_size must be >= 1 (Qwen2-MoE always has a shared expert)")
        return width, True

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.qk_norm != QKNorm.NONE:
            return f"Qwen2-MoE has no q/k norm, this model has qk_norm = {cfg.qk_norm.value!r}"
        return None

    def adapt(self, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, Callable], list[str]]:
        """Qwen2-MoE always has q/k/v biases, a shared expert and its sigmoid gate. What the moecpt model lacks is
        added so that the function stays exactly the same: zero biases; without a shared expert, a width-1 one
        whose down projection is zero (it adds exactly 0); without the gate, a zero gate (sigmoid(0) = 1/2) and the
        shared down projection doubled (both factors are powers of two, so the product is bit-exact)."""
        moe = cfg.moe
        assert moe is not None
        synth: dict[str, Callable] = {}
        notes: list[str] = []
        D = cfg.d_model
        update: dict[str, Any] = {}
        moe_update: dict[str, Any] = {}
        moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        if not cfg.attn_bias:
            notes.append("zero q/k/v biases added (Qwen2-MoE always has them)")
            update["attn_bias"] = True
            kv = cfg.resolved_kv_heads * cfg.resolved_head_dim
            for i in range(cfg.n_layers):
                for name, width in (("wq", cfg.n_heads * cfg.resolved_head_dim), ("wk", kv), ("wv", kv)):
                    synth[f"blocks.{i}.attn.{name}.bias"] = lambda get, w=width: torch.zeros(w)
        width = _shared_width(cfg)
        if not width:
            notes.append("a width-1 shared expert with a zero down projection added (it adds exactly 0)")
            moe_update.update(num_shared_experts=1, shared_expert_width=1, shared_expert_gate=True)
            _synth_zero_shared(synth, moe_layers, D, 1)
            for i in moe_layers:
                synth[f"blocks.{i}.ffn.shared_gate.weight"] = lambda get: torch.zeros(1, D)
        elif not moe.shared_expert_gate:
            notes.append("shared-expert gate added: zero weight (sigmoid = 1/2) and the shared down projection x2")
            moe_update.update(shared_expert_gate=True)
            for i in moe_layers:
                B = f"blocks.{i}.ffn"
                synth[f"{B}.shared_gate.weight"] = lambda get: torch.zeros(1, D)
                synth[f"{B}.shared.w_out.weight"] = lambda get, n=f"{B}.shared.w_out.weight": get(n) * 2
        if moe_update:
            update["moe"] = moe.model_copy(update=moe_update)
        return (cfg.model_copy(update=update) if update else cfg), synth, notes

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._layers_extra(cfg), "shared_expert_intermediate_size": _shared_width(cfg), "qkv_bias": True,
                "layer_types": _hf_types(cfg)}


class Qwen3MoE(_Qwen):
    """Qwen3-MoE (Qwen3 Technical Report, arXiv 2505.09388; ``Qwen/Qwen3-30B-A3B``)."""

    name = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architecture = "Qwen3MoeForCausalLM"
    reference = "Qwen team 2025, Qwen3 Technical Report (arXiv 2505.09388); Qwen/Qwen3-30B-A3B"
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": False, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
        "initializer_range": 0.02, "intermediate_size": 6144, "moe_intermediate_size": 768, "decoder_sparse_step": 1}
    qk_norm = QKNorm.HEAD

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.qk_norm != QKNorm.HEAD:
            return ("Qwen3-MoE always normalises q / k per head (qk_norm = 'head'), this model has "
                    f"{cfg.qk_norm.value!r}")
        if _shared_width(cfg):
            return "Qwen3-MoE has no shared expert"
        if cfg.attn_bias:
            return "Qwen3-MoE's attention bias also covers the output projection; moecpt's q/k/v-only bias has no match"
        return None

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**self._layers_extra(cfg), "attention_bias": False}
