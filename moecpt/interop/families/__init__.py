"""The Hugging Face MoE families moecpt imports and exports: one small mapping per family.

Each family says how its ``config.json`` maps onto :class:`moecpt.config.ModelConfig`, how its tensors are named,
and which moecpt models it can represent exactly (export). All of them are pre-norm RMSNorm decoders with RoPE and
GLU experts ``down(act(gate(x)) * up(x))``; all but the DeepSeek families have grouped-query attention with RoPE in
the half-rotation layout (as moecpt), those multi-head latent attention (:mod:`moecpt.model.mla`).

One module per family or close group (each documents its sources): :mod:`~moecpt.interop.families.olmoe`,
:mod:`~moecpt.interop.families.mixtral`, :mod:`~moecpt.interop.families.qwen` (Qwen2-MoE, Qwen3-MoE),
:mod:`~moecpt.interop.families.glm` (GLM-4.5), :mod:`~moecpt.interop.families.dots1` (dots.llm1),
:mod:`~moecpt.interop.families.ernie` (Ernie-4.5-MoE), :mod:`~moecpt.interop.families.granite` (Granite-MoE with
and without a shared expert), :mod:`~moecpt.interop.families.deepseek` (DeepSeek-V3, also Moonlight and Kimi-K2;
DeepSeek-V2), :mod:`~moecpt.interop.families.gptoss` (GPT-OSS). The three DeepSeek-V3-routed families share
:mod:`~moecpt.interop.families.deepseek_routed`; all of them subclass :class:`~moecpt.interop.families.base.Family`
and use :mod:`~moecpt.interop.families.pieces` (tensor mapping) and :mod:`~moecpt.interop.families.helpers`.
Imports run one way: ``pieces`` / ``helpers`` <- ``base`` <- the families <- this package, which holds the
registry (:data:`FAMILIES`), :func:`family_of` (import) and :func:`choose_family` (export).

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

from moecpt.config import FFNKind, ModelConfig
from moecpt.errors import MoecptError
from moecpt.interop.families.base import Family
from moecpt.interop.families.deepseek import DeepseekV2, DeepseekV3
from moecpt.interop.families.dots1 import Dots1
from moecpt.interop.families.ernie import Ernie45MoE
from moecpt.interop.families.glm import Glm4Moe
from moecpt.interop.families.gptoss import GptOss
from moecpt.interop.families.granite import GraniteMoE, GraniteMoEShared
from moecpt.interop.families.helpers import _common_why_not, attn_kinds, hf_layer_types
from moecpt.interop.families.mixtral import Mixtral
from moecpt.interop.families.olmoe import OLMoE
from moecpt.interop.families.pieces import Piece, PieceOp, deinterleave, extract, interleave, place, rope_pair_order
from moecpt.interop.families.qwen import Qwen2MoE, Qwen3MoE
from moecpt.model.flops import attention_head_dims

__all__ = ["FAMILIES", "DeepseekV2", "DeepseekV3", "Dots1", "Ernie45MoE", "Family", "Glm4Moe", "GptOss", "GraniteMoE",
           "GraniteMoEShared", "Mixtral", "OLMoE", "Piece", "PieceOp", "Qwen2MoE", "Qwen3MoE", "attn_kinds",
           "choose_family", "deinterleave", "extract", "family_of", "hf_layer_types", "interleave", "place",
           "rope_pair_order", "supported", "why_not"]


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
