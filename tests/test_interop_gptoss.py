"""GPT-OSS (``gpt_oss``: attention sinks, alternating sliding / full layers, q/k/v/o, router and expert biases, the
clamped SwiGLU with interleaved gate / up, MXFP4 experts) and sliding windows kept on import (Mixtral, Qwen2-MoE,
Qwen3-MoE, dots1). Tiny random models from transformers' own config classes, with windows shorter than the test
sequences: the same logits (printed: ``pytest -s -k max_logit``), the same experts at every layer and the same
greedy continuation past the window as transformers; an export transformers loads to the same logits and a
re-import to the same tensors; a few CPT steps, then export; MXFP4 dequantisation against transformers' own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from hf_compare import TOL, check_export_reload_reimport, ids_of, tiny_imported  # noqa: E402
from transformers.integrations.mxfp4 import _convert_moe_packed_tensors  # noqa: E402

from moecpt.config import ModelConfig, YarnConfig, recipe_from_dict  # noqa: E402
from moecpt.data.shards import prepare  # noqa: E402
from moecpt.errors import MoecptError  # noqa: E402
from moecpt.interop.families import deinterleave  # noqa: E402
from moecpt.interop.hf_export import export_hf  # noqa: E402
from moecpt.interop.hf_import import import_hf  # noqa: E402
from moecpt.interop.mxfp4 import dequantize_mxfp4  # noqa: E402
from moecpt.interop.testing import (  # noqa: E402
    VOCAB,
    hf_forward,
    ours_forward,
    same_topk,
    save_tiny_hf,
    synthetic_texts,  # noqa: E402
)
from moecpt.model.attention_ops import attend  # noqa: E402
from moecpt.model.flops import model_stats  # noqa: E402
from moecpt.model.moe import MoELayer  # noqa: E402
from moecpt.model.transformer import build_model  # noqa: E402
from moecpt.model.yarn import yarn_attention_factor, yarn_inv_freq  # noqa: E402
from moecpt.train.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from moecpt.train.generate import sample  # noqa: E402
from moecpt.train.trainer import Trainer  # noqa: E402

transformers.utils.logging.disable_progress_bar()

#: every window (4) is shorter than the 24-token test sequences and the 26-token greedy runs
VARIANTS = {
    "gpt_oss": ("gpt_oss", {}),
    "gpt_oss-yarn-sharded": ("gpt_oss", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                              "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                              "truncate": False,
                                                              "original_max_position_embeddings": 16})),
    "mixtral-window": ("mixtral", dict(sliding_window=4)),
    "qwen2-window-first-layers": ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "qwen3-window": ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4)),
    "dots1-window-last-layers": ("dots1", dict(sliding_window=4, max_window_layers=1)),
}


_ids = ids_of


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gptoss")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, root):
    name = request.param
    family, overrides = VARIANTS[name]
    return tiny_imported(root, name, family, overrides, "60KB" if "sharded" in name else None)


def test_import_max_logit_difference_same_experts_and_greedy_text_past_the_window(variant):
    name, family, hf, folder, ckpt = variant
    ids = _ids()
    hf_logits, hf_topk = hf_forward(hf, ids)
    ours = load_model(ckpt)
    logits, topk = ours_forward(ours, ids)
    diff = (hf_logits - logits).abs().max().item()
    print(f"\n{family} {name}: max |logit difference| = {diff:.2e}")
    assert diff <= TOL and same_topk(hf_topk, topk)
    cfg = ModelConfig.model_validate(load_checkpoint(ckpt).meta["model_config"])
    assert cfg.max_seq_len == hf.config.max_position_embeddings and cfg.sliding_window == 4
    kinds = [cfg.window_of(i) is not None for i in range(cfg.n_layers)]
    assert kinds == [t == "sliding_attention" for t in hf.config.layer_types] if hasattr(hf.config, "layer_types") \
        else all(kinds)
    # the window matters here: without it the logits move well past the tolerance
    unwindowed = load_model(ckpt)
    for b in unwindowed.blocks:
        b.attn.window = None
    off = (ours_forward(unwindowed, ids)[0] - hf_logits).abs().max().item()
    print(f"{family} {name}: the same model unwindowed (as the old export ran it) is off by {off:.2f}")
    assert off > 100 * TOL
    if name in ("gpt_oss", "mixtral-window"):  # greedy text through the window: generate-side, family-independent
        prompt = _ids(2, 6)[:1]
        with torch.no_grad():
            want = hf.generate(prompt, max_new_tokens=14, do_sample=False, min_new_tokens=14)[0, 6:]
        assert sample(ours, prompt[0].tolist(), max_new_tokens=14, temperature=0.0) == want.tolist()


def test_export_loads_in_transformers_and_reimports(variant, root):
    name, family, hf_src, _, ckpt = variant
    check_export_reload_reimport(root, name, family, ckpt)
    written = json.loads((root / f"{name}-export" / "config.json").read_text())
    assert written["max_position_embeddings"] == hf_src.config.max_position_embeddings
    if hasattr(hf_src.config, "layer_types"):
        assert written["layer_types"] == hf_src.config.layer_types


def test_gptoss_cpt_then_export(root):
    save_tiny_hf("gpt_oss", root / "cpt-hf", seed=5)
    ckpt, run = root / "cpt-ckpt", root / "cpt-run"
    import_hf(root / "cpt-hf", ckpt)
    new = root / "new.jsonl"
    new.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_texts(11, 200, alphabet="aeiofhjvwx")))
    data = root / "data"
    prepare({"new": str(new)}, data, tokenizer=str(ckpt / "tokenizer.json"), val_fraction=0.1, min_val_tokens=512,
            progress=False)
    recipe = recipe_from_dict({"name": "cpt", "data": {"path": str(data), "mixture": {"new": 1.0}, "seq_len": 32},
                               "optim": {"lr": 3e-3, "min_lr": 3e-4},
                               "train": {"steps": 4, "batch_size": 4, "eval_every": 4, "eval_batches": 1,
                                         "checkpoint_every": 4, "device": "cpu", "seed": 0}})
    assert Trainer(recipe, run, parent=ckpt, show_progress=False).run()["steps"] == 4
    before, after = load_checkpoint(ckpt).model_state(), load_checkpoint(run).model_state()
    for suffix in ("attn.sinks", "attn.wo.bias", "router.logit_bias", "experts.b_in", "experts.b_out"):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(suffix)), suffix
    out = root / "cpt-export"
    assert export_hf(run, out)["family"] == "gpt_oss"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = _ids(8)
    assert (hf_forward(hf, ids)[0] - ours_forward(load_model(run), ids)[0]).abs().max().item() <= TOL


def _random_mxfp4(g: torch.Generator, E: int, out: int, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (E, out, inner // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 132, (E, out, inner // 32), generator=g, dtype=torch.uint8)  # 2^-9 .. 2^4
    return blocks, scales


def test_mxfp4_dequantisation_matches_transformers_and_imports(root):
    g = torch.Generator().manual_seed(0)
    blocks, scales = _random_mxfp4(g, 3, 40, 96)
    want = _convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (3, 96, 40) and torch.equal(got, want)
    # an MXFP4 folder: the expert matrices as blocks + scales, the rest bf16 (as openai/gpt-oss-20b ships)
    folder = root / "mxfp4-hf"
    save_tiny_hf("gpt_oss", folder, seed=3)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "model.safetensors")).items()}
    ref = {}
    for k in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, inner, out = state.pop(k).shape
        state[f"{k}_blocks"], state[f"{k}_scales"] = _random_mxfp4(g, E, out, inner)
        ref[k] = _convert_moe_packed_tensors(state[f"{k}_blocks"], state[f"{k}_scales"], dtype=torch.float32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    summary = import_hf(folder, root / "mxfp4-ckpt", dtype="fp32")
    assert any("MXFP4" in n for n in summary["notes"])
    ours = load_checkpoint(root / "mxfp4-ckpt").model_state()
    for i in range(2):
        L = f"model.layers.{i}.mlp.experts"
        assert torch.equal(ours[f"blocks.{i}.ffn.experts.w_in"], deinterleave(ref[f"{L}.gate_up_proj"]))
        assert torch.equal(ours[f"blocks.{i}.ffn.experts.w_out"], ref[f"{L}.down_proj"])
    notes = export_hf(root / "mxfp4-ckpt", root / "mxfp4-export", dtype="bf16")["notes"]
    assert any("unquantised (bfloat16)" in n for n in notes)
    assert "quantization_config" not in json.loads((root / "mxfp4-export" / "config.json").read_text())


@pytest.mark.parametrize("rope", [dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                      original_max_position_embeddings=4096),  # GPT-OSS's
                                 dict(factor=4.0, original_max_position_embeddings=2048),  # defaults, truncated
                                 dict(factor=8.0, beta_fast=16.0, beta_slow=2.0, attention_factor=1.3,
                                      original_max_position_embeddings=512),
                                 dict(factor=40.0, mscale=0.707, mscale_all_dim=1.0,  # DeepSeek's attention factor
                                      original_max_position_embeddings=4096)])
def test_yarn_matches_transformers(rope):
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    hf_cfg = transformers.GptOssConfig(head_dim=64, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0,
                                                                      **rope})
    want_inv, want_scale = _compute_yarn_parameters(hf_cfg)
    y = YarnConfig(**rope)
    assert torch.equal(yarn_inv_freq(64, 150000.0, y), want_inv) and yarn_attention_factor(y) == want_scale


def test_refusals_are_one_line(root):
    folder = root / "refuse-hf"
    save_tiny_hf("gpt_oss", folder, seed=2)
    import_hf(folder, root / "plain-ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 32.0,
                              "original_max_position_embeddings": 16}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoecptError, match="RoPE scaling 'longrope' is not supported") as e:
        import_hf(folder, root / "longrope-ckpt")
    assert "\n" not in str(e.value)
    with pytest.raises(MoecptError, match="exist only in GPT-OSS; export with --family gpt_oss") as e:
        export_hf(root / "plain-ckpt", root / "refused", family="mixtral")
    assert "\n" not in str(e.value)
    mixed = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, ffn_width=32, ffn_kind="swiglu",
                        sliding_window=4, layer_types=["sliding", "full"],
                        moe={"num_experts": 4, "top_k": 2, "router": {"renormalize": True}})
    save_checkpoint(root / "mixed", model_state=build_model(mixed).state_dict(),
                    meta={"step": 1, "tokens": 0, "model_config": mixed.model_dump(mode="json")})
    with pytest.raises(MoecptError, match="windows every layer or none"):
        export_hf(root / "mixed", root / "refused-mixtral", family="mixtral")
    assert export_hf(root / "mixed", root / "mixed-hf")["family"] == "qwen2_moe"  # layer_types carries it
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        ModelConfig(n_layers=2, sliding_window=4, layer_types=["full", "sliding", "full"])


def test_windows_and_expert_biases_in_the_model_stats():
    """A sliding layer's attention FLOPs count its window, not the context; expert biases are expert parameters."""
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, ffn_width=32, max_seq_len=64, ffn_kind="swiglu",
                moe={"num_experts": 4, "top_k": 2, "router": {"renormalize": True}})
    full = model_stats(ModelConfig(**base))
    windowed = model_stats(ModelConfig(**base, sliding_window=4, layer_types=["sliding", "full"]))
    assert full["forward_flops_per_token"] - windowed["forward_flops_per_token"] == 4 * (64 - 4) * 4 * 8
    biased = model_stats(ModelConfig(**{**base, "moe": {**base["moe"], "expert_bias": True}}))
    assert biased["expert_params"] - full["expert_params"] == 2 * 4 * (2 * 32 + 32)


@pytest.mark.parametrize("window", [3, None])
def test_sink_attention_equals_the_eager_softmax_with_gradients(window):
    """``attend`` against transformers' eager GPT-OSS attention written out (fp64): the sink joins the softmax
    denominator and attends nothing; outputs and the gradients of q, k, v and the sinks agree."""
    g = torch.Generator().manual_seed(0)
    B, H, T, A = 2, 3, 9, 4
    q, k, v = (torch.randn(B, H, T, A, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(H, generator=g, dtype=torch.float64, requires_grad=True)
    out = attend(q, k, v, window=window, sinks_H=sinks)
    t = torch.arange(T)
    keep = (t[None] <= t[:, None]) & ((t[None] > t[:, None] - window) if window else True)
    scores = (q @ k.transpose(-1, -2) / A ** 0.5).masked_fill(~keep, float("-inf"))
    probs = torch.softmax(torch.cat([scores, sinks[None, :, None, None].expand(B, H, T, 1)], -1), -1)[..., :-1]
    want = probs @ v
    assert (out - want).abs().max().item() < 1e-12
    grads = torch.autograd.grad((out * want.detach()).sum(), [q, k, v, sinks])
    ref = torch.autograd.grad((want * want.detach()).sum(), [q, k, v, sinks])
    assert all((a - b).abs().max().item() < 1e-12 for a, b in zip(grads, ref))


@pytest.mark.parametrize("layout", ["grouped_mm", 0, 128])
@pytest.mark.parametrize("cf", [None, 0.5])
def test_biased_clamped_experts_fused_and_loop_dispatch_agree(layout, cf):
    """GPT-OSS's experts (biases, clamped SwiGLU) in the fused grouped kernel equal the per-expert autograd path:
    outputs and every gradient, with pre-activations large enough that the clamps at +-7 bite."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, ffn_width=16, ffn_kind="swiglu_clamped",
                      moe={"num_experts": 8, "top_k": 2, "expert_bias": True, "capacity_factor": cf,
                           "router": {"renormalize": True, "logit_bias": True}})
    torch.manual_seed(0)
    fused = MoELayer(cfg)
    with torch.no_grad():
        for p in fused.parameters():
            p.normal_(0.0, 1.0)
    if layout != "grouped_mm":
        fused.use_grouped_mm, fused.group_overhead_rows = False, layout
    loop = MoELayer(cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"dispatch": "loop"})}))
    loop.load_state_dict(fused.state_dict())
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(40, 32, generator=gen), torch.randn(40, 32, generator=gen)
    h = x @ fused.experts.w_in[0]
    assert (h > 7).any() and (h < -7).any()  # both clamps are exercised
    results = []
    for layer in (fused, loop):
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        (y * g).sum().backward()
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (yf, xf, pf), (yl, xl, pl) = results
    # N(0, 1) weights make |y| reach ~1e2, and the two paths sum in different orders (and differently with the
    # thread count): fp32 agreement is to a few ulps of the largest term, not of each (cancelled) element
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-7 * float(b.abs().max()))  # noqa: E731
    close(yf, yl)
    close(xf, xl)
    for name in pf:
        torch.testing.assert_close(pf[name], pl[name], rtol=1e-4, atol=1e-4, msg=name)
