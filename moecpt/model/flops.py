"""Parameter and FLOP accounting on the meta device (no weights are allocated, so paper-size presets are free).

Conventions (documented so that figures are comparable):

* *total* parameters count every weight once (tied embeddings once).
* *active* parameters per token count the routed experts a token uses (``top_k`` of ``E``) plus everything else.
* forward FLOPs per token = ``2 * (active matmul parameters)`` + attention ``2 * L * T * H * (Dqk + Dv)`` (scores
  over query/key head dims ``Dqk`` and weighted values over value head dims ``Dv``, the full context, as in PaLM's
  MFU formula, Chowdhery et al. 2022, App. B: ``4 * L * T * H * Dh`` when ``Dqk = Dv = Dh``; multi-head latent
  attention has ``Dqk = qk_nope_head_dim + qk_rope_head_dim``, ``Dv = v_head_dim``, its latent projections are
  matmul parameters); the embedding lookup is free, the LM head is a matmul. Training FLOPs per token = 3 x
  forward.
"""

from __future__ import annotations

import torch
from torch import nn

from moecpt.config import AttentionKind, ModelConfig
from moecpt.model.moe import RoutedExperts
from moecpt.model.transformer import build_model


def _numel(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def attention_head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """``(query/key head dims, value head dims)`` of ``cfg``'s attention (both ``head_dim`` for GQA)."""
    if cfg.attention == AttentionKind.MLA:
        assert cfg.mla is not None
        return cfg.mla.qk_head_dim, cfg.mla.v_head_dim
    return cfg.resolved_head_dim, cfg.resolved_head_dim


def model_stats(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, float | int]:
    """Total and active parameters and forward FLOPs per token of ``cfg`` (built on the meta device).

    Args:
        cfg: model config with ``vocab_size`` set.
        seq_len: context length for the attention FLOPs (a sliding layer counts ``min(seq_len, window)`` keys);
            default ``cfg.max_seq_len``.

    Returns:
        dict with ``total_params``, ``active_params``, ``embedding_params``, ``expert_params`` (routed experts
        only: what expert parallelism splits; shared experts and routers are not), ``moe_layers``,
        ``max_block_params`` and ``max_block_expert_params`` (the decoder block with the most parameters, and its
        routed-expert part: what FSDP all-gathers at once), ``non_block_params`` (embedding, final norm, head:
        FSDP's root unit), ``active_matmul_params``, ``forward_flops_per_token``, ``train_flops_per_token``,
        ``seq_len``.
    """
    model = build_model(cfg, device="meta")
    T = seq_len or cfg.max_seq_len
    total = _numel(model.parameters())
    expert_total = expert_active = moe_layers = 0
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            n = _numel(m.parameters())  # w_in, w_out (and GPT-OSS's per-expert biases)
            expert_total += n
            expert_active += n * cfg.moe.top_k // m.num_experts
            moe_layers += 1
    blocks = [(_numel(b.parameters()), _numel(p for m in b.modules() if isinstance(m, RoutedExperts)
                                               for p in m.parameters())) for b in model.blocks]
    max_block, max_block_expert = max(blocks)
    active = total - expert_total + expert_active
    emb = model.tok_emb.weight.numel()
    norms = _numel(p for m in model.modules() if isinstance(m, nn.RMSNorm) for p in m.parameters())
    # every non-embedding, non-norm parameter multiplies an activation once per token (the LM head included;
    # with tied embeddings the shared table counts once as the head)
    matmul_active = active - norms - (0 if cfg.tie_embeddings else emb)
    # q.k and p.v over the keys a token sees: all T, or a sliding layer's window W
    keys = sum(min(T, cfg.window_of(i) or T) for i in range(cfg.n_layers))
    attn = 2 * keys * cfg.n_heads * sum(attention_head_dims(cfg))
    fwd = 2 * matmul_active + attn
    return {
        "total_params": total,
        "active_params": active,
        "embedding_params": emb,
        "expert_params": expert_total,
        "moe_layers": moe_layers,
        "max_block_params": max_block,
        "max_block_expert_params": max_block_expert,
        "non_block_params": total - sum(n for n, _ in blocks),
        "active_matmul_params": matmul_active,
        "forward_flops_per_token": fwd,
        "train_flops_per_token": 3 * fwd,
        "seq_len": T,
    }


def saved_activation_bytes(fn, *args, **kwargs) -> int:
    """Bytes autograd saves for the backward while ``fn(*args, **kwargs)`` runs: the activation memory of a
    training forward, counted exactly through ``torch.autograd.graph.saved_tensors_hooks`` (what activation
    checkpointing removes). A tensor saved by two nodes counts twice; parameters saved by a matmul count too
    (they are resident anyway). The output is dropped.

    Returns: bytes (int).
    """
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return total
