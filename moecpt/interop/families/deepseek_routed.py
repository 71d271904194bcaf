"""The base of the families routed as DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437, Sec. 2.1.2): sigmoid
scores, ``e_score_correction_bias`` for selection only (moecpt ``router.kind = "bias"``, ``expert_bias``),
group-limited top-k, ``norm_topk_prob``, ``routed_scaling_factor``, ungated shared experts and dense first layers.
GLM-4.5 and dots.llm1 (:mod:`~moecpt.interop.families.glm`, :mod:`~moecpt.interop.families.dots1`) subclass it
on a GQA backbone, DeepSeek-V2 / V3 (:mod:`~moecpt.interop.families.deepseek`) with MLA."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moecpt.config import GroupScore, ModelConfig, RouterConfig, RouterKind, ScoreFn
from moecpt.interop.families.base import Family
from moecpt.interop.families.helpers import _renorm, _shared_width, _synth_zero_shared


class _DeepSeekRouted(Family):
    """Families with DeepSeek-V3 routing (DeepSeek-AI 2024, arXiv 2412.19437, Sec. 2.1.2) on a GQA backbone:
    ``mlp.gate`` (sigmoid scores) with ``e_score_correction_bias``, ``mlp.shared_experts`` of
    ``n_shared_experts * moe_intermediate_size``, the first ``first_k_dense_replace`` layers dense."""

    num_experts_key = "n_routed_experts"
    shared_name = "shared_experts"
    has_shared = True

    def shared(self, hf: dict) -> tuple[int, bool]:
        return int(self.get(hf, "n_shared_experts") or 0) * self.expert_width(hf), False

    def expert_width(self, hf: dict) -> int:
        return int(self.get(hf, "moe_intermediate_size"))

    def moe_layers(self, hf: dict, n_layers: int) -> list[bool]:
        first = int(self.get(hf, "first_k_dense_replace") or 0)
        return [i >= first for i in range(n_layers)]

    def router(self, hf: dict, top_k: int, renorm: bool) -> RouterConfig:
        """DeepSeek-V3 routing; balancing by the selection bias (gamma 1e-3 as DeepSeek-V3's first 14.3T tokens),
        no sequence-wise loss unless a CPT recipe sets ``seq_aux_loss_weight``."""
        return RouterConfig(kind=RouterKind.BIAS, score_fn=ScoreFn.SIGMOID, renormalize=renorm,
                            n_group=int(self.get(hf, "n_group")), topk_group=int(self.get(hf, "topk_group")),
                            routed_scale=float(self.get(hf, "routed_scaling_factor")), aux_loss_weight=0.0,
                            z_loss_weight=0.0)

    def ignored(self, hf: dict, name: str) -> bool:
        """The multi-token-prediction layers (``model.layers.{n}.*`` on, DeepSeek-V3 Sec. 2.2) are not imported."""
        n, mtp = int(hf["num_hidden_layers"]), int(self.get(hf, "num_nextn_predict_layers") or 0)
        return any(name.startswith(f"model.layers.{n + j}.") for j in range(mtp))

    def ignored_note(self, hf: dict) -> str:
        return (f"{self.get(hf, 'num_nextn_predict_layers')} multi-token-prediction layer(s) "
                f"(model.layers.{hf['num_hidden_layers']}.*) dropped: moecpt trains next-token prediction only")

    def routing_why_not(self, cfg: ModelConfig) -> str | None:
        r = cfg.moe.router
        if r.score_fn != ScoreFn.SIGMOID:
            return f"{self.name} routes by sigmoid scores; this model has router.score_fn = 'softmax'"
        if r.n_group > 1 and r.group_score != GroupScore.TOP2_SUM:
            return (f"{self.name} scores an expert group by its two best experts; this model has "
                    f"router.group_score = {r.group_score.value!r}")
        return None

    def why_not(self, cfg: ModelConfig) -> str | None:
        moe = cfg.moe
        if moe.shared_expert_gate:
            return f"{self.name}'s shared experts have no sigmoid gate; this model has moe.shared_expert_gate"
        first = next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), cfg.n_layers)
        if first == cfg.n_layers or any(cfg.is_moe_layer(i) != (i >= first) for i in range(cfg.n_layers)):
            return f"{self.name} has dense layers only before the first MoE layer (first_k_dense_replace)"
        if _shared_width(cfg) % cfg.resolved_expert_width:
            return (f"{self.name}'s shared width is a multiple of the expert width ({cfg.resolved_expert_width}); "
                    f"this model's is {_shared_width(cfg)}")
        return None

    def adapt(self, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, Callable], list[str]]:
        """These families always have selection biases and a shared expert. A sigmoid router of another kind gets
        zero biases (the same selection; re-imported it is a ``bias`` router); a model without shared expert gets
        one of the expert width whose projections are zero (it adds exactly 0)."""
        moe = cfg.moe
        synth: dict[str, Callable] = {}
        notes: list[str] = []
        moe_update: dict[str, Any] = {}
        layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
        E, D, F = moe.num_experts, cfg.d_model, cfg.resolved_expert_width
        if moe.router.kind != RouterKind.BIAS:
            notes.append(f"zero e_score_correction_bias added (router.kind = {moe.router.kind.value!r}: same "
                         "selection; it imports back as a 'bias' router)")
            moe_update["router"] = moe.router.model_copy(update={"kind": RouterKind.BIAS})
            for i in layers:
                synth[f"blocks.{i}.ffn.router.expert_bias"] = lambda get: torch.zeros(E)
        if not _shared_width(cfg):
            notes.append(f"a shared expert with zero projections added ({self.name} always has one; it adds 0)")
            moe_update.update(num_shared_experts=1, shared_expert_width=None)
            _synth_zero_shared(synth, layers, D, F)
        if moe_update:
            cfg = cfg.model_copy(update={"moe": moe.model_copy(update=moe_update)})
        return cfg, synth, notes

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        out = super().hf_config(cfg)
        del out["router_aux_loss_coef"]  # balanced by the bias: these configs have no aux-loss weight
        return out

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        r = cfg.moe.router
        return {"head_dim": cfg.resolved_head_dim, "intermediate_size": cfg.ffn_width,
                "moe_intermediate_size": cfg.resolved_expert_width,
                "n_shared_experts": _shared_width(cfg) // cfg.resolved_expert_width,
                "first_k_dense_replace": next(i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)),
                "n_group": r.n_group, "topk_group": r.resolved_topk_group, "norm_topk_prob": _renorm(cfg),
                "routed_scaling_factor": r.routed_scale}
