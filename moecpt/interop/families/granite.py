"""Granite-MoE (``granitemoe``) and Granite-MoE with a shared expert (``granitemoeshared``).

**Granite-MoE** (``granitemoe``, ``granitemoeshared``) -- IBM 2024, Granite 3.0 language models; model cards
``ibm-granite/granite-3.0-1b-a400m-base``, ``ibm-granite/granite-3.0-3b-a800m-base``. Mixtral's routing with
muP-style embedding / residual / attention / logits multipliers and stacked expert tensors (:class:`_Granite`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

from moecpt.config import ModelConfig, QKNorm, build_section
from moecpt.interop.families.base import Family
from moecpt.interop.families.helpers import _all_moe, _renorm, _shared_width
from moecpt.interop.families.pieces import Piece, PieceOp


class _Granite(Family):
    """Granite-MoE and Granite-MoE with a shared expert (IBM Granite 3.0 language models, 2024;
    ``ibm-granite/granite-3.0-1b-a400m-base``, ``ibm-granite/granite-3.0-3b-a800m-base``): a Mixtral-like block
    (softmax over the top-k logits, i.e. renormalised top-k) with muP-style multipliers on the embeddings, each
    residual branch and the logits, and an attention softmax scale of its own (moecpt ``embedding_multiplier``,
    ``residual_multiplier``, ``logits_scaling``, ``attention_multiplier``). Experts are stored stacked:
    ``block_sparse_moe.input_linear.weight`` ``[E, 2F, D]`` (gate rows, then up), ``output_linear.weight``
    ``[E, D, F]``, router ``block_sparse_moe.router.layer.weight``; transformers >= 5 names them
    ``experts.gate_up_proj`` / ``experts.down_proj`` / ``router.weight`` in memory and converts on load, and both
    spellings import. The shared expert of ``granitemoeshared`` is ``shared_mlp.input_linear`` / ``output_linear``
    (ungated, added to the routed output before the residual multiplier)."""

    reference = "IBM 2024, Granite 3.0 language models; ibm-granite/granite-3.0-1b-a400m-base"
    moe_block = "block_sparse_moe"
    num_experts_key = "num_local_experts"
    multipliers = True
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "initializer_range": 0.02,
        "intermediate_size": 11008, "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
        "attention_multiplier": 1.0, "attention_bias": False}

    def renormalize(self, hf: dict) -> bool:
        return True  # softmax over the top-k logits

    def head_dim(self, hf: dict, d_model: int, n_heads: int) -> int:
        if d_model % n_heads:
            raise self._fail(f"hidden_size {d_model} is not divisible by num_attention_heads {n_heads}")
        return d_model // n_heads  # GraniteMoeAttention ignores head_dim

    def expert_width(self, hf: dict) -> int:
        return int(self.get(hf, "intermediate_size"))

    def to_model_config(self, hf: dict) -> tuple[ModelConfig, list[str]]:
        cfg, notes = super().to_model_config(hf)
        mult = {"embedding_multiplier": float(self.get(hf, "embedding_multiplier")),
                "residual_multiplier": float(self.get(hf, "residual_multiplier")),
                "attention_multiplier": float(self.get(hf, "attention_multiplier")),
                "logits_scaling": float(self.get(hf, "logits_scaling"))}
        return build_section(ModelConfig, {**cfg.model_dump(), **mult}, f"{self.name} config"), notes

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.qk_norm != QKNorm.NONE:
            return f"Granite-MoE has no q/k norm, this model has qk_norm = {cfg.qk_norm.value!r}"
        if cfg.attn_bias:
            return "Granite-MoE's attention bias also covers the output projection; moecpt's has no match"
        if _shared_width(cfg) and cfg.moe.shared_expert_gate:
            return "Granite-MoE's shared expert has no sigmoid gate; this model has moe.shared_expert_gate"
        if not _all_moe(cfg):
            return "Granite-MoE makes every layer MoE; this model has dense layers"
        if not _renorm(cfg):
            return "Granite-MoE always renormalises the top-k gates (k > 1); this model does not"
        if cfg.resolved_head_dim * cfg.n_heads != cfg.d_model:
            return "Granite-MoE needs n_heads * head_dim == d_model"
        return None

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        extra = {"intermediate_size": cfg.resolved_expert_width, "attention_bias": False,
                 "embedding_multiplier": cfg.embedding_multiplier, "residual_multiplier": cfg.residual_multiplier,
                 "attention_multiplier": (cfg.attention_multiplier if cfg.attention_multiplier is not None
                                          else cfg.resolved_head_dim ** -0.5),
                 "logits_scaling": cfg.logits_scaling}
        if _shared_width(cfg):
            extra["shared_intermediate_size"] = _shared_width(cfg)
        return extra

    def plan(self, cfg: ModelConfig, fused: Callable[[int], bool] = lambda i: False) -> list[Piece]:
        """The base plan with Granite's names: stacked experts and the router under ``block_sparse_moe``, the
        shared expert as ``shared_mlp`` with fused gate/up rows."""
        out: list[Piece] = []
        for p in super().plan(cfg, lambda i: True):
            M = p.hf.rsplit(f".{self.moe_block}.", 1)[0] + f".{self.moe_block}"
            new = fused(int(p.hf.split(".")[2])) if p.hf.startswith("model.layers.") else False
            if p.hf.endswith(".gate.weight"):
                p = replace(p, hf=f"{M}.router.weight" if new else f"{M}.router.layer.weight")
            elif p.hf.endswith(".experts.gate_up_proj") and not new:
                p = replace(p, hf=f"{M}.input_linear.weight")
            elif p.hf.endswith(".experts.down_proj") and not new:
                p = replace(p, hf=f"{M}.output_linear.weight")
            elif f".{self.moe_block}.{self.shared_name}." in p.hf:
                L = M.rsplit(".", 1)[0]
                if p.hf.endswith(".gate_proj.weight"):  # gate and up rows are one tensor: one COPY of w_in
                    p = Piece(f"{L}.shared_mlp.input_linear.weight", p.dst, PieceOp.COPY,
                              (2 * p.hf_shape[0], p.hf_shape[1]))
                elif p.hf.endswith(".up_proj.weight"):
                    continue
                else:
                    p = replace(p, hf=f"{L}.shared_mlp.output_linear.weight")
            out.append(p)
        return out


class GraniteMoE(_Granite):
    """Granite-MoE (``granitemoe``, ``GraniteMoeForCausalLM``): no shared expert."""

    name = "granitemoe"
    model_types = ("granitemoe",)
    architecture = "GraniteMoeForCausalLM"

    def why_not(self, cfg: ModelConfig) -> str | None:
        if _shared_width(cfg):
            return "granitemoe has no shared expert (granitemoeshared has)"
        return super().why_not(cfg)


class GraniteMoEShared(_Granite):
    """Granite-MoE with a shared expert (``granitemoeshared``, ``GraniteMoeSharedForCausalLM``)."""

    name = "granitemoeshared"
    model_types = ("granitemoeshared",)
    architecture = "GraniteMoeSharedForCausalLM"
    reference = "IBM 2024, Granite 3.0 language models (Granite-MoE with a shared expert)"
    has_shared = True
    defaults: ClassVar[dict[str, Any]] = {**_Granite.defaults, "shared_intermediate_size": 0}

    def shared(self, hf: dict) -> tuple[int, bool]:
        return int(self.get(hf, "shared_intermediate_size") or 0), False

    def why_not(self, cfg: ModelConfig) -> str | None:
        if not _shared_width(cfg):
            return "granitemoeshared is Granite-MoE with a shared expert; this model has none (use granitemoe)"
        return super().why_not(cfg)
