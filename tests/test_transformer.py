"""Decoder: attention variants, causality, presets' parameter counts (the paper's arithmetic), autocast."""

from __future__ import annotations

import pytest
import torch

from moecpt.config import ModelConfig, model_preset
from moecpt.model.flops import model_stats
from moecpt.model.moe import MoELayer
from moecpt.model.transformer import Transformer, build_model

V = 64


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_width=48, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        dict(qk_norm="none"),
        dict(qk_norm="head"),
        dict(qk_norm="full", n_kv_heads=2),
        dict(n_kv_heads=1, rotary_fraction=0.5),
        dict(rotary_fraction=0.25, attn_bias=True, tie_embeddings=True),
        dict(ffn_kind="swiglu", moe=dict(num_experts=4, top_k=2, layout="every_nth", every_n=2)),
    ],
    ids=["plain", "qk-head", "qk-full-gqa", "mqa-partial-rope", "bias-tied", "moe-every-2nd"],
)
def test_variants_run_and_train(kw):
    torch.manual_seed(0)
    model = Transformer(small(**kw))
    ids = torch.randint(0, V, (2, 12))
    logits, routing = model(ids, return_routing=True)
    assert logits.shape == (2, 12, V) and torch.isfinite(logits).all()
    assert len(routing) == len(model.routers()) == sum(b.is_moe for b in model.blocks)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids.reshape(-1))
    loss.backward()
    assert model.blocks[0].attn.wq.weight.grad.abs().sum() > 0
    if kw.get("tie_embeddings"):
        assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("preset", ["smoke-dense", "smoke-granular"])
def test_causal(preset):
    torch.manual_seed(0)
    model = Transformer(model_preset(preset, vocab_size=V, qk_norm="head")).eval()
    ids = torch.randint(0, V, (1, 20))
    changed = ids.clone()
    changed[0, 13] = (ids[0, 13] + 1) % V
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=1e-6)
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-4


def test_granular_preset_layers():
    model = build_model(model_preset("smoke-granular", vocab_size=V))
    layer = model.blocks[0].ffn
    assert isinstance(layer, MoELayer)
    assert layer.num_experts == 31 and layer.top_k == 3
    assert layer.experts.width == 176 // 4 and layer.shared.w_out.in_features == 176 // 4


def test_sequence_too_long_and_missing_vocab():
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(small())(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(small(vocab_size=None))


def test_bf16_autocast_model_forward():
    torch.manual_seed(0)
    model = Transformer(model_preset("smoke-switch", vocab_size=V))
    ids = torch.randint(0, V, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, routing = model(ids, return_routing=True)
    assert torch.isfinite(logits.float()).all()
    assert all(r.logits_TE.dtype == torch.float32 for r in routing)
    logits.float().mean().backward()


# ---------------------------------------------------------------------------------------------- paper arithmetic
D, L, F, Vp = 1024, 24, 2816, 128_256
ATTN = 4 * D * D  # wq, wk, wv, wo (no GQA, no biases)
NORMS = L * 2 * D + D  # two RMSNorms per block + the final one
EMB = 2 * Vp * D  # untied input embedding and LM head
GLU = lambda width: 3 * D * width  # noqa: E731  w_in [D, 2W] + w_out [W, D]


def test_paper_dense_params():
    s = model_stats(model_preset("paper-dense"))
    expected = EMB + L * (ATTN + GLU(F)) + NORMS
    assert s["total_params"] == s["active_params"] == expected == 570_999_808  # "about 570M"
    assert s["embedding_params"] == Vp * D and s["expert_params"] == 0
    assert s["active_matmul_params"] == expected - NORMS - Vp * D
    assert s["forward_flops_per_token"] == 2 * s["active_matmul_params"] + 4 * L * 2048 * 16 * 64
    assert s["train_flops_per_token"] == 3 * s["forward_flops_per_token"]


def test_paper_switch_params():
    s = model_stats(model_preset("paper-switch"))
    router = 8 * D
    total = EMB + L * (ATTN + 8 * GLU(F) + router) + NORMS
    active = EMB + L * (ATTN + 1 * GLU(F) + router) + NORMS
    assert s["total_params"] == total == 2_024_522_752  # "about 2.02B total"
    assert s["active_params"] == active == 570_999_808 + L * router  # FLOP-matched with dense (+ the router)
    assert s["expert_params"] == L * 8 * GLU(F)


def test_paper_granular_params():
    s = model_stats(model_preset("paper-granular"))
    W = F // 4  # 704
    router = 31 * D
    total = EMB + L * (ATTN + 31 * GLU(W) + GLU(W) + router) + NORMS  # 31 routed + 1 shared
    active = EMB + L * (ATTN + 3 * GLU(W) + GLU(W) + router) + NORMS  # top-3 + shared = 4 * 704 = 2816 wide
    assert s["total_params"] == total == 2_025_088_000
    assert s["active_params"] == active == 570_999_808 + L * router
    assert abs(s["total_params"] / 1e9 - 2.02) < 0.01 and abs(s["active_params"] / 1e6 - 571) < 1
    dense = model_stats(model_preset("paper-dense"))
    # same FFN FLOPs per token as dense; only the router's matmul is extra
    assert s["forward_flops_per_token"] - dense["forward_flops_per_token"] == 2 * L * router
