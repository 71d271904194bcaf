"""The Hugging Face MoE families moecpt imports and exports: one small mapping per family.

Each family says how its ``config.json`` maps onto :class:`moecpt.config.ModelConfig`, how its tensors are named,
and which moecpt models it can represent exactly (export). All of them are pre-norm RMSNorm decoders with RoPE and
GLU experts ``down(act(gate(x)) * up(x))``; all but the DeepSeek families have grouped-query attention with RoPE in
the half-rotation layout (as moecpt), those multi-head latent attention (:mod:`moecpt.model.mla`):

* **OLMoE** -- Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models" (arXiv 2409.02060);
  model card ``allenai/OLMoE-1B-7B-0924``. Softmax top-k *without* renormalisation (``norm_topk_prob`` false),
  RMSNorm over the whole q / k projections (moecpt ``qk_norm = "full"``), every layer MoE, no shared expert.
* **Mixtral** -- Jiang et al. 2024, "Mixtral of Experts" (arXiv 2401.04088); model card
  ``mistralai/Mixtral-8x7B-v0.1``. Softmax over the top-k logits, i.e. softmax top-k *renormalised*; no q/k norm;
  tensors under ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down).
* **Qwen2-MoE** -- Qwen team 2024, "Qwen1.5-MoE: Matching 7B Model Performance with 1/3 Activated Parameters"
  (blog) and "Qwen2 Technical Report" (arXiv 2407.10671); model cards ``Qwen/Qwen1.5-MoE-A2.7B``,
  ``Qwen/Qwen2-57B-A14B``. Fine-grained experts plus one always-on shared expert scaled by ``sigmoid(w . x)``
  (moecpt ``moe.shared_expert_gate``), biases on q/k/v, ``norm_topk_prob`` from the config; dense layers through
  ``decoder_sparse_step`` / ``mlp_only_layers``.
* **Qwen3-MoE** -- Qwen team 2025, "Qwen3 Technical Report" (arXiv 2505.09388); model card
  ``Qwen/Qwen3-30B-A3B``. As Qwen2-MoE without the shared expert and the q/k/v biases, plus per-head RMSNorm on
  queries and keys (moecpt ``qk_norm = "head"``); ``norm_topk_prob`` true in the released models.

* **GLM-4.5** (``glm4_moe``) -- GLM-4.5 Team 2025, "GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation
  Models" (arXiv 2508.06471); model cards ``zai-org/GLM-4.5``, ``zai-org/GLM-4.5-Air``. DeepSeek-V3 routing
  (DeepSeek-AI 2024, arXiv 2412.19437, Sec. 2.1.2): sigmoid scores, ``e_score_correction_bias`` for selection only
  (moecpt ``router.kind = "bias"``, ``expert_bias``), group-limited top-k, ``norm_topk_prob``,
  ``routed_scaling_factor``; ``n_shared_experts`` ungated shared experts; the first ``first_k_dense_replace``
  layers dense; partial RoPE (``partial_rotary_factor``, half-rotation on the first dims, as moecpt), q/k/v biases
  (``attention_bias``), optional per-head q/k norm (``use_qk_norm``). Its multi-token-prediction layers
  (``num_nextn_predict_layers``) are dropped on import with a note.
* **dots.llm1** (``dots1``) -- rednote-hilab 2025, "dots.llm1 Technical Report" (arXiv 2506.05767); model card
  ``rednote-hilab/dots.llm1.base``. The same routing, experts and dense first layers as GLM-4.5, with per-head q/k
  norm always on, full RoPE and no attention biases (``attention_bias`` would also bias ``o_proj``: refused).

* **Ernie-4.5-MoE** (``ernie4_5_moe``) -- Baidu ERNIE Team 2025, "ERNIE 4.5 Technical Report"; model card
  ``baidu/ERNIE-4.5-21B-A3B-PT``. Softmax scores with a selection-only bias, interleaved-pair RoPE permuted to the
  half rotation on import (:class:`Ernie45MoE`).
* **Granite-MoE** (``granitemoe``, ``granitemoeshared``) -- IBM 2024, Granite 3.0 language models; model cards
  ``ibm-granite/granite-3.0-1b-a400m-base``, ``ibm-granite/granite-3.0-3b-a800m-base``. Mixtral's routing with
  muP-style embedding / residual / attention / logits multipliers and stacked expert tensors (:class:`_Granite`).
* **DeepSeek-V3** (``deepseek_v3``; also Moonlight and Kimi-K2 checkpoints) -- DeepSeek-AI 2024, arXiv
  2412.19437; ``deepseek-ai/DeepSeek-V3``. GLM-4.5's routing, experts and dense first layers, with MLA (a query
  latent, ``rope_interleave``).
* **DeepSeek-V2** (``deepseek_v2``) -- DeepSeek-AI 2024, arXiv 2405.04434; ``deepseek-ai/DeepSeek-V2-Lite``. MLA
  (V2-Lite: no query latent) and softmax routing, ``greedy`` or ``group_limited_greedy`` (groups scored by their
  best expert), gates scaled by ``routed_scaling_factor``; shared experts, dense first layers.

* **GPT-OSS** (``gpt_oss``) -- OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card" (arXiv 2508.10925); model
  cards ``openai/gpt-oss-20b``, ``openai/gpt-oss-120b``. Attention sinks, alternating sliding-window / full layers,
  biases on q/k/v/o, the router and the experts, the clamped SwiGLU with gate / up interleaved, YaRN RoPE and MXFP4
  experts (dequantised on import) (:class:`GptOss`).

Sliding windows (Mixtral, Qwen2/3-MoE, dots1, GPT-OSS) are kept as moecpt's ``sliding_window`` / ``layer_types``,
mapped as transformers 5 builds its masks (:meth:`Family.attention_layers`).

Router balancing: the four softmax families train with a Switch-style load-balancing loss
(``router_aux_loss_coef``), so an imported router is a moecpt ``penalty`` router (GLM-4.5 and dots.llm1: a
``bias`` router, :class:`Glm4Moe`). transformers' loss is ``E * sum_k sum_i f_ki P_i``, which is ``K`` at perfect
balance, while moecpt's is normalised to 1 for any ``K`` (docs/design.md, rule R3): the imported weight
is ``router_aux_loss_coef * K`` so the training signal keeps its strength (approximately: transformers pools the
layers before taking the product). The z-loss weight is ``router_z_loss_coef`` where a config has one, else 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, ClassVar

import torch

from moecpt.config import (
    AttentionKind,
    AttnKind,
    FFNKind,
    GroupScore,
    ModelConfig,
    MoELayout,
    QKNorm,
    RouterConfig,
    RouterKind,
    ScoreFn,
    build_section,
)
from moecpt.errors import MoecptError
from moecpt.interop.mxfp4 import dequantize_mxfp4, mxfp4_shapes
from moecpt.model.flops import attention_head_dims
from moecpt.model.glu import SWIGLU_ALPHA, SWIGLU_LIMIT
from moecpt.model.transformer import build_model

#: transformers ``hidden_act`` names -> moecpt FFN kind (``gelu_pytorch_tanh`` is moecpt's tanh-GELU GEGLU).
_ACT_TO_FFN = {"silu": FFNKind.SWIGLU, "swish": FFNKind.SWIGLU, "gelu_pytorch_tanh": FFNKind.GEGLU}
_FFN_TO_ACT = {FFNKind.SWIGLU: "silu", FFNKind.GEGLU: "gelu_pytorch_tanh",
               FFNKind.SWIGLU_CLAMPED: "silu"}  # GPT-OSS's config says silu; its experts apply the clamped form


# ---------------------------------------------------------------------------------------------- tensor pieces
class PieceOp(StrEnum):
    """How a Hugging Face tensor maps onto its moecpt tensor (:class:`Piece`)."""

    COPY = "copy"  # same shape
    ROWS = "rows"  # dst[a:b] = src: gate / up rows of a dense or shared w_in
    EXPERT_IN = "expert_in"  # dst[e, :, a:b] = src.T, src [F, D]
    EXPERT_OUT = "expert_out"  # dst[e] = src.T, src [D, F]
    FUSED_IN = "fused_in"  # transformers >= 5 stacked experts: dst = src.transpose(1, 2)
    FUSED_OUT = "fused_out"
    ROPE_PAIRS = "rope_pairs"  # q / k rows of interleaved-pair RoPE -> moecpt's half rotation (index: heads, A)
    ROW = "row"  # dst [N] = src[0], src [1, N] (Ernie-4.5's e_score_correction_bias)
    DEINTERLEAVE = "deinterleave"  # GPT-OSS gate_up [..., 2F] with gate / up interleaved -> [gate | up]
    MXFP4 = "mxfp4"  # src = (blocks, scales) of GPT-OSS's MXFP4 experts, dequantised (index: (deinterleave,))


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor and where it lives in the moecpt state dict.

    ``op`` says how (one :class:`PieceOp`; each member documents its mapping).
    """

    hf: str
    dst: str
    op: PieceOp
    hf_shape: tuple[int, ...]
    index: tuple[int, ...] = ()


def _shape_of(dst_shape: tuple[int, ...], op: PieceOp, index: tuple[int, ...]) -> tuple[int, ...]:
    if op == PieceOp.COPY:
        return dst_shape
    if op == PieceOp.ROWS:
        return (index[1] - index[0], *dst_shape[1:])
    if op == PieceOp.EXPERT_IN:  # dst [E, D, 2F] -> src [F, D]
        return (index[2] - index[1], dst_shape[1])
    if op == PieceOp.EXPERT_OUT:  # dst [E, F, D] -> src [D, F]
        return (dst_shape[2], dst_shape[1])
    if op in (PieceOp.ROPE_PAIRS, PieceOp.DEINTERLEAVE):
        return dst_shape
    if op == PieceOp.MXFP4:
        return mxfp4_shapes(dst_shape)[0]
    if op == PieceOp.ROW:
        return (1, *dst_shape)
    return (dst_shape[0], dst_shape[2], dst_shape[1])  # FUSED_IN / FUSED_OUT


def rope_pair_order(head_dim: int) -> torch.Tensor:
    """``[A]`` permutation taking a head's dims from interleaved-pair RoPE (pairs ``(2i, 2i+1)`` rotate by
    frequency ``i``: GPT-J, Ernie-4.5, GLM's original layout) to the half rotation (pairs ``(i, i + A/2)``, as
    moecpt and LLaMA): ``half = interleaved[..., order]``. Attention scores are unchanged when q and k are permuted
    alike, so the conversion is exact (it is the permutation of Meta's LLaMA-to-transformers converter)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def deinterleave(src):
    """``[..., 2F]`` with gate / up interleaved (GPT-OSS ``gate_up[..., ::2]`` / ``[..., 1::2]``) -> ``[gate | up]``."""
    return torch.cat([src[..., 0::2], src[..., 1::2]], dim=-1)


def interleave(dst):
    """Inverse of :func:`deinterleave`: ``[gate | up]`` -> gate / up interleaved (a contiguous copy)."""
    gate, up = dst.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _per_head(w, piece: Piece):
    heads, head_dim = piece.index
    return w.reshape(heads, head_dim, *w.shape[1:])


def place(dst, src, piece: Piece) -> None:
    """Write HF tensor ``src`` into the moecpt tensor ``dst`` (dtype cast included)."""
    op, ix = piece.op, piece.index
    if op == PieceOp.COPY:
        dst.copy_(src)
    elif op == PieceOp.ROPE_PAIRS:
        _per_head(dst, piece).copy_(_per_head(src, piece)[:, rope_pair_order(ix[1])])
    elif op == PieceOp.ROW:
        dst.copy_(src[0])
    elif op == PieceOp.DEINTERLEAVE:
        dst.copy_(deinterleave(src))
    elif op == PieceOp.MXFP4:
        dequantize_mxfp4(*src, out=dst, transform=deinterleave if ix[0] else None)  # expert by expert
    elif op == PieceOp.ROWS:
        dst[ix[0]:ix[1]].copy_(src)
    elif op == PieceOp.EXPERT_IN:
        dst[ix[0], :, ix[1]:ix[2]].copy_(src.t())
    elif op == PieceOp.EXPERT_OUT:
        dst[ix[0]].copy_(src.t())
    else:  # fused_in / fused_out
        dst.copy_(src.transpose(1, 2))


def extract(dst, piece: Piece):
    """The HF tensor of ``piece`` cut out of the moecpt tensor ``dst`` (a contiguous copy or view)."""
    op, ix = piece.op, piece.index
    if op == PieceOp.COPY:
        out = dst
    elif op == PieceOp.ROPE_PAIRS:
        out = _per_head(dst, piece)[:, torch.argsort(rope_pair_order(ix[1]))].reshape(dst.shape)
    elif op == PieceOp.ROW:
        out = dst[None]
    elif op == PieceOp.DEINTERLEAVE:
        out = interleave(dst)
    elif op == PieceOp.ROWS:
        out = dst[ix[0]:ix[1]]
    elif op == PieceOp.EXPERT_IN:
        out = dst[ix[0], :, ix[1]:ix[2]].t()
    elif op == PieceOp.EXPERT_OUT:
        out = dst[ix[0]].t()
    else:  # FUSED_IN / FUSED_OUT
        out = dst.transpose(1, 2)
    return out.contiguous()


# ------------------------------------------------------------------------------------------------------ family
class Family:
    """A transformers MoE family (see the module doc). Subclasses set the class attributes and the hooks."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    architecture: str = ""
    reference: str = ""
    moe_block: str = "mlp"
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    num_experts_key: str = "num_experts"
    #: the family config class's defaults, for keys a config.json may leave out
    defaults: ClassVar[dict[str, Any]] = {}
    qk_norm: QKNorm = QKNorm.NONE
    has_shared: bool = False
    has_dense_layers: bool = False  # decoder_sparse_step / mlp_only_layers
    shared_name: str = "shared_expert"  # the shared FFN's module name (GLM-4.5 / DeepSeek: shared_experts)
    multipliers: bool = False  # has Granite's embedding / residual / attention / logits multipliers
    gptoss_features: bool = False  # has GPT-OSS's sinks, o-proj / router / expert biases, clamped SwiGLU
    mxfp4: bool = False  # dequantises MXFP4 checkpoints (quantization_config.quant_method = "mxfp4")
    attention: AttentionKind = AttentionKind.GQA

    # -------------------------------------------------------------------------------------------- config
    def get(self, hf: dict, key: str, default: Any = None) -> Any:
        if key in hf and hf[key] is not None:
            return hf[key]
        return self.defaults.get(key, default)

    def _fail(self, msg: str) -> MoecptError:
        return MoecptError(f"{self.name} config: {msg}")

    def attn_bias(self, hf: dict) -> bool:
        """Bias on q/k/v (moecpt has none on the output projection)."""
        if self.get(hf, "attention_bias", False):
            raise self._fail("attention_bias = true puts a bias on the output projection too, which moecpt "
                             "does not have; not supported")
        return False

    def check(self, hf: dict) -> None:
        """Refuse configs with features moecpt does not represent (hook)."""

    def renormalize(self, hf: dict) -> bool:
        return bool(self.get(hf, "norm_topk_prob", False))

    def shared(self, hf: dict) -> tuple[int, bool]:
        """``(shared FFN width, sigmoid gate)``."""
        return 0, False

    def qk_norm_of(self, hf: dict) -> QKNorm:
        return self.qk_norm

    def rotary_fraction(self, hf: dict) -> float:
        return 1.0

    def router(self, hf: dict, top_k: int, renorm: bool) -> RouterConfig:
        """The imported router: a ``penalty`` router weighted as the module doc explains (hook)."""
        aux = float(self.get(hf, "router_aux_loss_coef", 0.0) or 0.0)
        z = float(hf.get("router_z_loss_coef") or 0.0)
        return RouterConfig(kind=RouterKind.PENALTY, aux_loss_weight=aux * top_k, z_loss_weight=z,
                            renormalize=renorm)

    def ignored(self, hf: dict, name: str) -> bool:
        """Whether checkpoint tensor ``name`` is knowingly left out of the import (hook; see :meth:`ignored_note`)."""
        return False

    def ignored_note(self, hf: dict) -> str:
        return ""

    def checkpoint_pieces(self, hf: dict, pieces: list[Piece]) -> list[Piece]:
        """The pieces as this checkpoint stores them (hook: GPT-OSS's MXFP4 experts); default unchanged."""
        return pieces

    def num_experts(self, hf: dict) -> int:
        for key in (self.num_experts_key, "num_experts", "num_local_experts"):
            if hf.get(key) is not None:
                return int(hf[key])
        return int(self.defaults[self.num_experts_key])

    def expert_width(self, hf: dict) -> int:
        return int(self.get(hf, "moe_intermediate_size") or self.get(hf, "intermediate_size"))

    def moe_layers(self, hf: dict, n_layers: int) -> list[bool]:
        if not self.has_dense_layers:
            return [True] * n_layers
        step = int(self.get(hf, "decoder_sparse_step", 1) or 1)
        only = set(self.get(hf, "mlp_only_layers", []) or [])
        return [(i not in only) and (i + 1) % step == 0 for i in range(n_layers)]

    def to_model_config(self, hf: dict) -> tuple[ModelConfig, list[str]]:
        """The moecpt :class:`ModelConfig` of a family ``config.json`` dict, plus notes on what was dropped.

        Raises:
            MoecptError: a feature with no moecpt equivalent (one line naming it).
        """
        notes: list[str] = []
        quant = hf.get("quantization_config")
        mxfp4 = self.mxfp4 and isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"
        if quant and not mxfp4:  # DeepSeek-V3 / Kimi-K2's fp8 blocks + scale tensors: refuse before the tensor check
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise self._fail(f"quantization_config ({method}) is set: quantised checkpoints are not supported; "
                             "import a bf16 / fp32 copy of the weights")
        self.check(hf)
        act = self.get(hf, "hidden_act", "silu")
        if act not in _ACT_TO_FFN:
            raise self._fail(f"hidden_act = {act!r} has no moecpt equivalent; supported: {', '.join(_ACT_TO_FFN)}")
        for rope in (hf.get("rope_parameters"), hf.get("rope_scaling")):  # either may carry the scaling
            rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
            # YaRN is read by every family: each transformers class builds its RoPE through transformers' rope
            # utils, whose "yarn" is the one moecpt implements (moecpt.model.yarn)
            if rope_type not in (None, "default", "yarn"):
                raise self._fail(f"RoPE scaling {rope_type!r} is not supported (moecpt has plain RoPE and YaRN); "
                                 "import a checkpoint without it, or with rope_type 'yarn'")
        ropes = [r for r in (hf.get("rope_parameters"), hf.get("rope_scaling")) if isinstance(r, dict)]
        scaled = [r for r in ropes if r.get("rope_type", r.get("type")) not in (None, "default")]
        rope = (scaled or ropes or [{}])[0]  # a scaling dict wins over a default one beside it (older configs)
        rope_type = rope.get("rope_type", rope.get("type"))
        theta = next((r["rope_theta"] for r in ropes if r.get("rope_theta")), None) or self.get(hf, "rope_theta")
        d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        n_layers = int(hf["num_hidden_layers"])
        max_seq = int(self.get(hf, "max_position_embeddings"))
        window, layer_types = _normal_windows(*self.attention_layers(hf, n_layers))
        E, K = self.num_experts(hf), int(self.get(hf, "num_experts_per_tok"))
        if E < 1:
            raise self._fail("num_experts = 0: the model has no MoE layers; import MoE models only")
        renorm = self.renormalize(hf)
        if renorm and K == 1:
            raise self._fail("renormalised top-1 gates are always 1.0; moecpt's router leaves top-1 gates "
                             "unrenormalised, so this model cannot be represented")
        moe_mask = self.moe_layers(hf, n_layers)
        layout = _layout_of(moe_mask)
        if layout is None:
            raise self._fail(f"MoE layers at {[i for i, m in enumerate(moe_mask) if m]} match no moecpt layout "
                             "(every, every_nth, after_dense)")
        shared_width, shared_gate = self.shared(hf)
        for key in ("router_jitter_noise", "attention_dropout"):
            if hf.get(key):
                notes.append(f"{key} = {hf[key]} is training-only and not reproduced")
        router = self.router(hf, K, renorm)
        moe = {"num_experts": E, "top_k": K, "expert_width": self.expert_width(hf), "granularity": 1,
               "num_shared_experts": 1 if shared_width else 0, "shared_expert_width": shared_width or None,
               "shared_expert_gate": shared_gate, "capacity_factor": None, "router": router.model_dump(), **layout}
        raw = {
            "vocab_size": int(hf["vocab_size"]), "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
            **self.attention_fields(hf, d_model, n_heads), "ffn_width": int(self.get(hf, "intermediate_size")),
            "ffn_kind": _ACT_TO_FFN[act].value, "max_seq_len": max_seq, "rope_theta": float(theta),
            "rope_yarn": _yarn_of(self, rope) if rope_type == "yarn" else None, "sliding_window": window,
            "layer_types": None if layer_types is None else [t.value for t in layer_types],
            "tie_embeddings": bool(self.get(hf, "tie_word_embeddings", False)),
            "norm_eps": float(self.get(hf, "rms_norm_eps")),
            "init_std": float(self.get(hf, "initializer_range", 0.02)), "moe": moe,
        }
        return build_section(ModelConfig, raw, f"{self.name} config"), notes

    def attention_fields(self, hf: dict, d_model: int, n_heads: int) -> dict[str, Any]:
        """The attention fields of the imported ``ModelConfig`` (hook; default: grouped-query attention)."""
        return {"n_kv_heads": int(self.get(hf, "num_key_value_heads") or n_heads),
                "head_dim": self.head_dim(hf, d_model, n_heads), "rotary_fraction": self.rotary_fraction(hf),
                "qk_norm": self.qk_norm_of(hf).value, "attn_bias": self.attn_bias(hf)}

    def head_dim(self, hf: dict, d_model: int, n_heads: int) -> int:
        hd = hf.get("head_dim")
        if hd:
            return int(hd)
        if d_model % n_heads:
            raise self._fail(f"hidden_size {d_model} is not divisible by num_attention_heads {n_heads}")
        return d_model // n_heads

    def attention_layers(self, hf: dict, n_layers: int) -> tuple[int | None, list[AttnKind] | None]:
        """``(window, per-layer kinds)`` of the config, as transformers 5 builds its masks (hook; default: every
        layer full). ``kinds = None`` with a window means every layer sliding."""
        return None, None

    def window_why_not(self, cfg: ModelConfig) -> str | None:
        """Why this family cannot hold ``cfg``'s attention windows (hook; default: it has none)."""
        if any(t == AttnKind.SLIDING for t in attn_kinds(cfg)):
            return f"{self.name} has no sliding-window attention; this model has sliding_window = {cfg.sliding_window}"
        return None

    # --------------------------------------------------------------------------------------------- export
    def why_not(self, cfg: ModelConfig) -> str | None:
        """Why ``cfg`` cannot be exported to this family exactly, or None (family-specific part)."""
        return None

    def routing_why_not(self, cfg: ModelConfig) -> str | None:
        """Why the router (and RoPE) of ``cfg`` has no match here; default: the softmax-routed, full-RoPE families,
        whose refusals name the family that does fit (GLM-4.5, DeepSeek-V3-style routing)."""
        moe = cfg.moe
        assert moe is not None
        r, glm = moe.router, "export it with --family glm4_moe (DeepSeek-V3-style routing)"
        if r.kind == RouterKind.BIAS:
            fix = glm if r.score_fn == ScoreFn.SIGMOID else "export it with --family ernie4_5_moe (softmax " \
                "scores with a selection bias)"
            return ("router.kind = 'bias' selects experts with per-expert biases (auxiliary-loss-free balancing), "
                    f"which the softmax-routed families lack; {fix}")
        if r.score_fn == ScoreFn.SIGMOID or r.n_group > 1 or r.routed_scale != 1.0:
            return f"sigmoid scores, expert groups and routed_scale are DeepSeek-V3 routing; {glm}"
        if cfg.rotary_fraction != 1.0:
            return (f"rotary_fraction = {cfg.rotary_fraction} (partial RoPE) is not supported by the softmax-routed "
                    "families (glm4_moe has it, with sigmoid routing)")
        if r.kind == RouterKind.SINKHORN and moe.top_k == 1:
            return "Sinkhorn top-1 routers gate with sigmoid(logit); these families gate with a softmax"
        return None

    def adapt(self, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, Callable], list[str]]:
        """The config this family writes, the moecpt tensors to synthesise for it (name -> ``fn(get)`` returning
        the tensor, where ``get(name)`` reads a tensor of the checkpoint) and notes on what was added.
        Default: unchanged."""
        return cfg, {}, []

    def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """``config.json`` of this family for ``cfg`` (as returned by :meth:`adapt`)."""
        moe = cfg.moe
        assert moe is not None
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_types[0],
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.resolved_kv_heads,
            "hidden_act": _FFN_TO_ACT[cfg.ffn_kind],
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "num_experts_per_tok": moe.top_k,
            self.num_experts_key: moe.num_experts,
            "router_aux_loss_coef": (moe.router.aux_loss_weight / moe.top_k
                                     if moe.router.kind == RouterKind.PENALTY else 0.0),
            "output_router_logits": False,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if cfg.rope_yarn is not None:  # the key transformers 4 reads and 5 converts (rope_parameters)
            out["rope_scaling"] = _yarn_params(cfg)
        out.update(self.hf_config_extra(cfg))
        if "rope_parameters" in out:
            out.pop("rope_scaling", None)
        return out

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        return {}

    # --------------------------------------------------------------------------------------------- tensors
    def plan(self, cfg: ModelConfig, fused: Callable[[int], bool] = lambda i: False) -> list[Piece]:
        """Every HF tensor of ``cfg`` and its moecpt destination, in moecpt state-dict order.

        Args:
            fused: layer index -> the checkpoint stores that layer's experts stacked (transformers >= 5 names
                ``experts.gate_up_proj`` / ``experts.down_proj``) instead of one tensor per expert.
        """
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
        pieces: list[Piece] = []

        def add(hf: str, dst: str, op: PieceOp = PieceOp.COPY, index: tuple[int, ...] = ()) -> None:
            pieces.append(Piece(hf, dst, op, _shape_of(shapes[dst], op, index), index))

        add("model.embed_tokens.weight", "tok_emb.weight")
        g, u, d = self.expert_proj
        for i in range(cfg.n_layers):
            L, B = f"model.layers.{i}", f"blocks.{i}"
            add(f"{L}.input_layernorm.weight", f"{B}.attn_norm.weight")
            for hf_name, ours in self.attention_tensors(cfg):
                add(f"{L}.self_attn.{hf_name}", f"{B}.attn.{ours}")
            add(f"{L}.post_attention_layernorm.weight", f"{B}.ffn_norm.weight")
            if not cfg.is_moe_layer(i):
                F = cfg.ffn_width
                add(f"{L}.mlp.gate_proj.weight", f"{B}.ffn.w_in.weight", PieceOp.ROWS, (0, F))
                add(f"{L}.mlp.up_proj.weight", f"{B}.ffn.w_in.weight", PieceOp.ROWS, (F, 2 * F))
                add(f"{L}.mlp.down_proj.weight", f"{B}.ffn.w_out.weight")
                continue
            M, moe, F = f"{L}.{self.moe_block}", cfg.moe, cfg.resolved_expert_width
            add(f"{M}.gate.weight", f"{B}.ffn.router.weight")
            if fused(i):
                add(f"{M}.experts.gate_up_proj", f"{B}.ffn.experts.w_in", PieceOp.FUSED_IN)
                add(f"{M}.experts.down_proj", f"{B}.ffn.experts.w_out", PieceOp.FUSED_OUT)
            else:
                for e in range(moe.num_experts):
                    X = f"{M}.experts.{e}"
                    add(f"{X}.{g}.weight", f"{B}.ffn.experts.w_in", PieceOp.EXPERT_IN, (e, 0, F))
                    add(f"{X}.{u}.weight", f"{B}.ffn.experts.w_in", PieceOp.EXPERT_IN, (e, F, 2 * F))
                    add(f"{X}.{d}.weight", f"{B}.ffn.experts.w_out", PieceOp.EXPERT_OUT, (e,))
            if moe.router.kind == RouterKind.BIAS:
                add(f"{M}.gate.e_score_correction_bias", f"{B}.ffn.router.expert_bias")
            Fs = moe.shared_expert_width or moe.num_shared_experts * F
            if Fs:
                S = f"{M}.{self.shared_name}"
                add(f"{S}.gate_proj.weight", f"{B}.ffn.shared.w_in.weight", PieceOp.ROWS, (0, Fs))
                add(f"{S}.up_proj.weight", f"{B}.ffn.shared.w_in.weight", PieceOp.ROWS, (Fs, 2 * Fs))
                add(f"{S}.down_proj.weight", f"{B}.ffn.shared.w_out.weight")
                if moe.shared_expert_gate:
                    add(f"{M}.shared_expert_gate.weight", f"{B}.ffn.shared_gate.weight")
        add("model.norm.weight", "norm.weight")
        if not cfg.tie_embeddings:
            add("lm_head.weight", "lm_head.weight")
        return pieces


    def attention_tensors(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        """``(HF name, moecpt name)`` of one layer's attention tensors, under ``self_attn.`` / ``attn.`` (hook)."""
        out = []
        for hf_name, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            out.append((f"{hf_name}.weight", f"{ours}.weight"))
            if cfg.attn_bias and ours != "wo":
                out.append((f"{hf_name}.bias", f"{ours}.bias"))
        if cfg.qk_norm != QKNorm.NONE:
            out += [("q_norm.weight", "q_norm.weight"), ("k_norm.weight", "k_norm.weight")]
        return out

    def attention_why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.attention == self.attention:
            return None
        if self.attention == AttentionKind.GQA:
            return ("multi-head latent attention (attention = 'mla') is DeepSeek-V2/V3's; export it with --family "
                    "deepseek_v3 (sigmoid routing) or deepseek_v2 (softmax routing)")
        return f"{self.name} has multi-head latent attention; this model has attention = {cfg.attention.value!r}"


def _yarn_of(family: Family, rope: dict) -> dict[str, Any]:
    """moecpt's ``rope_yarn`` of a transformers YaRN ``rope_parameters`` dict (DeepSeek's ``mscale`` /
    ``mscale_all_dim`` included)."""
    if rope.get("factor") is None or rope.get("original_max_position_embeddings") is None:
        raise family._fail("YaRN rope_parameters need factor and original_max_position_embeddings")
    return {"factor": float(rope["factor"]),
            "original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
            "beta_fast": float(rope.get("beta_fast") or 32.0), "beta_slow": float(rope.get("beta_slow") or 1.0),
            "truncate": bool(rope.get("truncate", True)), "attention_factor": rope.get("attention_factor"),
            "mscale": rope.get("mscale"), "mscale_all_dim": rope.get("mscale_all_dim")}


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


# ----------------------------------------------------------------------------------------------------- OLMoE
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


# --------------------------------------------------------------------------------------------------- Mixtral
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


# ------------------------------------------------------------------------------------------------- Qwen2-MoE
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


# ------------------------------------------------------------------------------------------------- Qwen3-MoE
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


# ----------------------------------------------------------------------------------------------- Granite-MoE
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


# ---------------------------------------------------------------------------------------------- Ernie-4.5-MoE
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


# ----------------------------------------------------------------------------------- DeepSeek-V3-routed families
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


# ---------------------------------------------------------------------------------------------------- GPT-OSS
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


# ------------------------------------------------------------------------------------------ DeepSeek-V2 / V3
class _MLA(_DeepSeekRouted):
    """DeepSeek's own families: multi-head latent attention (:mod:`moecpt.model.mla`; DeepSeek-V2, arXiv
    2405.04434, Sec. 2.1) under ``self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}``,
    ``kv_a_proj_with_mqa`` (latent then the shared rope key), ``kv_a_layernorm``, ``kv_b_proj`` (per head: key nope
    dims then value dims), ``o_proj``; interleaved RoPE on ``qk_rope_head_dim`` dims; the latent norms have
    transformers' fixed eps 1e-6."""

    attention = AttentionKind.MLA
    interleave_key: str | None = None  # the config key saying whether RoPE is interleaved (None: always)

    def check(self, hf: dict) -> None:
        if int(hf.get("moe_layer_freq") or 1) != 1:
            raise self._fail(f"moe_layer_freq = {hf['moe_layer_freq']} (MoE every n-th layer) is ignored by "
                             f"transformers' {self.name}; not supported")
        n_heads = int(hf["num_attention_heads"])
        if int(self.get(hf, "num_key_value_heads") or n_heads) != n_heads:
            raise self._fail(f"num_key_value_heads = {hf['num_key_value_heads']} differs from num_attention_heads "
                             f"= {n_heads}; latent attention decompresses every head's key (not supported)")

    def attention_fields(self, hf: dict, d_model: int, n_heads: int) -> dict[str, Any]:
        self.attn_bias(hf)  # refuses attention_bias (it would bias q_a / kv_a / o_proj)
        q_lora = hf["q_lora_rank"] if "q_lora_rank" in hf else self.defaults["q_lora_rank"]
        interleave = bool(self.get(hf, self.interleave_key, True)) if self.interleave_key else True
        mla = {"q_lora_rank": None if q_lora is None else int(q_lora), "rope_interleave": interleave,
               **{k: int(self.get(hf, k)) for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                   "v_head_dim")}}
        return {"attention": AttentionKind.MLA.value, "mla": mla}

    def attention_tensors(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        assert cfg.mla is not None
        q = [("q_proj.weight", "wq.weight")] if cfg.mla.q_lora_rank is None else [
            ("q_a_proj.weight", "wq_a.weight"), ("q_a_layernorm.weight", "q_norm.weight"),
            ("q_b_proj.weight", "wq_b.weight")]
        return q + [("kv_a_proj_with_mqa.weight", "wkv_a.weight"), ("kv_a_layernorm.weight", "kv_norm.weight"),
                    ("kv_b_proj.weight", "wkv_b.weight"), ("o_proj.weight", "wo.weight")]

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.mla.latent_norm_eps != 1e-6:
            return (f"{self.name}'s latent RMSNorms have eps 1e-6; this model has mla.latent_norm_eps = "
                    f"{cfg.mla.latent_norm_eps}")
        if not self.interleave_key and not cfg.mla.rope_interleave:
            return f"{self.name} always interleaves RoPE pairs; this model has mla.rope_interleave = false"
        return super().why_not(cfg)

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.mla
        out = {**super().hf_config_extra(cfg), "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank,
               "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
               "v_head_dim": m.v_head_dim, "attention_bias": False}
        del out["head_dim"]  # derived by transformers (qk_rope_head_dim)
        if self.interleave_key:
            out[self.interleave_key] = m.rope_interleave
        if cfg.rope_yarn is not None:
            out["rope_parameters"] = _yarn_params(cfg)
        return out


class DeepseekV3(_MLA):
    """DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437; ``deepseek-ai/DeepSeek-V3``; also Moonlight and the
    Kimi-K2 checkpoints, saved as ``deepseek_v3``): MLA with an optional query latent and ``rope_interleave``,
    DeepSeek-V3 routing (sigmoid, ``e_score_correction_bias``, groups scored by their two best experts,
    ``norm_topk_prob``, ``routed_scaling_factor``), shared experts, dense first layers, multi-token-prediction
    layers dropped on import."""

    name = "deepseek_v3"
    model_types = ("deepseek_v3", "kimi_k2")  # Kimi-K2 ships DeepseekV3ForCausalLM under its own model_type
    architecture = "DeepseekV3ForCausalLM"
    reference = "DeepSeek-AI 2024, DeepSeek-V3 Technical Report (arXiv 2412.19437); deepseek-ai/DeepSeek-V3"
    interleave_key = "rope_interleave"
    #: transformers' DeepseekV3Config defaults
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "n_routed_experts": 256, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "tie_word_embeddings": False, "initializer_range": 0.02, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "n_group": 8,
        "topk_group": 4, "first_k_dense_replace": 3, "attention_bias": False, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "rope_interleave": True, "num_nextn_predict_layers": 0}

    def check(self, hf: dict) -> None:
        super().check(hf)
        for key, want in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
            if hf.get(key) not in (None, want):
                raise self._fail(f"{key} = {hf[key]!r} is not DeepSeek-V3 routing ({want!r}); not supported")

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        return {**super().hf_config_extra(cfg), "num_nextn_predict_layers": 0}


class DeepseekV2(_MLA):
    """DeepSeek-V2 / V2-Lite (DeepSeek-AI 2024, arXiv 2405.04434; ``deepseek-ai/DeepSeek-V2-Lite``): MLA (V2-Lite:
    no query latent) with RoPE in interleaved pairs, softmax routing, ``topk_method`` ``greedy`` or
    ``group_limited_greedy`` (groups scored by their best expert, Sec. 2.1.2 "device-limited routing"), gates scaled
    by ``routed_scaling_factor`` and never renormalised (transformers' ``DeepseekV2TopkRouter`` ignores
    ``norm_topk_prob``, so a config setting it is refused), shared experts, dense first layers. Balanced by a
    softmax aux loss: ``aux_loss_alpha`` (DeepSeek's config; per sequence when ``seq_aux``) is imported as
    ``seq_aux_loss_weight`` (or ``aux_loss_weight``), the expert-level balance loss of Sec. 2.2.3 eq. 21-23."""

    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    architecture = "DeepseekV2ForCausalLM"
    reference = "DeepSeek-AI 2024, DeepSeek-V2 (arXiv 2405.04434); deepseek-ai/DeepSeek-V2-Lite"
    #: transformers' DeepseekV2Config defaults
    defaults: ClassVar[dict[str, Any]] = {"hidden_act": "silu", "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "n_routed_experts": 64, "norm_topk_prob": False,
        "tie_word_embeddings": False, "initializer_range": 0.02, "intermediate_size": 11008,
        "moe_intermediate_size": 1407, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 0, "attention_bias": False, "mlp_bias": False, "topk_method": "greedy",
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "num_nextn_predict_layers": 0}
    topk_methods = ("greedy", "group_limited_greedy")

    def check(self, hf: dict) -> None:
        super().check(hf)
        method = self.get(hf, "topk_method")
        if method not in self.topk_methods:
            raise self._fail(f"topk_method = {method!r} is not supported; supported: {', '.join(self.topk_methods)}")
        if self.get(hf, "mlp_bias"):
            raise self._fail("mlp_bias = true (biases on the FFN projections) is not supported by moecpt")
        if self.get(hf, "norm_topk_prob") and int(self.get(hf, "num_experts_per_tok")) > 1:
            raise self._fail("norm_topk_prob = true: transformers' DeepSeek-V2 ignores it while DeepSeek's code "
                             "renormalises, so the model has no single meaning; set it false")
        if hf.get("scoring_func") not in (None, "softmax"):
            raise self._fail(f"scoring_func = {hf['scoring_func']!r} is not DeepSeek-V2 routing ('softmax')")

    def router(self, hf: dict, top_k: int, renorm: bool) -> RouterConfig:
        grouped = self.get(hf, "topk_method") == "group_limited_greedy"
        alpha = float(hf.get("aux_loss_alpha") or 0.0)
        per_seq = bool(hf.get("seq_aux", True))
        return RouterConfig(kind=RouterKind.PENALTY, score_fn=ScoreFn.SOFTMAX, renormalize=False,
                            n_group=int(self.get(hf, "n_group")) if grouped else 1,
                            topk_group=int(self.get(hf, "topk_group")) if grouped else None,
                            group_score=GroupScore.MAX, routed_scale=float(self.get(hf, "routed_scaling_factor")),
                            aux_loss_weight=0.0 if per_seq else alpha, seq_aux_loss_weight=alpha if per_seq else 0.0,
                            z_loss_weight=0.0)

    def routing_why_not(self, cfg: ModelConfig) -> str | None:
        moe = cfg.moe
        r = moe.router
        if r.score_fn != ScoreFn.SOFTMAX:
            return "deepseek_v2 routes by softmax scores; a sigmoid-routed MLA model exports to deepseek_v3"
        if r.kind == RouterKind.BIAS:
            return ("deepseek_v2 has no selection biases (router.kind = 'bias'); deepseek_v3 has them, with "
                    "router.score_fn = 'sigmoid'")
        if r.kind == RouterKind.SINKHORN and moe.top_k == 1:
            return "Sinkhorn top-1 routers gate with sigmoid(logit); deepseek_v2 gates with a softmax"
        if _renorm(cfg):
            return "transformers' deepseek_v2 never renormalises the top-k gates; this model does"
        if r.n_group > 1 and r.group_score != GroupScore.MAX:
            return ("deepseek_v2 scores an expert group by its best expert (group_limited_greedy); this model has "
                    f"router.group_score = {r.group_score.value!r}")
        return None

    def adapt(self, cfg: ModelConfig) -> tuple[ModelConfig, dict[str, Callable], list[str]]:
        """A shared expert is always there: a model without one gets one of zero projections (it adds 0)."""
        if _shared_width(cfg):
            return cfg, {}, []
        synth: dict[str, Callable] = {}
        _synth_zero_shared(synth, [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)], cfg.d_model,
                           cfg.resolved_expert_width)
        moe = cfg.moe.model_copy(update={"num_shared_experts": 1, "shared_expert_width": None})
        return (cfg.model_copy(update={"moe": moe}), synth,
                ["a shared expert with zero projections added (deepseek_v2 always has one; it adds 0)"])

    def why_not(self, cfg: ModelConfig) -> str | None:
        if cfg.d_model % cfg.n_heads:
            return f"deepseek_v2 needs d_model ({cfg.d_model}) divisible by n_heads ({cfg.n_heads})"
        return super().why_not(cfg)

    def hf_config_extra(self, cfg: ModelConfig) -> dict[str, Any]:
        r = cfg.moe.router
        grouped = r.n_group > 1
        alpha = r.seq_aux_loss_weight or (r.aux_loss_weight if r.kind == RouterKind.PENALTY else 0.0)
        return {**super().hf_config_extra(cfg), "topk_method": "group_limited_greedy" if grouped else "greedy",
                "n_group": r.n_group if grouped else None, "topk_group": r.resolved_topk_group if grouped else None,
                "norm_topk_prob": False, "mlp_bias": False, "aux_loss_alpha": alpha,
                "seq_aux": r.seq_aux_loss_weight > 0 or not r.aux_loss_weight}


#: Supported families by name, in the order ``export-hf --family auto`` tries them.
FAMILIES: dict[str, Family] = {f.name: f for f in (OLMoE(), Qwen3MoE(), Mixtral(), Qwen2MoE(), Glm4Moe(), Dots1(),
                                                   GraniteMoE(), GraniteMoEShared(), Ernie45MoE(), DeepseekV3(),
                                                   DeepseekV2(), GptOss())}


def supported() -> str:
    return ", ".join(f"{f.name} ({f.architecture})" for f in FAMILIES.values())


def family_of(hf: dict) -> Family:
    """The family of a ``config.json`` dict: by ``model_type``, or, when that key is missing, by the first of
    ``architectures`` (some hand-written configs have only that).

    Raises:
        MoecptError: an unsupported family, naming the supported ones; neither key present.
    """
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    for fam in FAMILIES.values():
        if mt in fam.model_types or (mt is None and arch == fam.architecture):
            return fam
    if mt is None and arch is None:
        raise MoecptError("config.json has neither model_type nor architectures; add \"model_type\" (one of: "
                          f"{', '.join(f.model_types[0] for f in FAMILIES.values())})")
    raise MoecptError(f"model_type {mt!r} ({arch}) is not supported; supported families: {supported()}")


def why_not(family: Family, cfg: ModelConfig) -> str | None:
    """Why ``cfg`` cannot be written as ``family`` exactly, or None."""
    return _common_why_not(cfg) or _family_why_not(family, cfg)


def _family_why_not(family: Family, cfg: ModelConfig) -> str | None:
    return (family.attention_why_not(cfg) or _gptoss_why_not(family, cfg) or _multipliers_why_not(family, cfg)
            or family.window_why_not(cfg) or family.routing_why_not(cfg) or family.why_not(cfg))


def _gptoss_why_not(family: Family, cfg: ModelConfig) -> str | None:
    """GPT-OSS's attention sinks, output / router / expert biases and clamped SwiGLU exist in no other family."""
    if family.gptoss_features:
        return None
    moe = cfg.moe
    odd = [k for k, on in (("attn_sinks", cfg.attn_sinks), ("attn_out_bias", cfg.attn_out_bias),
                           ("ffn_kind = 'swiglu_clamped'", cfg.ffn_kind == FFNKind.SWIGLU_CLAMPED),
                           ("moe.expert_bias", moe.expert_bias), ("moe.router.logit_bias", moe.router.logit_bias))
           if on]
    return f"{', '.join(odd)} exist only in GPT-OSS; export with --family gpt_oss" if odd else None


def _multipliers_why_not(family: Family, cfg: ModelConfig) -> str | None:
    """Granite-MoE's multipliers have no place in the other families' configs."""
    if family.multipliers:
        return None
    odd = [k for k, unit in (("embedding_multiplier", 1.0), ("residual_multiplier", 1.0), ("logits_scaling", 1.0))
           if getattr(cfg, k) != unit]
    if cfg.attention_multiplier is not None and cfg.attention_multiplier != attention_head_dims(cfg)[0] ** -0.5:
        odd.append("attention_multiplier")
    return (f"{', '.join(odd)} (muP-style multipliers) exist only in Granite-MoE; export with --family granitemoe"
            if odd else None)


def choose_family(cfg: ModelConfig, requested: str = "auto", preferred: str | None = None) -> Family:
    """The family to export ``cfg`` to: ``requested``, or (``auto``) ``preferred`` (the family the model was
    imported from) when it fits, else the first of :data:`FAMILIES` that represents it exactly.

    Raises:
        MoecptError: unknown family name, or no family represents the model (one line with the reason).
    """
    if requested != "auto":
        if requested not in FAMILIES:
            raise MoecptError(f"--family {requested!r} is unknown; choose auto or one of: {', '.join(FAMILIES)}")
        fam = FAMILIES[requested]
        reason = why_not(fam, cfg)
        if reason:
            raise MoecptError(f"cannot export to {fam.name}: {reason}")
        return fam
    common = _common_why_not(cfg)
    if common:
        raise MoecptError(f"cannot export to a Hugging Face family: {common}")
    order = list(FAMILIES.values())
    if preferred in FAMILIES:
        order.insert(0, FAMILIES[preferred])
    by_reason: dict[str, list[str]] = {}  # the softmax families often share one refusal: say it once
    for fam in order:
        reason = _family_why_not(fam, cfg)
        if reason is None:
            return fam
        by_reason.setdefault(reason, []).append(fam.name)
    reasons = [f"{', '.join(dict.fromkeys(names))}: {reason}" for reason, names in by_reason.items()]
    raise MoecptError("no Hugging Face family represents this model exactly (" + "; ".join(reasons) + ")")
