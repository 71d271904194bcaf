"""Decoder-only transformer (Llama-3-style backbone of Thérien et al. 2025, Sec. 3): pre-norm RMSNorm, RoPE
(full or partial rotary fraction, :mod:`.rope`), multi-head / grouped-query attention through
``scaled_dot_product_attention`` or multi-head latent attention (:mod:`.mla`, DeepSeek-V2/V3), GEGLU or SwiGLU
feed-forwards, dense or MoE per layer, tied or untied embeddings.

Initialisation (documented choice, as GPT-2 / OLMo): every linear and embedding weight ~ N(0, init_std); the output
projections of attention and of every FFN/expert (``wo``, ``w_out``) are further scaled by ``1/sqrt(2 n_layers)``
so the residual stream's variance does not grow with depth; router weights ~ N(0, init_std); norms start at 1.

Shape suffixes follow the legend in :mod:`moecpt.model` (B batch, T positions, D d_model, H query heads, G key/value
heads, A head dim, R rotary dims, V vocabulary).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moecpt.config import ActivationCheckpointing, AttentionKind, ModelConfig, QKNorm
from moecpt.model.attention_ops import attend
from moecpt.model.mla import MLAttention
from moecpt.model.moe import GLUFeedForward, MoELayer, RoutedExperts
from moecpt.model.rope import apply_rope, rope_cos_sin
from moecpt.model.routing import Router, RouterOutput
from moecpt.model.yarn import yarn_attention_factor, yarn_inv_freq


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos_TR, sin_TR`` of ``cfg`` for ``T = max_seq_len`` positions: plain RoPE, or YaRN-scaled
    (:mod:`moecpt.model.yarn`: blended frequencies, tables times the attention factor) with ``cfg.rope_yarn``."""
    rot = cfg.rotary_dims
    if cfg.rope_yarn is None:
        return rope_cos_sin(cfg.max_seq_len, rot, cfg.rope_theta, device)
    inv_freq = yarn_inv_freq(rot, cfg.rope_theta, cfg.rope_yarn, device)
    freqs = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    emb_TR = torch.cat([freqs, freqs], dim=-1)
    scale = yarn_attention_factor(cfg.rope_yarn)
    return emb_TR.cos() * scale, emb_TR.sin() * scale


@contextlib.contextmanager
def recompute_marker(routers: list[Router]):
    """Mark ``routers`` as recomputing while activation checkpointing replays their forward in the backward, so
    that a bias-balanced router counts its step load once (docs/design.md, rule R6)."""
    for r in routers:
        r.recomputing = True
    try:
        yield
    finally:
        for r in routers:
            r.recomputing = False


def checkpointed(fn, module: nn.Module, *args):
    """``fn(*args)`` under non-reentrant activation checkpointing (``torch.utils.checkpoint``, Chen et al. 2016):
    only the inputs are saved and the forward is replayed in the backward, with the RNG state restored. The
    replay marks ``module``'s routers (:func:`recompute_marker`); any output structure (a ``RouterOutput``)
    passes through."""
    routers = [m for m in module.modules() if isinstance(m, Router)]
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), recompute_marker(routers)))


class Attention(nn.Module):
    """Causal self-attention with RoPE and optional grouped-query heads / q-k norms, via SDPA; optionally windowed
    (``window``: this layer's ``cfg.window_of``) and with per-head sinks (:mod:`moecpt.model.attention_ops`)."""

    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        D, A = cfg.d_model, self.head_dim
        self.wq = nn.Linear(D, self.n_heads * A, bias=cfg.attn_bias)
        self.wk = nn.Linear(D, self.n_kv_heads * A, bias=cfg.attn_bias)
        self.wv = nn.Linear(D, self.n_kv_heads * A, bias=cfg.attn_bias)
        self.wo = nn.Linear(self.n_heads * A, D, bias=cfg.attn_out_bias)
        self.window = window
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn_sinks else None  # [H] logits
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.attention_multiplier  # None: SDPA's 1 / sqrt(A)
        if cfg.qk_norm == QKNorm.HEAD:
            self.q_norm, self.k_norm = nn.RMSNorm(A, eps=cfg.norm_eps), nn.RMSNorm(A, eps=cfg.norm_eps)
        elif cfg.qk_norm == QKNorm.FULL:
            self.q_norm = nn.RMSNorm(self.n_heads * A, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.n_kv_heads * A, eps=cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if self.qk_norm == QKNorm.FULL:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTHA = q.view(B, T, self.n_heads, self.head_dim)
        k_BTGA = k.view(B, T, self.n_kv_heads, self.head_dim)
        v_BGTA = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == QKNorm.HEAD:
            q_BTHA, k_BTGA = self.q_norm(q_BTHA), self.k_norm(k_BTGA)
        q_BHTA = apply_rope(q_BTHA, cos_TR, sin_TR).transpose(1, 2)
        k_BGTA = apply_rope(k_BTGA, cos_TR, sin_TR).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:  # GQA: each key/value head serves H / G query heads
            rep = self.n_heads // self.n_kv_heads
            k_BHTA, v_BHTA = k_BGTA.repeat_interleave(rep, dim=1), v_BGTA.repeat_interleave(rep, dim=1)
        else:
            k_BHTA, v_BHTA = k_BGTA, v_BGTA
        o_BHTA = attend(q_BHTA, k_BHTA, v_BHTA, scale=self.scale, window=self.window, sinks_H=self.sinks)
        return self.wo(o_BHTA.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``; the FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = (MLAttention(cfg) if cfg.attention == AttentionKind.MLA
                     else Attention(cfg, cfg.window_of(layer_idx)))
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn = MoELayer(cfg) if self.is_moe else GLUFeedForward(cfg.d_model, cfg.ffn_width, cfg.ffn_kind)
        self.checkpoint_moe = False  # recompute the MoE FFN in the backward (Transformer.set_activation_checkpointing)
        self.residual_multiplier = cfg.residual_multiplier

    def _scaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier

    def forward(self, x_BTD, cos_TR, sin_TR) -> tuple[torch.Tensor, RouterOutput | None]:
        x_BTD = x_BTD + self._scaled(self.attn(self.attn_norm(x_BTD), cos_TR, sin_TR))
        h_BTD = self.ffn_norm(x_BTD)
        if not self.is_moe:
            return x_BTD + self._scaled(self.ffn(h_BTD)), None
        B, T, D = h_BTD.shape
        if self.checkpoint_moe and self.training and torch.is_grad_enabled():
            y_TD, routing = checkpointed(self.ffn, self.ffn, h_BTD.reshape(B * T, D), T)
        else:
            y_TD, routing = self.ffn(h_BTD.reshape(B * T, D), T)
        return x_BTD + self._scaled(y_TD.view(B, T, D)), routing


class Transformer(nn.Module):
    """The moecpt decoder LM.

    Args:
        cfg: :class:`moecpt.config.ModelConfig` with ``vocab_size`` resolved (not None).

    ``forward(input_ids_BT)`` returns logits ``[B, T, V]`` (in the autocast dtype, if any);
    ``forward(input_ids_BT, return_routing=True)`` returns ``(logits_BTV, routing)`` where ``routing`` holds one
    :class:`RouterOutput` per MoE layer, in layer order (empty for the dense model).

    Raises:
        ValueError: ``cfg.vocab_size`` is None, or an input is longer than ``max_seq_len``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (it is taken from the tokenizer by the trainer)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = ActivationCheckpointing.NONE
        self.reset_parameters()

    def set_activation_checkpointing(self, mode: ActivationCheckpointing | str) -> None:
        """Recompute activations in the backward instead of keeping them: ``"full"`` each decoder block (only
        its input ``[B, T, D]`` is kept), ``"moe-only"`` each MoE FFN (router, dispatch and experts), ``"none"``
        (default). Training forwards only; outputs, gradients and the bias-balancing counts are unchanged
        (``tests/test_activation_checkpointing.py``). Apply before ``torch.compile`` / FSDP wrapping, as
        torchtitan does.

        Raises:
            ValueError: ``mode`` is not one of the three.
        """
        mode = ActivationCheckpointing(mode)
        self.activation_checkpointing = mode
        for block in self.blocks:
            block.checkpoint_moe = mode == ActivationCheckpointing.MOE_ONLY and block.is_moe

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith(("wo", "w_out"))
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RoutedExperts):
                nn.init.normal_(module.w_in, std=std)
                nn.init.normal_(module.w_out, std=out_std)
            elif isinstance(module, Router):
                module.reset_parameters(std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, Attention) and module.sinks is not None:
                nn.init.zeros_(module.sinks)  # a zero logit: the sink starts as one more (empty) key
            if isinstance(module, RoutedExperts) and module.b_in is not None:
                nn.init.zeros_(module.b_in)
                nn.init.zeros_(module.b_out)
        cos, sin = rope_tables(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def routers(self) -> list[Router]:
        """The routers of the MoE layers, in layer order."""
        return [b.ffn.router for b in self.blocks if b.is_moe]

    def moe_layer_indices(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    def forward(self, input_ids_BT: torch.Tensor, *, return_routing: bool = False):
        B, T = input_ids_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x_BTD = self.tok_emb(input_ids_BT)
        if self.cfg.embedding_multiplier != 1.0:
            x_BTD = x_BTD * self.cfg.embedding_multiplier
        cos_TR, sin_TR = self.rope_cos[:T], self.rope_sin[:T]
        routing: list[RouterOutput] = []
        whole = (self.activation_checkpointing == ActivationCheckpointing.FULL and self.training
                 and torch.is_grad_enabled())
        for block in self.blocks:
            x_BTD, r = checkpointed(block, block, x_BTD, cos_TR, sin_TR) if whole else block(x_BTD, cos_TR, sin_TR)
            if r is not None:
                routing.append(r)
        logits_BTV = self.lm_head(self.norm(x_BTD))
        if self.cfg.logits_scaling != 1.0:
            logits_BTV = logits_BTV / self.cfg.logits_scaling
        return (logits_BTV, routing) if return_routing else logits_BTV


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """Instantiate (and initialise) a :class:`Transformer` on ``device`` (``"meta"`` allocates nothing)."""
    with torch.device(device):
        return Transformer(cfg)
