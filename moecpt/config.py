"""Typed, validated configuration: model, data mixture, optimiser, LR schedule, training, distributed.

A *recipe* is a TOML file whose top-level tables map onto :class:`Recipe`. Every section is a pydantic model with
``extra="forbid"``, so an unknown key is an error naming the key; ``--set section.key=value`` overrides are
validated exactly like the file. Model presets (``[model] preset = "demo-granular"``) fill in sizes; any key
given beside the preset overrides it.

Presets follow Thérien et al. 2025 (arXiv 2503.05029, Sec. 3): a Llama-3-style decoder with GEGLU FFN; Switch =
8 experts of the dense FFN width, top-1; Granular = 31 routed + 1 shared expert of a quarter of the dense width,
top-3 (+ shared). The CPU-sized ``demo-*`` and ``smoke-*`` presets keep those ratios, so dense and MoE variants of
one size are FLOP-matched (same active FFN width per token).
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
import typing
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from moecpt.errors import MoecptError

#: the field types of every config section. Pydantic's lax mode would turn ``--set train.steps=true`` into 1,
#: ``train.compile = "yes"`` or ``2`` into True and ``"3"`` into 3; strict types refuse them in one line naming the
#: key. An integer still fills a float field (TOML ``lr = 1``): pydantic's strict float takes ints.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class _Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and every float (also
    inside lists and dicts) must be finite: ``inf`` / ``nan`` are refused, never trained with."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------------------- model
class RouterKind(StrEnum):
    """Balancing strategy of a router (docs/design.md, rule R1)."""

    PENALTY = "penalty"  # PBTk: softmax top-k + Switch aux loss + z-loss
    SINKHORN = "sinkhorn"  # SBTk: Sinkhorn-Knopp balanced selection during training
    BIAS = "bias"  # DeepSeek-V3 auxiliary-loss-free bias balancing
    NONE = "none"  # plain softmax top-k, no balancing


class ScoreFn(StrEnum):
    """How router logits become the scores gates are taken from (``router.score_fn``)."""

    SOFTMAX = "softmax"  # softmax over the experts (Switch, Mixtral, Qwen, OLMoE; DeepSeek-V2)
    SIGMOID = "sigmoid"  # independent sigmoid per expert (DeepSeek-V3, GLM-4.5, dots1, Kimi-K2)


class GroupScore(StrEnum):
    """How an expert group is scored for group-limited top-k (``router.group_score``)."""

    TOP2_SUM = "top2_sum"  # the sum of its two best choice scores (DeepSeek-V3 ``noaux_tc``, GLM-4.5, dots1)
    MAX = "max"  # its best score (DeepSeek-V2 ``group_limited_greedy``)


class RouterConfig(_Strict):
    """A router's balancing strategy and gate rules (docs/design.md, rules R1-R6).

    ``kind = "bias"`` with ``score_fn = "sigmoid"`` and groups is DeepSeek-V3 routing (DeepSeek-AI 2024, arXiv
    2412.19437, Sec. 2.1.2, eqs. 12-16): ``s = sigmoid(u . e)``; experts chosen as the top-k of ``s + b`` among the
    ``topk_group`` best of ``n_group`` expert groups (a group scores the sum of its two best biased scores;
    group-limited routing of DeepSeek-V2, arXiv 2405.04434, Sec. 2.1.2); gates the *unbiased* ``s`` of the chosen
    experts, renormalised to sum to one (``renormalize``, transformers' ``norm_topk_prob``) and multiplied by
    ``routed_scale`` (``routed_scaling_factor``). ``seq_aux_loss_weight`` adds the complementary sequence-wise
    balance loss (eqs. 17-20). The defaults leave every router as it was before these fields existed.
    """

    kind: RouterKind = RouterKind.PENALTY
    aux_loss_weight: Float = Field(0.01, ge=0.0)
    z_loss_weight: Float = Field(0.001, ge=0.0)
    renormalize: Bool = Field(
        False, description="renormalise the top-k gates to sum to one (Mixtral, Qwen3-MoE, GLM-4.5); OLMoE: False"
    )
    sinkhorn_tol: Float = Field(0.01, gt=0.0)
    sinkhorn_max_iter: Int = Field(100, ge=1)
    bias_update_rate: Float = Field(1e-3, ge=0.0, description="DeepSeek-V3 gamma: bias step per optimizer step")
    score_fn: ScoreFn = Field(ScoreFn.SOFTMAX, description="softmax | sigmoid (DeepSeek-V3 / GLM-4.5 scores)")
    n_group: Int = Field(1, ge=1, description="expert groups for group-limited top-k (DeepSeek-V2/V3); 1 = none")
    topk_group: Int | None = Field(None, ge=1, description="groups a token may route to; None = all n_group")
    group_score: GroupScore = Field(GroupScore.TOP2_SUM, description="group score: top2_sum (V3) | max (V2)")
    routed_scale: Float = Field(1.0, gt=0.0, description="routed gates x this (DeepSeek-V3 routed_scaling_factor)")
    seq_aux_loss_weight: Float = Field(
        0.0, ge=0.0, description="weight of DeepSeek-V3's sequence-wise balance loss (paper: 1e-4); 0 = off")
    logit_bias: Bool = Field(False, description="a learned bias on the router logits (GPT-OSS mlp.router.bias)")

    @model_validator(mode="after")
    def _check(self) -> "RouterConfig":
        if self.kind == RouterKind.SINKHORN and (self.score_fn != ScoreFn.SOFTMAX or self.n_group > 1):
            raise ValueError("router.kind = 'sinkhorn' selects by its balanced plan and gates by its own "
                             "rule; it takes neither score_fn = 'sigmoid' nor n_group > 1 (use kind = 'bias')")
        if self.topk_group is not None and self.topk_group > self.n_group:
            raise ValueError(f"router.topk_group={self.topk_group} exceeds router.n_group={self.n_group}; "
                             "choose topk_group <= n_group")
        return self

    @property
    def resolved_topk_group(self) -> int:
        return self.n_group if self.topk_group is None else self.topk_group


class MoELayout(StrEnum):
    EVERY = "every"  # every FFN is an MoE
    EVERY_NTH = "every_nth"  # layers i with (i + 1) % every_n == 0
    AFTER_DENSE = "after_dense"  # the first `first_dense` layers dense, the rest MoE


class DispatchKind(StrEnum):
    GROUPED = "grouped"  # sort tokens by expert, grouped matmul (fast path)
    LOOP = "loop"  # simple loop over experts (reference)


class MoEConfig(_Strict):
    num_experts: Int = Field(8, ge=1, description="routed experts")
    top_k: Int = Field(1, ge=1)
    expert_width: Int | None = Field(
        None, ge=1, description="hidden width of each routed expert; default ffn_width // granularity"
    )
    granularity: Int = Field(1, ge=1, description="expert width = dense FFN width / granularity")
    num_shared_experts: Int = Field(0, ge=0, description="always-on shared experts, each of expert_width")
    shared_expert_width: Int | None = Field(
        None, ge=1, description="total shared FFN width; default n_shared * expert_width")
    shared_expert_gate: Bool = Field(False, description="sigmoid gate on the shared expert output (Qwen2-MoE)")
    expert_bias: Bool = Field(False, description="biases on the routed experts' in / out projections (GPT-OSS)")
    capacity_factor: Float | None = Field(
        None, gt=0.0, description="Switch capacity factor with token dropping; None = dropless"
    )
    layout: MoELayout = MoELayout.EVERY
    every_n: Int = Field(1, ge=1)
    first_dense: Int = Field(0, ge=0)
    dispatch: DispatchKind = DispatchKind.GROUPED
    router: RouterConfig = Field(default_factory=RouterConfig)

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}; choose top_k <= num_experts"
            )
        r = self.router
        if r.n_group > 1:  # group-limited routing (DeepSeek-V2 arXiv 2405.04434, DeepSeek-V3 arXiv 2412.19437)
            if self.num_experts % r.n_group or self.num_experts // r.n_group < 2:
                raise ValueError(f"moe.router.n_group={r.n_group} must split moe.num_experts={self.num_experts} "
                                 "into equal groups of at least 2 experts (a group scores its two best)")
            if r.resolved_topk_group * (self.num_experts // r.n_group) < self.top_k:
                raise ValueError(f"moe.router.topk_group={r.resolved_topk_group} groups of "
                                 f"{self.num_experts // r.n_group} experts hold fewer than moe.top_k={self.top_k}; "
                                 "raise topk_group or lower top_k")
        return self


class QKNorm(StrEnum):
    NONE = "none"
    HEAD = "head"  # RMSNorm over each head's dims (Qwen3-MoE)
    FULL = "full"  # RMSNorm over the whole q / k projection (OLMoE)


class AttentionKind(StrEnum):
    """The attention of every layer (``model.attention``)."""

    GQA = "gqa"  # multi-head / grouped-query attention (n_kv_heads, head_dim, qk_norm, attn_bias)
    MLA = "mla"  # multi-head latent attention of DeepSeek-V2/V3 (``model.mla``)


class MLAConfig(_Strict):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1, eqs. 9-19; DeepSeek-V3, arXiv
    2412.19437, Sec. 2.1.1): keys and values of all heads are decompressed from one ``kv_lora_rank`` latent per
    token; each head's query and key are ``[nope | rope]`` with the rope part of the key one head shared by all
    heads (the decoupled RoPE key); the softmax scale is ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``.
    The defaults are demo-sized (``d_model`` 128); DeepSeek-V2-Lite has ``q_lora_rank`` None, ``kv_lora_rank``
    512 and head dims 128 (nope) / 64 (rope) / 128 (v); DeepSeek-V3 ``q_lora_rank`` 1536 with the same others."""

    q_lora_rank: Int | None = Field(None, ge=1, description="query latent rank; None = a full q projection (V2-Lite)")
    kv_lora_rank: Int = Field(64, ge=1, description="key/value latent rank (the cached per-token latent)")
    qk_nope_head_dim: Int = Field(32, ge=1, description="per-head query/key dims without RoPE")
    qk_rope_head_dim: Int = Field(16, ge=2, description="per-head query dims (and the shared key's) with RoPE")
    v_head_dim: Int = Field(32, ge=1, description="per-head value dims")
    rope_interleave: Bool = Field(True, description="RoPE rotates pairs (0,1),(2,3),... as DeepSeek's weights "
                                  "expect; false: the half-rotation layout (Llama)")
    latent_norm_eps: Float = Field(1e-6, gt=0, description="eps of the q / kv latent RMSNorms (DeepSeek: 1e-6)")

    @model_validator(mode="after")
    def _check(self) -> "MLAConfig":
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        return self

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class FFNKind(StrEnum):
    GEGLU = "geglu"
    SWIGLU = "swiglu"
    #: GPT-OSS's clamped SwiGLU (OpenAI 2025, arXiv 2508.10925): ``(clamp(up, ±7) + 1) * g * sigmoid(1.702 g)``,
    #: ``g = min(gate, 7)`` (moecpt.model.glu.clamped_swiglu)
    SWIGLU_CLAMPED = "swiglu_clamped"


class AttnKind(StrEnum):
    """A layer's attention span (transformers' ``layer_types``)."""

    FULL = "full"  # every earlier position
    SLIDING = "sliding"  # the last ``sliding_window`` positions, itself included: keys in (t - W, t]


class YarnConfig(_Strict):
    """YaRN RoPE scaling (Peng et al. 2024, arXiv 2309.00071; transformers ``rope_type = "yarn"``); see
    :mod:`moecpt.model.yarn`."""

    factor: Float = Field(gt=0, description="context extension factor (GPT-OSS: 32)")
    original_max_position_embeddings: Int = Field(ge=1, description="the pre-extension context (GPT-OSS: 4096)")
    beta_fast: Float = Field(32.0, gt=0, description="dims turning more often than this keep their frequency")
    beta_slow: Float = Field(1.0, gt=0, description="dims turning less often than this are interpolated")
    truncate: Bool = Field(True, description="floor / ceil the correction range (GPT-OSS: false)")
    attention_factor: Float | None = Field(None, gt=0, description="cos / sin multiplier; None = 0.1 ln(factor) + 1")
    mscale: Float | None = Field(None, ge=0, description="DeepSeek-V2/V3: numerator scalar of the attention factor")
    mscale_all_dim: Float | None = Field(
        None, ge=0, description="DeepSeek-V2/V3: denominator scalar of the attention factor; MLA also multiplies its "
        "softmax scale by (0.1 mscale_all_dim ln(factor) + 1)^2")


class ModelConfig(_Strict):
    """Decoder-only transformer; ``moe=None`` gives the dense model."""

    preset: str | None = Field(None, description="name of a preset that fills the fields not given")
    vocab_size: Int | None = Field(None, ge=2, description="None: taken from the prepared data's tokenizer")
    d_model: Int = Field(128, ge=8)
    n_layers: Int = Field(4, ge=1)
    n_heads: Int = Field(4, ge=1)
    n_kv_heads: Int | None = Field(None, ge=1, description="grouped-query attention; None = n_heads")
    head_dim: Int | None = Field(None, ge=2, description="None = d_model // n_heads")
    ffn_width: Int = Field(352, ge=1, description="dense FFN hidden width")
    ffn_kind: FFNKind = FFNKind.GEGLU
    max_seq_len: Int = Field(128, ge=1)
    rope_theta: Float = Field(500_000.0, gt=0)
    rotary_fraction: Float = Field(1.0, gt=0.0, le=1.0, description="share of each head's dims that RoPE rotates")
    rope_yarn: YarnConfig | None = Field(None, description="YaRN RoPE scaling (GPT-OSS); None = plain RoPE")
    qk_norm: QKNorm = Field(QKNorm.NONE, description="RMSNorm on queries/keys: per head (Qwen3-MoE) or full (OLMoE)")
    attn_bias: Bool = Field(False, description="bias on q/k/v projections (Qwen2-MoE)")
    attn_out_bias: Bool = Field(False, description="bias on the attention output projection (GPT-OSS)")
    attn_sinks: Bool = Field(False, description="a learned per-head logit in the softmax denominator (GPT-OSS)")
    sliding_window: Int | None = Field(
        None, ge=1, description="window W of the sliding layers: token t attends to keys (t - W, t]; None = none")
    layer_types: list[AttnKind] | None = Field(
        None, description="per-layer full | sliding; None = every layer sliding if sliding_window is set, else full")
    tie_embeddings: Bool = False
    norm_eps: Float = Field(1e-5, gt=0)
    init_std: Float = Field(0.02, gt=0)
    attention: AttentionKind = Field(AttentionKind.GQA, description="gqa | mla (multi-head latent, model.mla)")
    mla: MLAConfig | None = Field(None, description="MLA shapes; required with attention = 'mla'")
    # muP-style multipliers of Granite-MoE (IBM Granite 3.0 language models, 2024); 1 / None = the usual model
    embedding_multiplier: Float = Field(1.0, gt=0, allow_inf_nan=False, description="token embeddings × this")
    residual_multiplier: Float = Field(
        1.0, gt=0, allow_inf_nan=False, description="attention and FFN outputs × this before each residual add")
    attention_multiplier: Float | None = Field(
        None, gt=0, allow_inf_nan=False, description="softmax scale of q·k; None = 1 / sqrt(head_dim)")
    logits_scaling: Float = Field(1.0, gt=0, allow_inf_nan=False, description="logits ÷ this")
    moe: MoEConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={kv}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; set head_dim"
            )
        if self.attention == AttentionKind.MLA:
            self._check_mla()
            odd = [k for k in ("sliding_window", "attn_sinks", "attn_out_bias") if getattr(self, k)]
            if odd:
                raise ValueError(f"model.{', model.'.join(odd)} apply to attention = 'gqa' only (MLA has none); "
                                 "drop them or use attention = 'gqa'")
        elif self.mla is not None:
            raise ValueError("model.mla is set but model.attention = 'gqa'; set attention = 'mla' or drop [model.mla]")
        rot = int(self.resolved_head_dim * self.rotary_fraction)
        if self.attention == AttentionKind.GQA and (rot < 2 or rot % 2):
            raise ValueError(
                f"model.rotary_fraction={self.rotary_fraction} gives {rot} rotary dims; it must give an even "
                f"number >= 2 of the head's {self.resolved_head_dim}"
            )
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            raise ValueError(f"model.layer_types has {len(self.layer_types)} entries for model.n_layers="
                             f"{self.n_layers}; give one 'full' or 'sliding' per layer")
        if self.sliding_window is None and AttnKind.SLIDING in (self.layer_types or []):
            raise ValueError("model.layer_types has 'sliding' layers but model.sliding_window is not set; set it")
        if self.moe is not None and self.moe.expert_width is None and self.ffn_width % self.moe.granularity:
            raise ValueError(
                f"model.moe.granularity={self.moe.granularity} does not divide model.ffn_width={self.ffn_width}; "
                "choose a divisor or set model.moe.expert_width"
            )
        return self

    def _check_mla(self) -> None:
        if self.mla is None:
            raise ValueError("model.attention = 'mla' needs a [model.mla] table (kv_lora_rank, qk_nope_head_dim, ...)")
        gqa_only = {"n_kv_heads": self.n_kv_heads is not None and self.n_kv_heads != self.n_heads,
                    "head_dim": self.head_dim is not None, "qk_norm": self.qk_norm != QKNorm.NONE,
                    "attn_bias": self.attn_bias, "rotary_fraction": self.rotary_fraction != 1.0}
        bad = [k for k, v in gqa_only.items() if v]
        if bad:
            raise ValueError(f"model.{bad[0]} is a grouped-query attention setting; with attention = 'mla' the "
                             "head shapes are in [model.mla] (leave it unset)")

    @property
    def rotary_dims(self) -> int:
        """RoPE dims of a query head: ``mla.qk_rope_head_dim`` for MLA, else ``head_dim * rotary_fraction``."""
        if self.attention == AttentionKind.MLA:
            assert self.mla is not None
            return self.mla.qk_rope_head_dim
        return int(self.resolved_head_dim * self.rotary_fraction)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_expert_width(self) -> int:
        assert self.moe is not None
        return self.moe.expert_width or self.ffn_width // self.moe.granularity

    def window_of(self, layer_idx: int) -> int | None:
        """The attention window of layer ``layer_idx``: ``sliding_window`` on a sliding layer, else None (full)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer_idx] == AttnKind.SLIDING:
            return self.sliding_window
        return None

    def is_moe_layer(self, layer_idx: int) -> bool:
        moe = self.moe
        if moe is None:
            return False
        if moe.layout == MoELayout.EVERY:
            return True
        if moe.layout == MoELayout.EVERY_NTH:
            return (layer_idx + 1) % moe.every_n == 0
        return layer_idx >= moe.first_dense


def _dense(d_model: int, n_layers: int, n_heads: int, ffn: int, seq: int, vocab: int | None) -> dict[str, Any]:
    return dict(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, ffn_width=ffn, max_seq_len=seq, vocab_size=vocab
    )


def _switch(base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "moe": dict(num_experts=8, top_k=1, granularity=1, num_shared_experts=0)}


def _granular(base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "moe": dict(num_experts=31, top_k=3, granularity=4, num_shared_experts=1)}


_PAPER = _dense(1024, 24, 16, 2816, 2048, 128_256)
_DEMO = _dense(128, 4, 4, 352, 128, None)  # 352 / 128 = 2816 / 1024
_SMOKE = _dense(64, 2, 2, 176, 64, None)

#: Model presets: name -> ModelConfig fields. ``paper-*`` are the paper's sizes (about 570M dense; about 2.02B
#: total / 570M active for the MoEs); ``demo-*`` run the bundled study on a laptop CPU; ``smoke-*`` are for tests.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "paper-dense": _PAPER,
    "paper-switch": _switch(_PAPER),
    "paper-granular": _granular(_PAPER),
    "demo-dense": _DEMO,
    "demo-switch": _switch(_DEMO),
    "demo-granular": _granular(_DEMO),
    "smoke-dense": _SMOKE,
    "smoke-switch": _switch(_SMOKE),
    "smoke-granular": _granular(_SMOKE),
}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_model_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """Merge ``raw`` (the ``[model]`` table) over its preset's fields.

    Raises:
        MoecptError: unknown preset name (the message lists the allowed ones).
    """
    name = raw.get("preset")
    if name is None:
        return raw
    if name not in MODEL_PRESETS:
        raise MoecptError(f"model.preset={name!r} is unknown; allowed: {', '.join(sorted(MODEL_PRESETS))}")
    return _deep_merge(MODEL_PRESETS[name], raw)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a validated :class:`ModelConfig` from a preset name plus field overrides."""
    return build_section(ModelConfig, expand_model_preset({"preset": name, **overrides}), "model")


# ------------------------------------------------------------------------------------------------------------ data
class DataConfig(_Strict):
    """What to train on: a prepared data folder (``moecpt data prepare``) and a mixture of its sources.

    Replay is a mixture weight (Ibrahim et al. 2024, Sec. 5.1): with ``mixture = {code = 0.7, english = 0.3}`` and a
    fixed token budget, 30% of the CPT tokens are replayed English *instead of* code (compute-equivalent replay).
    """

    path: str = Field("demo", description="prepared data folder, or 'demo' for the bundled demo data")
    mixture: dict[str, Float] = Field(default_factory=lambda: {"english": 1.0})
    seq_len: Int = Field(128, ge=2, description="tokens per training sequence")
    allow_repeat: Bool = Field(False, description="allow more than one epoch over a source (reported)")
    eval_sources: list[str] | None = Field(None, description="sources evaluated on held-out data; None = all")

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if not self.mixture:
            raise ValueError("data.mixture is empty; give at least one source with a positive weight")
        for name, weight in self.mixture.items():
            if weight < 0:
                raise ValueError(f"data.mixture.{name}={weight} is negative; weights must be >= 0")
        if sum(self.mixture.values()) <= 0:
            raise ValueError("data.mixture weights sum to zero; give at least one positive weight")
        return self


# ------------------------------------------------------------------------------------------------------- optimiser
class OptimConfig(_Strict):
    """AdamW (Loshchilov & Hutter); defaults of Thérien et al. 2025 / Ibrahim et al. 2024."""

    lr: Float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr: Float = Field(3e-5, ge=0)
    beta1: Float = Field(0.9, ge=0, lt=1)
    beta2: Float = Field(0.95, ge=0, lt=1)
    eps: Float = Field(1e-8, gt=0)
    weight_decay: Float = Field(0.1, ge=0)
    grad_clip: Float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} exceeds optim.lr={self.lr}; the minimum must be <= the peak")
        return self


class ScheduleKind(StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"  # linear warm-up + cosine to min_lr
    WSD = "wsd"  # warm-up, stable, decay
    COSINE_INF = "cosine-inf"  # warm-up, cosine cool-down to const_lr, constant, exponential anneal
    INVSQRT_INF = "invsqrt-inf"  # same with the inverse-square-root cool-down (Ibrahim et al. 2024)


class ScheduleConfig(_Strict):
    """LR schedule; the LR is a pure function of (this config, optim.lr, optim.min_lr, step).

    Fractions are of the run's total steps. For CPT re-warming set ``warmup_start_lr`` (the LR the warm-up starts
    from, e.g. the pre-training checkpoint's final LR); for CPT from an infinite schedule's pre-anneal
    checkpoint use ``cosine-inf`` with ``warmup_fraction = 0`` and ``cooldown_fraction = 0`` (constant, then anneal).
    """

    kind: ScheduleKind = ScheduleKind.COSINE
    warmup_fraction: Float = Field(0.01, ge=0, le=1)
    warmup_start_lr: Float = Field(0.0, ge=0)
    decay_fraction: Float = Field(0.2, ge=0, le=1, description="wsd: share of steps in the final decay")
    const_lr: Float | None = Field(
        None, gt=0, description="infinite schedules: the constant LR; None = 0.55 * optim.lr (1.65e-4 / 3e-4)"
    )
    cooldown_fraction: Float = Field(0.69, ge=0, le=1, description="inf: cool-down ends at warmup+cooldown")
    constant_fraction: Float = Field(0.1, ge=0, le=1, description="inf: constant phase after the cool-down")
    invsqrt_alpha: Float = Field(10.0, gt=0, description="invsqrt-inf: a in h(x) = 1/sqrt(1 + a x) - 1")
    stop_before_anneal: Bool = Field(
        False, description="inf: end the run at the start of the anneal (keeps the pre-anneal checkpoint)"
    )

    @model_validator(mode="after")
    def _check(self) -> "ScheduleConfig":
        if self.kind in (ScheduleKind.COSINE_INF, ScheduleKind.INVSQRT_INF):
            used = self.warmup_fraction + self.cooldown_fraction + self.constant_fraction
            if used > 1 + 1e-9:
                raise ValueError(
                    f"schedule fractions warmup+cooldown+constant = {used:.3f} exceed 1; reduce one of them"
                )
        return self


# -------------------------------------------------------------------------------------------------------- training
class WandbMode(StrEnum):
    """``offline``: a local run folder under ``RUN/wandb`` (``wandb sync`` uploads it later); ``online``: streamed
    to the W&B server (needs network and a login); ``disabled``: W&B's own no-op mode."""

    OFFLINE = "offline"
    ONLINE = "online"
    DISABLED = "disabled"


class CheckpointFormat(StrEnum):
    """How checkpoints are written (``train.checkpoint_format``; layouts in ``docs/distributed.md``).

    ``single``: one ``model.safetensors`` + ``optimizer.pt``, gathered on rank 0 (needs the full state in one
    rank's CPU memory). ``dcp``: ``torch.distributed.checkpoint`` shards, each rank writing its own part; reshards
    on load (another world size or EP degree resumes it). ``auto``: ``dcp`` when the sync strategy shards the state
    (FSDP2 on several ranks, expert parallelism), else ``single``. Either layout resumes, whichever the recipe writes.
    """

    AUTO = "auto"
    SINGLE = "single"
    DCP = "dcp"


class ActivationCheckpointing(StrEnum):
    """What the backward recomputes instead of keeping (``train.activation_checkpointing``; Chen et al. 2016,
    "Training Deep Nets with Sublinear Memory Cost"): nothing, each whole decoder block, or each MoE FFN only (the
    expert activations, ``K`` rows per token, dominate a granular MoE's activation memory)."""

    NONE = "none"
    FULL = "full"
    MOE_ONLY = "moe-only"


class DType(StrEnum):
    """Compute dtype of training and evaluation (``train.dtype``)."""

    AUTO = "auto"  # bf16 autocast on CUDA (where supported), fp32 on CPU
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast on any device


#: train keys that change how a run is watched or how much memory it holds, never what it computes: left out of a
#: run's identity, so that turning them on or off resumes the same run (and runs made before they existed still
#: resume); activation checkpointing recomputes the same forward, bit for bit (tests/test_activation_checkpointing.py),
#: and either checkpoint format holds the same state (tests/test_dcp_checkpoint.py)
OBSERVATION_KEYS = frozenset({"threads", "log_lines_every", "wandb_project", "wandb_mode",
                              "activation_checkpointing", "checkpoint_format"})


class TrainConfig(_Strict):
    steps: Int = Field(100, ge=1, description="optimizer steps")
    batch_size: Int = Field(16, ge=1, description="sequences per optimizer step (global, all ranks)")
    micro_batch_size: Int | None = Field(None, ge=1, description="sequences per forward; None = batch_size")
    seed: Int = Field(0, ge=0, lt=2**63, description="model init and data order seed")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: DType = Field(DType.AUTO, description="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16")
    compile: Bool = False
    activation_checkpointing: ActivationCheckpointing = Field(
        ActivationCheckpointing.NONE, description="none | full (each block) | moe-only (each MoE FFN): recompute "
        "those activations in the backward; same results, less memory")
    log_every: Int = Field(1, ge=1)
    eval_every: Int = Field(50, ge=1)
    eval_batches: Int = Field(4, ge=1, description="held-out batches of train.batch_size sequences per source per "
                                                   "evaluation (micro-batching does not change them)")
    checkpoint_every: Int = Field(50, ge=1)
    keep_last: Int = Field(2, ge=1, description="recent checkpoints kept (milestones are kept anyway)")
    extra_checkpoints: list[Int] = Field(default_factory=list, description="steps always checkpointed and kept")
    checkpoint_format: CheckpointFormat = Field(
        CheckpointFormat.AUTO, description="auto (dcp under fsdp on several ranks or expert_parallel > 1, else "
        "single) | single (one file, gathered on rank 0) | dcp (torch.distributed.checkpoint shards, resharded on "
        "load)")
    skip_nonfinite: Bool = Field(False, description="skip a batch with NaN/Inf loss instead of stopping")
    max_skips: Int = Field(10, ge=0)
    threads: Int | None = Field(None, ge=1, description="torch CPU threads of this process; None = torch's default")
    log_lines_every: Int | None = Field(
        None, ge=1, description="steps between plain progress lines (no terminal / --progress lines); None = ~20 a run")
    tensorboard: Bool = Field(False, description="TensorBoard event files in RUN/tensorboard (moecpt[tensorboard])")
    wandb: Bool = Field(False, description="Weights & Biases logging into RUN/wandb (moecpt[wandb])")
    wandb_project: str = Field("moecpt", min_length=1, description="W&B project name")
    wandb_mode: WandbMode = Field(WandbMode.OFFLINE, description="offline (default; `wandb sync` later) | online | "
                                                                   "disabled")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"train.device={self.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N, mps")
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not a multiple of train.micro_batch_size={mb}"
            )
        return self


class CPTConfig(_Strict):
    """Continual pre-training from a parent checkpoint (Ibrahim et al. 2024, arXiv 2403.08763; docs/design.md,
    rule C2)."""

    load_optimizer: Bool = Field(False, description="carry the parent's AdamW moments (never its LR)")


class SyncKind(StrEnum):
    """How workers are kept in agreement (``docs/distributed.md``)."""

    DDP = "ddp"  # gradients all-reduced every step (torch DDP)
    FSDP = "fsdp"  # FSDP2 ``fully_shard``: parameters, gradients and optimizer state sharded
    LOCAL_SGD = "local-sgd"  # parameters averaged every H steps (Stich 2019; Lin et al. 2020)
    SLOWMO = "slowmo"  # local SGD + outer heavy-ball momentum and outer LR (Wang et al. 2020, arXiv 1910.00643)
    DILOCO = "diloco"  # inner AdamW, outer Nesterov SGD on the pseudo-gradient (Douillard et al. 2023, 2311.08105)


class InnerOptimizer(StrEnum):
    """Optimizer of the inner (per-worker) steps (``distributed.inner_optimizer``)."""

    ADAMW = "adamw"  # the [optim] recipe
    SGD = "sgd"  # plain SGD, no momentum


class Backend(StrEnum):
    """torch.distributed process-group backend (``distributed.backend``)."""

    AUTO = "auto"  # nccl when the run trains on CUDA, gloo otherwise
    GLOO = "gloo"
    NCCL = "nccl"


#: outer optimizer, outer LR, outer momentum used when a local-SGD-family recipe leaves them unset
OUTER_DEFAULTS: dict[str, tuple[str, float, float]] = {
    "local-sgd": ("sgd", 1.0, 0.0),  # theta <- mean_k theta_k: plain parameter averaging
    "slowmo": ("sgd", 1.0, 0.5),  # fairscale SlowMo defaults (slowmo_lr 1.0, slowmo_momentum 0.5)
    "diloco": ("nesterov", 0.7, 0.9),  # DiLoCo paper
}


class DistributedConfig(_Strict):
    """Data parallelism and communication-efficient synchronisation (``moecpt.distributed``).

    ``sync`` selects the strategy. The local-SGD family (``local-sgd``, ``slowmo``, ``diloco``) runs ``local_steps``
    (H) inner optimizer steps on every worker, then applies the outer optimizer to the pseudo-gradient
    ``theta_global - mean_k theta_k``; unset ``outer_*`` fields take the sync's defaults (:data:`OUTER_DEFAULTS`).
    """

    sync: SyncKind = SyncKind.DDP
    local_steps: Int = Field(1, ge=1, description="H: inner steps per communication round (local-SGD family)")
    outer_optimizer: str | None = Field(
        None, description="sgd | nesterov | lagg-a | lopt-a | PATH.safetensors; None = the sync's default")
    outer_lr: Float | None = Field(None, gt=0, description="None = the sync's default (1.0; diloco 0.7)")
    outer_momentum: Float | None = Field(None, ge=0, lt=1, description="None = the sync's default")
    inner_optimizer: InnerOptimizer = Field(
        InnerOptimizer.ADAMW, description="adamw (the [optim] recipe) | sgd (plain SGD, no momentum)")
    backend: Backend = Field(Backend.AUTO, description="auto (nccl on CUDA, gloo on CPU) | gloo | nccl")
    timeout_s: Float = Field(600.0, gt=0, description="collective / rendezvous timeout: a lost peer stops the rest")
    emulate_bandwidth_gbit: Float | None = Field(
        None, gt=0, description="emulated link: sleep latency + bytes / bandwidth after every collective")
    emulate_latency_ms: Float = Field(0.0, ge=0, description="emulated link latency per collective")
    expert_parallel: Int = Field(
        1, ge=1, description="EP: ranks the routed experts of every MoE layer are split over (all-to-all dispatch)")
    islands: Int = Field(
        1, ge=1, description="M: groups of ranks; data parallel inside each, the outer step (H steps) across them")
    island_sync: SyncKind = Field(
        SyncKind.DDP, description="data parallelism inside an island when islands > 1: ddp | fsdp")

    @field_validator("island_sync", mode="before")
    @classmethod
    def _island_sync_choices(cls, value: Any) -> Any:
        """Before the SyncKind check, whose error would list ``sync``'s five choices: an island has two."""
        if str(value) not in (SyncKind.DDP.value, SyncKind.FSDP.value):
            raise ValueError(f"distributed.island_sync={str(value)!r} is not allowed: inside an island ranks "
                             "synchronise every step; choose 'ddp' or 'fsdp' (the local-SGD family is "
                             "distributed.sync, across the islands)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "DistributedConfig":
        local = self.sync in (SyncKind.LOCAL_SGD, SyncKind.SLOWMO, SyncKind.DILOCO)
        if self.islands > 1 and not local:
            raise ValueError(f"distributed.islands={self.islands} needs sync = local-sgd, slowmo or diloco (the "
                             f"outer step across islands); sync = {self.sync.value!r} has none")
        if self.island_sync != SyncKind.DDP and self.islands == 1:
            raise ValueError("distributed.island_sync applies only with islands > 1; remove it or set islands")
        if not local:
            for key in ("outer_optimizer", "outer_lr", "outer_momentum"):
                if getattr(self, key) is not None:
                    raise ValueError(f"distributed.{key} applies to sync = local-sgd, slowmo or diloco, not "
                                     f"{self.sync.value!r}; remove it or choose one of those")
            if self.local_steps != 1:
                raise ValueError(f"distributed.local_steps={self.local_steps} needs sync = local-sgd, slowmo or "
                                 f"diloco; sync = {self.sync.value!r} synchronises every step")
        return self

    def outer(self) -> tuple[str, float, float]:
        """``(outer_optimizer, outer_lr, outer_momentum)`` with the sync's defaults filled in."""
        name, lr, mom = OUTER_DEFAULTS.get(self.sync.value, ("sgd", 1.0, 0.0))
        return (self.outer_optimizer or name, lr if self.outer_lr is None else self.outer_lr,
                mom if self.outer_momentum is None else self.outer_momentum)


class Recipe(_Strict):
    """A whole training recipe (one TOML file)."""

    name: str = "run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cpt: CPTConfig = Field(default_factory=CPTConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


def identity_json(recipe: "Recipe") -> dict[str, Any]:
    """The recipe as JSON without :data:`OBSERVATION_KEYS`: what decides whether two runs are the same run."""
    raw = recipe.model_dump(mode="json")
    raw["train"] = {k: v for k, v in raw["train"].items() if k not in OBSERVATION_KEYS}
    return raw


def dotted_keys(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested JSON dict flattened to ``{"train.steps": 40, "model.moe.top_k": 3, ...}`` (empty dicts kept as
    values), as ``--set`` names the keys."""
    out: dict[str, Any] = {}
    for key, v in raw.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(dotted_keys(v, name) if isinstance(v, dict) and v else {name: v})
    return out


# ------------------------------------------------------------------------------------------------- loading helpers
def _close_key(model: type[BaseModel] | None, loc: tuple, prefix: str) -> str:
    """``; did you mean 'train.steps'?`` for an unknown key one typo away from a field of its section, else ''."""
    for part in loc[:-1]:  # down to the unknown key's section, through plain nested sections only
        field = model.model_fields.get(str(part)) if model is not None else None
        ann = field.annotation if field is not None else None
        options = typing.get_args(ann) or (ann,)  # `MoEConfig | None` as well as `MoEConfig`
        model = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is None or not loc:
        return ""
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    if not match:
        return ""
    parts = [prefix] if prefix else []
    return f"; did you mean {'.'.join([*parts, *map(str, loc[:-1]), match[0]])!r}?"


def format_validation_error(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line naming the first offending field and what is allowed (for an unknown key of ``model``, the field
    its spelling is closest to)."""
    err = exc.errors()[0]
    loc = ""
    for part in err["loc"]:
        if str(part).startswith("function-after"):
            continue
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))  # list index: [i]
    loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}; remove it or check its spelling{_close_key(model, err['loc'], prefix)}"
    if err["type"] == "enum" and "expected" in err.get("ctx", {}):
        return f"{loc}={err.get('input')!r} is not allowed; allowed: {err['ctx']['expected']}"
    if err["type"] == "finite_number":
        return f"{loc}={err.get('input')!r} is not a finite number; give a finite value (inf and nan are not allowed)"
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "int_type" and isinstance(got, float):  # strict ints: 4.0 is refused as 2.5 is
        return f"{loc}={got!r} is not an integer; give a whole number without a decimal point"
    if kind in _TYPE_WANTED:
        shown = ("true" if got else "false") if isinstance(got, bool) else repr(got)  # as written in TOML / --set
        return f"{loc}={shown} is not {_TYPE_WANTED[kind]}; give {_TYPE_WANTED[kind]}"
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        return f"{loc}={got!r} is out of range; give a value {op} {ctx.get(key)}"
    if kind == "too_short":
        return f"{loc} has too few items ({msg.lower()}); give at least {ctx.get('min_length', 1)}"
    if loc and (msg.startswith(f"{loc}") or msg.startswith(f"{loc.split('.')[-1]}.")) or f"{loc}." in msg:
        return msg  # the section's own check already names its keys
    return f"{loc}: {msg}" if loc else msg


#: pydantic error types of a wrongly typed value -> what to give instead
_TYPE_WANTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list", "dict_type": "a table",
    "model_type": "a table", "model_attributes_type": "a table",
}
#: pydantic error types of a value out of its bounds -> (the comparison to satisfy, its ctx key)
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}


def build_section(cls: type[BaseModel], raw: dict[str, Any], prefix: str = "") -> Any:
    """Validate ``raw`` as ``cls``.

    Raises:
        MoecptError: one line (:func:`format_validation_error`) naming the offending key, ``prefix`` prepended.
    """
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise MoecptError(format_validation_error(exc, prefix, cls)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in TOML syntax, bare words taken as strings)."""
    if "=" not in text:
        raise MoecptError(f"--set {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise MoecptError(f"--set {text!r} names no key")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MoecptError(f"--set {text!r}: {part!r} is not a table")
        node[path[-1]] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a recipe TOML file into a dict (not yet validated).

    Raises:
        MoecptError: the file is missing, not UTF-8, not valid TOML, or empty (no keys at all: 0 bytes, or only
            blank lines and comments), which would otherwise silently train a default model.
    """
    p = Path(path)
    if p.is_dir():
        raise MoecptError(f"recipe {str(p)!r} is a folder; give the path of a .toml file in it")
    if not p.exists():
        raise MoecptError(f"recipe {str(p)!r} does not exist; give a path to a .toml file")
    if not p.is_file():
        raise MoecptError(f"recipe {str(p)!r} is not a regular file; give a path to a .toml file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise MoecptError(f"recipe {str(p)!r} is not valid TOML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError:
        raise MoecptError(f"recipe {str(p)!r} is not UTF-8 text; save it as UTF-8 TOML") from None
    if not raw:
        raise MoecptError(f"recipe {str(p)!r} is empty (no keys, only blanks or comments); give at least its "
                          "[model] and [data] tables, e.g. start from recipes/smoke.toml")
    return raw


def recipe_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Validate a recipe dict (after ``--set`` overrides and preset expansion).

    Raises:
        MoecptError: one line naming the offending key and the allowed values.
    """
    raw = apply_overrides(raw, overrides or [])
    if isinstance(raw.get("model"), dict):
        raw = {**raw, "model": expand_model_preset(raw["model"])}
    return build_section(Recipe, raw)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a TOML recipe; see :func:`recipe_from_dict`.

    Raises:
        MoecptError: as :func:`recipe_from_dict`; also a study recipe (``[[models]]`` / ``[pretrain]``), which
            ``moecpt study`` runs.
    """
    raw = read_toml(path)
    if "models" in raw or "pretrain" in raw:  # "unknown key 'data.old'" would send the reader the wrong way
        raise MoecptError(f"{path} is a study recipe (it has [[models]] / [pretrain]), not a training recipe; run "
                          f"it with `moecpt study {path} --out DIR`, or give --recipe a training recipe such as "
                          "recipes/smoke.toml")
    return recipe_from_dict(raw, overrides)


def find_bundled_recipe(name: str) -> Path:
    """Path of a recipe shipped in ``moecpt/recipes`` (``name`` relative, with or without ``.toml``)."""
    root = Path(__file__).resolve().parent / "recipes"
    cand = root / (name if name.endswith(".toml") else f"{name}.toml")
    if not cand.is_file():
        raise MoecptError(f"no bundled recipe {name!r}; bundled: {', '.join(sorted(_bundled_names(root)))}")
    return cand


def _bundled_names(root: Path) -> list[str]:
    return [str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.toml")]
