"""GPT-OSS (``gpt_oss``).

**GPT-OSS** (``gpt_oss``) -- OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card" (arXiv 2508.10925); model
cards ``openai/gpt-oss-20b``, ``openai/gpt-oss-120b``. Attention sinks, alternating sliding-window / full layers,
biases on q/k/v/o, the router and the experts, the clamped SwiGLU with gate / up interleaved, YaRN RoPE and MXFP4
experts (dequantised on import) (:class:`GptOss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from moecpt.config import AttnKind, FFNKind, ModelConfig, QKNorm, RouterConfig, RouterKind, ScoreFn, build_section
from moecpt.interop.families.base import Family
from moecpt.interop.families.helpers import (
    _all_moe,
    _hf_types,
    _renorm,
    _shared_width,
    _yarn_params,
    attn_kinds,
    hf_layer_types,
)
from moecpt.interop.families.pieces import Piece, PieceOp, _shape_of
from moecpt.interop.mxfp4 import mxfp4_shapes
from moecpt.model.glu import SWIGLU_ALPHA, SWIGLU_LIMIT
from moecpt.model.transformer import build_model


class GptOss(Family):
    """GPT-OSS (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card", arXiv 2508.10925; ``openai/gpt-oss-20b``,
    ``openai/gpt-oss-120b``): attention sinks (``self_attn.sinks [H]``), biases on q/k/v *and* o (moecpt
    ``attn_bias`` + ``attn_out_bias``), sliding-window (128) and full layers alternating (``layer_types``), a router
    with a logit bias whose gates are the softmax over the top-k logits (moecpt's renormalised softmax top-k,
    ``router.logit_bias``), every layer MoE, experts with biases (``moe.expert_bias``) and the clamped SwiGLU
    (``ffn_kind = "swiglu_clamped"``) whose gate / up columns are interleaved in ``gate_up_proj [E, D, 2F]`` (import
    de-interleaves them into moecpt's ``[gate | up]``; export interleaves). MXFP4 checkpoints
    (``quantization_config.quant_method = "mxfp4"``) are dequantised on import (:mod:`moecpt.interop.mxfp4`);
    export writes bf16 / fp32 tensors without a quantization config. Its YaRN RoPE scaling is moecpt's
    ``rope_yarn`` (:mod:`moecpt.model.yarn`)."""

    name = "gpt_oss"
    model_types = ("gpt_oss",)
    architecture = "GptOssForCausalLM"
    reference = "OpenAI 2025, gpt-oss-120b & gpt-oss-20b Model Card (arXiv 2508.10925); openai/gpt-oss-20b"
    num_experts_key = "num_local_experts"
    gptoss_features = True
    mxfp4 = True
    #: GptOssConfig's rope_parameters when a config.json has none (YaRN x32 over 4096, untruncated)
    default_rope: ClassVar[dict[str, Any]] = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                              "beta_slow": 1.0, "truncate": False,
                                              "original_max_position_embeddings": 4096}
    #: transformers' GptOssConfig defaults
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 150000.0, "num_local_experts": 128, "num_experts_per_tok": 4,
        "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "initializer_range": 0.02,
        "intermediate_size": 2880, "head_dim": 64, "sliding_window": 128, "attention_bias": True,
        "swiglu_alpha": SWIGLU_ALPHA, "swiglu_limit": SWIGLU_LIMIT}

    def check(self, hf: dict) -> None:
        for key, want in (("swiglu_alpha", SWIGLU_ALPHA), ("swiglu_limit", SWIGLU_LIMIT)):
            if float(self.get(hf, key)) != want:
                raise self._fail(f"{key} = {hf[key]} differs from GPT-OSS's {want}, the only value moecpt's "
                                 "swiglu_clamped has")
        q = hf.get("quantization_config")
        if q and q.get("quant_method") != "mxfp4":
            raise self._fail(f"quantization {q.get('quant_method')!r} is not supported (mxfp4 is dequantised)")

    def attn_bias(self, hf: dict) -> bool:
        return bool(self.get(hf, "attention_bias"))  # q/k/v here, o via attn_out_bias (to_model_config)

    def renormalize(self, hf: dict) -> bool:
        return True  # softmax over the top-k logits

    def expert_width(self, hf: dict) -> int:
        return int(self.get(hf, "intermediate_size"))

    def head_dim(self, hf: dict, d_model: int, n_heads: int) -> int:
        return int(self.get(hf, "head_dim") or d_model // n_heads)

    def router(self, hf: dict, top_k: int, renorm: bool) -> RouterConfig:
        return super().router(hf, top_k, renorm).model_copy(update={"logit_bias": True})

    def attention_layers(self, hf: dict, n_layers: int) -> tuple[int | None, list[AttnKind] | None]:
        """``layer_types``, else (transformers 5) sliding on the even-numbered layers 0, 2, ..."""
        w = self.get(hf, "sliding_window")
        if not w:
            return None, None
        types = hf_layer_types(hf, self.name)
        if types is None:
            types = [AttnKind.SLIDING if (i + 1) % 2 else AttnKind.FULL for i in range(n_layers)]
        return int(w), types

    def window_why_not(self, cfg: ModelConfig) -> str | None:
        return None

    def to_model_config(self, hf: dict) -> tuple[ModelConfig, list[str]]:
        if not hf.get("rope_parameters") and not hf.get("rope_scaling"):
            hf = {**hf, "rope_parameters": dict(self.default_rope)}
        cfg, notes = super().to_model_config(hf)
        raw = cfg.model_dump()
        raw.update(ffn_kind=FFNKind.SWIGLU_CLAMPED.value, attn_sinks=True, attn_out_bias=cfg.attn_bias)
        raw["moe"]["expert_bias"] = True
        if (hf.get("quantization_config") or {}).get("quant_method") == "mxfp4":
            notes.append("MXFP4 expert weights dequantised (exact); export-hf writes them unquantised")
        return build_section(ModelConfig, raw, f"{self.name} config"), notes

    def routing_why_not(self, cfg: ModelConfig) -> str | None:
        r = cfg.moe.router
        if r.kind == RouterKind.BIAS or r.score_fn != ScoreFn.SOFTMAX or r.n_group > 1 or r.routed_scale != 1.0:
            return "GPT-OSS gates with a softmax over the top-k logits (no selection bias, groups or routed scale)"
        if r.kind == RouterKind.SINKHORN and cfg.moe.top_k == 1:
            return "Sinkhorn top-1 routers gate with sigmoid(logit); GPT-OSS gates with a softmax"
        if cfg.rotary_fraction != 1.0:
            return f"GPT-OSS rotates the whole head; this model has rotary_fraction = {cfg.rotary_fraction}"
        return None

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.qk_norm != QKNorm.NONE:
            return f"GPT-OSS has no q/k norm, this model has qk_norm = {cfg.qk_norm.value!r}"
        if cfg.attn_bias != cfg.attn_out_bias:
            return "GPT-OSS's attention_bias covers q/k/v and o together; this model has only one of attn_bias / " \
                   "attn_out_bias"
        if _shared_width(cfg):
            return "GPT-OSS has no shared expert"
        if not _all_moe(cfg):
            return "GPT-OSS makes every layer MoE; this model has dense layers"
        if not _renorm(cfg):
            return "GPT-OSS gates with a softmax over the top-k logits (renormalised, k > 1); this model does not"
        if cfg.ffn_kind != FFNKind.SWIGLU_CLAMPED:
            return f"GPT-OSS's experts use the clamped SwiGLU (ffn_kind = 'swiglu_clamped'); this model has " \
                   f"{cfg.ffn_kind.value!r}"
        if cfg.tie_embeddings:
            return "GPT-OSS does not tie its embeddings"  # its config has the key, its model ignores a tie
        if cfg.attention_multiplier is not None and cfg.attention_multiplier != cfg.resolved_head_dim ** -0.5:
            return "GPT-OSS scales attention by 1 / sqrt(head_dim)"
        if not cfg.attn_sinks:
            return "GPT-OSS always has attention sinks; this model has attn_sinks = false"
        return None

    def adapt(self, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, Callable], list[str]]:
        """GPT-OSS always has router and expert biases: a model without them gets zero ones (they change
        nothing). Sinks are not synthesised (only a logit of -inf would leave attention unchanged): a model
        without them is refused (:meth:`why_not`)."""
        moe = cfg.moe
        synth: dict[str, Callable] = {}
        notes: list[str] = []
        E, D, F = moe.num_experts, cfg.d_model, cfg.resolved_expert_width
        moe_update: dict[str, Any] = {}
        if not moe.router.logit_bias:
            notes.append("zero router biases added (GPT-OSS always has them)")
            moe_update["router"] = moe.router.model_copy(update={"logit_bias": True})
            for i in range(cfg.n_layers):
                synth[f"blocks.{i}.ffn.router.logit_bias"] = lambda get: torch.zeros(E)
        if not moe.expert_bias:
            notes.append("zero expert biases added (GPT-OSS always has them)")
            moe_update["expert_bias"] = True
            for i in range(cfg.n_layers):
                synth[f"blocks.{i}.ffn.experts.b_in"] = lambda get: torch.zeros(E, 2 * F)
                synth[f"blocks.{i}.ffn.experts.b_out"] = lambda get: torch.zeros(E, D)
        if moe_update:
            cfg = cfg.model_copy(update={"moe": moe.model_copy(update=moe_update)})
        return cfg, synth, notes

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        slides = AttnKind.SLIDING in attn_kinds(cfg)
        return {"intermediate_size": cfg.resolved_expert_width, "head_dim": cfg.resolved_head_dim,
                "attention_bias": cfg.attn_bias, "swiglu_alpha": SWIGLU_ALPHA, "swiglu_limit": SWIGLU_LIMIT,
                "sliding_window": cfg.sliding_window if slides else None, "layer_types": _hf_types(cfg),
                "rope_parameters": _yarn_params(cfg)}

    def plan(self, cfg: ModelConfig, fused: Callable[[int], bool] = lambda i: False) -> list[Piece]:
        """GPT-OSS's names: ``self_attn.sinks``, ``mlp.router.{weight,bias}``, stacked experts with biases."""
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
        pieces: list[Piece] = []

        def add(hf: str, dst: str, op: PieceOp = PieceOp.COPY) -> None:
            pieces.append(Piece(hf, dst, op, _shape_of(shapes[dst], op, ()), ()))

        add("model.embed_tokens.weight", "tok_emb.weight")
        for i in range(cfg.n_layers):
            L, B = f"model.layers.{i}", f"blocks.{i}"
            add(f"{L}.input_layernorm.weight", f"{B}.attn_norm.weight")
            for hf_name, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
                add(f"{L}.self_attn.{hf_name}.weight", f"{B}.attn.{ours}.weight")
                if (cfg.attn_out_bias if ours == "wo" else cfg.attn_bias):
                    add(f"{L}.self_attn.{hf_name}.bias", f"{B}.attn.{ours}.bias")
            add(f"{L}.self_attn.sinks", f"{B}.attn.sinks")
            add(f"{L}.post_attention_layernorm.weight", f"{B}.ffn_norm.weight")
            M, X = f"{L}.mlp", f"{B}.ffn"
            add(f"{M}.router.weight", f"{X}.router.weight")
            add(f"{M}.router.bias", f"{X}.router.logit_bias")
            add(f"{M}.experts.gate_up_proj", f"{X}.experts.w_in", PieceOp.DEINTERLEAVE)
            add(f"{M}.experts.gate_up_proj_bias", f"{X}.experts.b_in", PieceOp.DEINTERLEAVE)
            add(f"{M}.experts.down_proj", f"{X}.experts.w_out")
            add(f"{M}.experts.down_proj_bias", f"{X}.experts.b_out")
        add("model.norm.weight", "norm.weight")
        add("lm_head.weight", "lm_head.weight")
        return pieces

    def checkpoint_pieces(self, hf: dict, pieces: list[Piece]) -> list[Piece]:
        """MXFP4 checkpoints store ``experts.gate_up_proj`` / ``down_proj`` as ``*_blocks`` + ``*_scales``."""
        if (hf.get("quantization_config") or {}).get("quant_method") != "mxfp4":
            return pieces
        out = []
        for p in pieces:
            if p.hf.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                blocks, _ = mxfp4_shapes(p.hf_shape)
                p = Piece(f"{p.hf}_blocks", p.dst, PieceOp.MXFP4, blocks, (int(p.op == PieceOp.DEINTERLEAVE),))
            out.append(p)
        return out
