"""Tiny random Hugging Face MoE models for tests and examples (needs ``transformers``; built offline).

:func:`save_tiny_hf` builds a model of a supported family from transformers' own config class (hidden 64, 2-3
layers, 8 experts, top-2, vocabulary 300), gives every weight a clearly non-trivial random value (so that a
wrong transpose, a missing norm or a swapped gate/up half shows in the logits), and saves it with
``save_pretrained`` -- sharded when ``max_shard_size`` is given -- together with a small byte-level BPE tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moecpt.data.tokenizer import train_bpe
from moecpt.interop.families import FAMILIES

#: vocabulary of the tiny models (the tiny tokenizer has exactly this many tokens; id 0 is <|endoftext|>)
VOCAB = 300

_COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_experts_per_tok": 2, "max_position_embeddings": 64, "bos_token_id": None, "eos_token_id": 0,
           "pad_token_id": None, "tie_word_embeddings": False}

#: config-class keyword arguments per family: GQA everywhere; Qwen2-MoE with a dense first layer
#: (``mlp_only_layers``) and renormalised gates; Qwen3-MoE with a head_dim that is not hidden / heads and a
#: dense layer every other layer (``decoder_sparse_step``); GLM-4.5 with DeepSeek-V3 routing over 2 groups of 4
#: (one kept), gates renormalised and scaled by 2.5, a dense first layer, a shared expert, q/k/v biases, per-head
#: q/k norm and partial RoPE (transformers' default factor 0.5); dots1 with 4 groups of 2 (two kept); DeepSeek-V3
#: with latent attention (a query latent, interleaved RoPE), 2 groups of 4 (one kept), scale 2.5, a dense first
#: layer; DeepSeek-V2 as V2-Lite (no query latent) with group_limited_greedy over 4 groups of 2 (two kept).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "olmoe": dict(_COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=8),
    "mixtral": dict(_COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8),
    "qwen2_moe": dict(_COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_experts=8, mlp_only_layers=[0], norm_topk_prob=True),
    "qwen3_moe": dict(_COMMON, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32, head_dim=24,
                      num_experts=8, decoder_sparse_step=2, norm_topk_prob=True),
    "glm4_moe": dict(_COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, head_dim=24,
                     n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True,
                     routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
                     num_nextn_predict_layers=0),
    "dots1": dict(_COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                  n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.5,
                  first_k_dense_replace=1),
    "deepseek_v3": dict(_COMMON, num_key_value_heads=4, num_hidden_layers=3, intermediate_size=96,
                        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                        norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=24,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                        num_nextn_predict_layers=0),
    "deepseek_v2": dict(_COMMON, num_key_value_heads=4, num_hidden_layers=3, intermediate_size=96,
                        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2, n_group=4, topk_group=2,
                        topk_method="group_limited_greedy", routed_scaling_factor=1.5, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12),
    "ernie4_5_moe": dict(_COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
                         moe_num_experts=8,
                         moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
                         head_dim=24, tie_word_embeddings=True),
    "granitemoe": dict(_COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                       embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.09,
                       logits_scaling=4.0),
    "granitemoeshared": dict(_COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8,
                             shared_intermediate_size=48, embedding_multiplier=2.0, residual_multiplier=0.7,
                             attention_multiplier=0.2, logits_scaling=2.0, tie_word_embeddings=True),
    # GPT-OSS with a window of 4 (shorter than the test sequences) on alternating layers, plain RoPE
    "gpt_oss": dict(_COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=8, head_dim=16,
                    sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def config_class(family: str):
    import transformers

    return {"olmoe": transformers.OlmoeConfig, "mixtral": transformers.MixtralConfig,
            "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
            "glm4_moe": transformers.Glm4MoeConfig, "dots1": transformers.Dots1Config,
            "deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config,
            "ernie4_5_moe": transformers.Ernie4_5_MoeConfig, "granitemoe": transformers.GraniteMoeConfig,
            "granitemoeshared": transformers.GraniteMoeSharedConfig, "gpt_oss": transformers.GptOssConfig}[family]


def tiny_hf_model(family: str, seed: int = 0, **overrides: Any):
    """A randomised transformers model of ``family`` (eval mode, fp32): weights ~ N(0, 0.1), norms ~ 1 + N(0, 0.1),
    DeepSeek-V3 selection biases (``e_score_correction_bias``, buffers) ~ N(0, 0.05): large enough to change
    choices, so a bias used for the gates too, or not at all, shows."""
    from transformers import AutoModelForCausalLM

    cfg = config_class(family)(**{**TINY_CONFIGS[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def synthetic_texts(seed: int, n_docs: int, words: int = 60, alphabet: str = "aeioubdgklmnprst") -> list[str]:
    """Documents of a made-up language: words of 2-3 syllables drawn from ``alphabet`` with a skewed frequency."""
    rng = random.Random(seed)
    vowels = [c for c in alphabet if c in "aeiou"] or ["a"]
    cons = [c for c in alphabet if c not in "aeiou"] or ["k"]
    lexicon = ["".join(rng.choice(cons) + rng.choice(vowels) for _ in range(rng.randint(1, 3))) for _ in range(80)]
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    return [" ".join(rng.choices(lexicon, weights, k=words)) + "." for _ in range(n_docs)]


def tiny_tokenizer(vocab_size: int = VOCAB, seed: int = 0):
    """A byte-level BPE (``tokenizers.Tokenizer``) with exactly ``vocab_size`` tokens, ``<|endoftext|>`` = id 0."""
    texts = synthetic_texts(seed, 200) + synthetic_texts(seed + 1, 200, alphabet="aeiofhjvwxyz")
    tok = train_bpe(texts, vocab_size)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def save_tokenizer(tok, folder: str | Path) -> None:
    """Save ``tok`` the way a Hugging Face repo ships it: ``tokenizer.json`` + ``tokenizer_config.json``."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(folder))


def save_tiny_hf(family: str, folder: str | Path, seed: int = 0, max_shard_size: str | None = None,
                 tokenizer: bool = True, **overrides: Any):
    """Build :func:`tiny_hf_model`, ``save_pretrained`` it into ``folder`` (sharded with ``max_shard_size``) with
    the tiny tokenizer, and return the model."""
    model = tiny_hf_model(family, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    if tokenizer:
        save_tokenizer(tiny_tokenizer(), folder)
    return model


def write_synthetic_hf(family: str, folder: str | Path, cfg, max_shard_bytes: int, seed: int = 0) -> dict[str, int]:
    """Write a random Hugging Face folder of ``family`` for the moecpt config ``cfg`` straight with safetensors
    (no transformers needed, any size): shards of at most ``max_shard_bytes`` plus the index and ``config.json``.

    Returns:
        ``{"model_bytes": ..., "max_shard_bytes": ..., "shards": ...}`` (bytes of tensor data).
    """
    fam = FAMILIES[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for pc in fam.plan(cfg):
        t = torch.randn(pc.hf_shape, generator=g) * 0.05
        if "norm" in pc.hf:
            t += 1
        n = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + n > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][pc.hf] = t
        sizes[-1] += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(fam.hf_config(cfg)))
    return {"model_bytes": sum(sizes), "max_shard_bytes": max(sizes), "shards": len(shards)}


def hf_forward(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp32 logits ``[B, T, V]`` of a transformers model and each MoE layer's chosen experts ``[B*T, K]``, read
    from the family's own top-k router module (``*TopkRouter`` / ``*TopKRouter``, whose forward returns
    ``(logits, weights, indices)``) through a forward hook, so a choice that depends on biases or groups shows."""
    chosen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: chosen.append(out[2]))
             for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    try:
        with torch.no_grad():
            logits = model(ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    return logits, chosen


def ours_forward(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and each MoE layer's top-k expert ids of a moecpt model, as :func:`hf_forward`."""
    with torch.no_grad():
        logits, routing = model(ids, return_routing=True)
    return logits, [r.topk_idx_TK for r in routing]


def same_topk(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """The same set of experts for every token at every layer (order within a token's top-k ignored)."""
    return len(a) == len(b) >= 1 and all(torch.equal(x.sort(-1).values, y.sort(-1).values) for x, y in zip(a, b))
