"""DeepSeek's own families, with multi-head latent attention: DeepSeek-V3 (``deepseek_v3``) and DeepSeek-V2
(``deepseek_v2``).

* **DeepSeek-V3** (``deepseek_v3``; also Moonlight and Kimi-K2 checkpoints) -- DeepSeek-AI 2024, arXiv
  2412.19437; ``deepseek-ai/DeepSeek-V3``. GLM-4.5's routing, experts and dense first layers, with MLA (a query
  latent, ``rope_interleave``).
* **DeepSeek-V2** (``deepseek_v2``) -- DeepSeek-AI 2024, arXiv 2405.04434; ``deepseek-ai/DeepSeek-V2-Lite``. MLA
  (V2-Lite: no query latent) and softmax routing, ``greedy`` or ``group_limited_greedy`` (groups scored by their
  best expert), gates scaled by ``routed_scaling_factor``; shared experts, dense first layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from moecpt.config import AttentionKind, GroupScore, ModelConfig, RouterConfig, RouterKind, ScoreFn
from moecpt.interop.families.deepseek_routed import _DeepSeekRouted
from moecpt.interop.families.helpers import _renorm, _shared_width, _synth_zero_shared, _yarn_params


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
