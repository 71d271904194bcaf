"""Ernie-4.5-MoE (``ernie4_5_moe``).

**Ernie-4.5-MoE** (``ernie4_5_moe``) -- Baidu ERNIE Team 2025, "ERNIE 4.5 Technical Report"; model card
``baidu/ERNIE-4.5-21B-A3B-PT``. Softmax scores with a selection-only bias, interleaved-pair RoPE permuted to the
half rotation on import (:class:`Ernie45MoE`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

import torch

from moecpt.config import ModelConfig, QKNorm, RouterConfig, RouterKind, ScoreFn
from moecpt.interop.families.base import Family
from moecpt.interop.families.helpers import _renorm, _shared_width
from moecpt.interop.families.pieces import Piece, PieceOp


class Ernie45MoE(Family):
    """Ernie-4.5-MoE (Baidu ERNIE Team 2025, "ERNIE 4.5 Technical Report"; ``baidu/ERNIE-4.5-21B-A3B-PT``,
    ``baidu/ERNIE-4.5-300B-A47B-PT``): softmax scores with a selection-only bias (``moe_statics.
    e_score_correction_bias``: auxiliary-loss-free balancing with softmax scores, moecpt ``router.kind = "bias"``,
    ``score_fn = "softmax"``), top-k gates renormalised (``moe_norm_min`` clamps the sum at 1e-12), ungated shared
    experts of ``moe_num_shared_experts * moe_intermediate_size``, MoE layers every ``moe_layer_interval`` from
    ``moe_layer_start_index`` to ``moe_layer_end_index``, and RoPE on interleaved pairs, which import permutes to
    moecpt's half rotation (:func:`rope_pair_order`; exact) and export permutes back."""

    name = "ernie4_5_moe"
    model_types = ("ernie4_5_moe",)
    architecture = "Ernie4_5_MoeForCausalLM"
    reference = "Baidu 2025, ERNIE 4.5 Technical Report; baidu/ERNIE-4.5-21B-A3B-PT"
    num_experts_key = "moe_num_experts"
    shared_name = "shared_experts"
    has_shared = True
    has_dense_layers = True
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "moe_num_experts": 64, "moe_k": 6,
        "tie_word_embeddings": True, "initializer_range": 0.02, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
        "moe_layer_end_index": -1, "moe_layer_interval": 1, "moe_norm_min": 1e-12, "use_bias": False}

    def get(self, hf: dict, key: str, default: Any = None) -> Any:
        key = {"num_experts_per_tok": "moe_k"}.get(key, key) if key not in hf else key
        return super().get(hf, key, default)

    def check(self, hf: dict) -> None:
        if self.get(hf, "use_bias"):
            raise self._fail("use_bias = true biases every projection (o_proj and lm_head too), which moecpt does "
                             "not have; not supported")

    def attn_bias(self, hf: dict) -> bool:
        return False

    def renormalize(self, hf: dict) -> bool:
        return True

    def shared(self, hf: dict) -> tuple[int, bool]:
        return int(self.get(hf, "moe_num_shared_experts") or 0) * self.expert_width(hf), False

    def expert_width(self, hf: dict) -> int:
        return int(self.get(hf, "moe_intermediate_size"))

    def moe_layers(self, hf: dict, n_layers: int) -> list[bool]:
        start, step = int(self.get(hf, "moe_layer_start_index")), int(self.get(hf, "moe_layer_interval"))
        end = int(self.get(hf, "moe_layer_end_index"))
        end = n_layers - 1 if end == -1 else end
        return [(i + 1) % step == 0 and start <= i <= end for i in range(n_layers)]

    def router(self, hf: dict, top_k: int, renorm: bool) -> RouterConfig:
        """Balanced by the selection bias (moecpt's aux-loss-free update); no aux loss unless a recipe sets one."""
        return RouterConfig(kind=RouterKind.BIAS, score_fn=ScoreFn.SOFTMAX, renormalize=True, aux_loss_weight=0.0,
                            z_loss_weight=0.0)

    def routing_why_not(self, cfg: ModelConfig) -> str | None:
        r = cfg.moe.router
        if r.score_fn != ScoreFn.SOFTMAX or r.n_group > 1 or r.routed_scale != 1.0:
            return "Ernie-4.5-MoE routes by softmax scores without groups or a routed scale"
        if cfg.rotary_fraction != 1.0:
            return f"Ernie-4.5-MoE rotates the whole head; this model has rotary_fraction = {cfg.rotary_fraction}"
        if r.kind == RouterKind.SINKHORN and cfg.moe.top_k == 1:
            return "Sinkhorn top-1 routers gate with sigmoid(logit); Ernie-4.5-MoE gates with a softmax"
        return None

    def why_not(self, cfg: ModelConfig) -> str | None:
        moe = cfg.moe
        if cfg.qk_norm != QKNorm.NONE:
            return f"Ernie-4.5-MoE has no q/k norm, this model has qk_norm = {cfg.qk_norm.value!r}"
        if cfg.attn_bias:
            return "Ernie-4.5-MoE's use_bias biases every projection; moecpt's q/k/v-only bias has no match"
        if moe.shared_expert_gate:
            return "Ernie-4.5-MoE's shared experts have no sigmoid gate; this model has moe.shared_expert_gate"
        if _shared_width(cfg) % cfg.resolved_expert_width:
            return (f"Ernie-4.5-MoE's shared width is a multiple of the expert width ({cfg.resolved_expert_width}); "
                    f"this model's is {_shared_width(cfg)}")
        if not _renorm(cfg):
            return "Ernie-4.5-MoE always renormalises the top-k gates (k > 1); this model does not"
        if _ernie_layers(cfg) is None:
            return "Ernie-4.5-MoE's MoE layers are every n-th from a start index; this model's are not"
        return None

    def adapt(self, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, Callable], list[str]]:
        """Ernie-4.5-MoE always has the selection bias: a softmax router of another kind gets a zero one (the same
        selection; it imports back as a ``bias`` router)."""
        moe = cfg.moe
        if moe.router.kind == RouterKind.BIAS:
            return cfg, {}, []
        E = moe.num_experts
        synth = {f"blocks.{i}.ffn.router.expert_bias": (lambda get: torch.zeros(E))
                 for i in range(cfg.n_layers) if cfg.is_moe_layer(i)}
        router = moe.router.model_copy(update={"kind": RouterKind.BIAS})
        notes = [f"zero e_score_correction_bias added (router.kind = {moe.router.kind.value!r}: same selection; it "
                 "imports back as a 'bias' router)"]
        return cfg.model_copy(update={"moe": moe.model_copy(update={"router": router})}), synth, notes

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        out = super().hf_config(cfg)
        for key in ("router_aux_loss_coef", "output_router_logits", "num_experts_per_tok"):
            out.pop(key, None)
        return out

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        start, step, end = _ernie_layers(cfg)
        return {"head_dim": cfg.resolved_head_dim, "intermediate_size": cfg.ffn_width, "use_bias": False,
                "moe_k": cfg.moe.top_k, "moe_intermediate_size": cfg.resolved_expert_width,
                "moe_num_shared_experts": _shared_width(cfg) // cfg.resolved_expert_width,
                "moe_layer_start_index": start, "moe_layer_interval": step, "moe_layer_end_index": end,
                "moe_norm_min": 1e-12}

    def plan(self, cfg: ModelConfig, fused: Callable[[int], bool] = lambda i: False) -> list[Piece]:
        """The base plan with q / k rows in interleaved-pair RoPE order and the bias under ``moe_statics``."""
        out: list[Piece] = []
        heads = {"wq": cfg.n_heads, "wk": cfg.resolved_kv_heads}
        for p in super().plan(cfg, fused):
            ours = p.dst.split(".")
            if len(ours) == 5 and ours[2] == "attn" and ours[3] in heads and ours[4] == "weight":
                p = replace(p, op=PieceOp.ROPE_PAIRS, index=(heads[ours[3]], cfg.resolved_head_dim))
            elif p.hf.endswith(".gate.e_score_correction_bias"):
                M = p.hf.removesuffix(".gate.e_score_correction_bias")
                stat = ".gate.moe_statics" if fused(int(p.hf.split(".")[2])) else ".moe_statics"
                p = Piece(f"{M}{stat}.e_score_correction_bias", p.dst, PieceOp.ROW, (1, *p.hf_shape))
            out.append(p)
        return out


def _ernie_layers(cfg: ModelConfig) -> tuple[int, int, int] | None:
    """``(moe_layer_start_index, moe_layer_interval, moe_layer_end_index)`` giving exactly ``cfg``'s MoE layers."""
    mask = [cfg.is_moe_layer(i) for i in range(cfg.n_layers)]
    if not any(mask):
        return None
    first, last = mask.index(True), len(mask) - 1 - mask[::-1].index(True)
    for step in range(1, cfg.n_layers + 1):
        if mask == [(i + 1) % step == 0 and first <= i <= last for i in range(cfg.n_layers)]:
            return first, step, last
    return None
