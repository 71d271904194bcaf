"""The :class:`Family` base class: a family's ``config.json`` -> :class:`moecpt.config.ModelConfig` (import), the
reverse with the checks saying which models it represents exactly (export), and the tensor plan (which HF tensor
is which moecpt tensor, :class:`~moecpt.interop.families.pieces.Piece`). The defaults are the common layout
(GQA, ``mlp.experts.{e}.{gate,up,down}_proj``, softmax routing balanced by a ``penalty`` router); each family
overrides the hooks where it differs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from moecpt.config import (
    AttentionKind,
    AttnKind,
    FFNKind,
    ModelConfig,
    QKNorm,
    RouterConfig,
    RouterKind,
    ScoreFn,
    build_section,
)
from moecpt.errors import MoecptError
from moecpt.interop.families.helpers import _layout_of, _normal_windows, _yarn_params, attn_kinds
from moecpt.interop.families.pieces import Piece, PieceOp, _shape_of
from moecpt.model.transformer import build_model

#: transformers ``hidden_act`` names -> moecpt FFN kind (``gelu_pytorch_tanh`` is moecpt's tanh-GELU GEGLU).
_ACT_TO_FFN = {"silu": FFNKind.SWIGLU, "swish": FFNKind.SWIGLU, "gelu_pytorch_tanh": FFNKind.GEGLU}
_FFN_TO_ACT = {FFNKind.SWIGLU: "silu", FFNKind.GEGLU: "gelu_pytorch_tanh",
               FFNKind.SWIGLU_CLAMPED: "silu"}  # GPT-OSS's config says silu; its experts apply the clamped form


class Family:
    """A transformers MoE family (see :mod:`moecpt.interop.families`). Subclasses set the class attributes and
    the hooks."""

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
        """The imported router: a ``penalty`` router weighted as :mod:`moecpt.interop.families` explains
        (router balancing; hook)."""
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
