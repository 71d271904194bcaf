"""DeepSeek-V3 (``deepseek_v3``) and DeepSeek-V2 (``deepseek_v2``) import / export: multi-head latent attention
(query latent or full q projection, interleaved or half-rotation RoPE), DeepSeek-V3 routing (sigmoid, selection
bias, groups) and DeepSeek-V2 routing (softmax, ``greedy`` / ``group_limited_greedy``, scaled gates), shared
experts, dense first layers. Tiny random models from transformers' own ``DeepseekV3Config`` / ``DeepseekV2Config``
in fp32 and bf16, one file and sharded with an index: the same logits (printed: ``pytest -s -k max_logit``), the
same experts at every MoE layer and the same 24 greedy tokens (transformers' cached ``generate``) as transformers;
an export transformers reloads to the same logits and that re-imports to the same tensors; moecpt MLA models
trained from scratch (bias-balanced sigmoid, and softmax) export to deepseek_v3 / deepseek_v2; refusals in one
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_compare import TOL, check_export_reload_reimport, check_greedy, check_import, ids_of, tiny_imported

from moecpt.cli import main
from moecpt.config import ModelConfig
from moecpt.errors import MoecptError
from moecpt.interop.hf_export import export_hf
from moecpt.interop.hf_import import load_hf_model
from moecpt.interop.testing import VOCAB, hf_forward, ours_forward, same_topk, save_tiny_hf
from moecpt.model.flops import model_stats
from moecpt.model.transformer import build_model
from moecpt.train.checkpoint import load_checkpoint, load_model, save_checkpoint

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

#: name -> (family, config overrides over moecpt.interop.testing.TINY_CONFIGS)
VARIANTS = {
    "v3-qlora-groups-dense1": ("deepseek_v3", {}),  # sharded below
    "v3-full-q-halfrot-one-group-all-moe-2shared": ("deepseek_v3", dict(
        q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, first_k_dense_replace=0, n_shared_experts=2)),
    "v3-bf16-four-groups-top3": ("deepseek_v3", dict(dtype="bfloat16", n_group=4, topk_group=2,
                                                     num_experts_per_tok=3, first_k_dense_replace=2)),
    "v2-lite-grouped-dense1": ("deepseek_v2", {}),  # sharded below
    "v2-qlora-greedy-all-moe-1shared": ("deepseek_v2", dict(
        q_lora_rank=20, topk_method="greedy", n_group=None, topk_group=None, first_k_dense_replace=0,
        n_shared_experts=1, routed_scaling_factor=1.0)),
    "v2-bf16": ("deepseek_v2", dict(dtype="bfloat16")),
    # YaRN as DeepSeek ships it (V3: factor 40, mscale = mscale_all_dim = 1; V2: 0.707 each), shrunk to 64 positions
    "v3-yarn-mscale-1": ("deepseek_v3", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})),
    "v2-yarn-mscale-0.707": ("deepseek_v2", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})),
}
SHARDED = {"v3-qlora-groups-dense1": "40KB", "v2-lite-grouped-dense1": "40KB"}
#: variants whose greedy tokens are compared with transformers' generate (24 forwards each: kept to one per family)
GREEDY = {"v3-qlora-groups-dense1", "v2-lite-grouped-dense1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deepseek")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, root):
    name = request.param
    return tiny_imported(root, name, *VARIANTS[name], SHARDED.get(name))


def test_import_max_logit_difference_same_experts_and_greedy_tokens(variant):
    """fp32: max |logit difference| <= 1e-5 (V3 measures 0 or < 1e-6, V2 about 2e-6: its complex rotation sums in
    another order); the same experts per MoE layer; the same 24 greedy tokens as transformers' cached generate."""
    name = variant[0]
    hf_model, model = check_import(variant, name in SHARDED)
    if name in GREEDY:
        check_greedy(hf_model, model, 24)


def test_imported_config(variant):
    name, family, hf, folder, ckpt = variant
    cfg = ModelConfig.model_validate(load_checkpoint(ckpt).meta["model_config"])
    c = hf.config
    assert cfg.attention.value == "mla" and cfg.mla.q_lora_rank == c.q_lora_rank
    assert (cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim) == (
        c.kv_lora_rank, c.qk_rope_head_dim, c.v_head_dim)
    r = cfg.moe.router
    assert r.routed_scale == c.routed_scaling_factor
    if family == "deepseek_v3":
        assert (r.kind.value, r.score_fn.value, r.n_group) == ("bias", "sigmoid", c.n_group)
        assert cfg.mla.rope_interleave == c.rope_interleave
    else:
        assert (r.kind.value, r.score_fn.value, r.renormalize) == ("penalty", "softmax", False)
        assert r.n_group == (c.n_group if c.topk_method == "group_limited_greedy" else 1)


def test_export_loads_in_transformers_and_reimports(variant, root):
    name, family, _, _, ckpt = variant
    check_export_reload_reimport(root, name, family, ckpt)


MLA = {"q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12}


def _mla_cfg(router: dict, **model) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, ffn_width=64, ffn_kind="swiglu",
                       max_seq_len=64, attention="mla", mla=model.pop("mla", MLA),
                       moe={"num_experts": 8, "top_k": 2, "granularity": 2, "router": router}, **model)


def test_trainer_trains_a_bias_balanced_mla_switch_model_that_exports_to_deepseek_v3(root):
    """The real trainer, from scratch, on an MLA Switch recipe with DeepSeek-V3 routing: the loss falls, the biases
    move, and the checkpoint exports (auto) to deepseek_v3 with its biases as e_score_correction_bias, the same
    logits and experts after transformers reloads it."""
    from tiny_recipes import raw_recipe

    from moecpt.config import recipe_from_dict
    from moecpt.train.trainer import Trainer

    router = {"kind": "bias", "score_fn": "sigmoid", "n_group": 4, "topk_group": 2, "routed_scale": 2.5,
              "bias_update_rate": 0.01}
    recipe = recipe_from_dict(raw_recipe("smoke-switch", steps=3, checkpoint_every=3, model={
        "attention": "mla", "mla": {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                                    "v_head_dim": 16}, "ffn_kind": "swiglu", "moe": {"router": router}}))
    run = root / "mla-run"
    Trainer(recipe, run, show_progress=False).run()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") != "val" and "event" not in r]
    assert len(train) == 3 and all(max(map(abs, r["bias_std_layers"])) > 0 for r in train)
    out = root / "mla-run-hf"
    assert export_hf(run, out)["family"] == "deepseek_v3"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model = load_model(run)
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0 and torch.equal(bias, model.blocks[1].ffn.router.expert_bias.float())
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    hf_logits, hf_topk = hf_forward(hf, ids)
    logits, topk = ours_forward(model, ids)
    assert (hf_logits - logits).abs().max().item() <= TOL and same_topk(hf_topk, topk)


@pytest.mark.parametrize("name, router, family, model", [
    ("softmax-grouped-full-q", {"kind": "penalty", "n_group": 4, "topk_group": 2, "group_score": "max",
                                "routed_scale": 1.5, "seq_aux_loss_weight": 1e-3},
     "deepseek_v2", {"mla": {**MLA, "q_lora_rank": None}}),
    ("sigmoid-penalty-to-v3", {"kind": "penalty", "score_fn": "sigmoid", "renormalize": True}, "deepseek_v3", {}),
])
def test_moecpt_mla_models_export(name, router, family, model, root):
    cfg = _mla_cfg(router, **model)
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    ckpt = root / f"native-{name}"
    save_checkpoint(ckpt, model_state=net.state_dict(), meta={"step": 1, "tokens": 0,
                                                              "model_config": cfg.model_dump(mode="json")})
    out = root / f"native-{name}-hf"
    assert main(["export-hf", str(ckpt), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    ids = ids_of(6)
    hf_logits, hf_topk = hf_forward(hf.eval(), ids)
    logits, topk = ours_forward(load_model(ckpt), ids)
    assert (hf_logits - logits).abs().max().item() <= TOL and same_topk(hf_topk, topk)


def test_flops_count_latent_attention():
    cfg = _mla_cfg({"kind": "bias", "score_fn": "sigmoid"})
    s = model_stats(cfg, seq_len=64)
    attn = 2 * 2 * 64 * 4 * ((8 + 8) + 12)  # 2 L T H (Dqk + Dv)
    assert s["forward_flops_per_token"] == 2 * s["active_matmul_params"] + attn
    per_layer_attn = 64 * 24 + 24 * 4 * 16 + 64 * (16 + 8) + 16 * 4 * (8 + 12) + 4 * 12 * 64
    net = build_model(cfg, "meta")
    assert sum(p.numel() for n, p in net.blocks[0].attn.named_parameters() if "norm" not in n) == per_layer_attn


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("family, changes, words", [
    ("deepseek_v3", {"rope_scaling": {"rope_type": "yarn", "factor": 40.0}}, "original_max_position_embeddings"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}}, "'longrope'"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias"),
    ("deepseek_v3", {"model_type": "kimi_k2", "rope_scaling": {"type": "dynamic", "factor": 32.0}}, "'dynamic'"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method = 'greedy'"),
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method = 'noaux_tc' is not supported"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek_v2", {"mlp_bias": True}, "mlp_bias"),
    ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek_v3", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "(fp8)"),
])
def test_unsupported_configs_are_refused_in_one_line(family, changes, words, root):
    folder = root / f"refuse-{family}"
    if not folder.exists():
        save_tiny_hf(family, folder, seed=9, tokenizer=False)
    original = (folder / "config.json").read_text()
    try:
        _edit_config(folder, **changes)
        with pytest.raises(MoecptError) as exc:
            load_hf_model(folder)
    finally:
        (folder / "config.json").write_text(original)
    assert words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("model, family, words", [
    ({"attention": "mla", "mla": MLA, "moe": {"router": {"kind": "bias", "score_fn": "sigmoid"}}}, "glm4_moe",
     "--family deepseek_v3"),
    ({"attention": "mla", "mla": MLA, "moe": {"router": {"kind": "penalty"}}}, "mixtral", "deepseek_v2"),
    ({"moe": {"router": {"kind": "bias", "score_fn": "sigmoid"}}}, "deepseek_v3", "attention = 'gqa'"),
    ({"attention": "mla", "mla": MLA, "moe": {"router": {"kind": "bias", "score_fn": "softmax"}}}, "deepseek_v2",
     "no selection biases"),
    ({"attention": "mla", "mla": MLA, "moe": {"router": {"kind": "penalty", "renormalize": True}}}, "deepseek_v2",
     "never renormalises"),
    ({"attention": "mla", "mla": {**MLA, "latent_norm_eps": 1e-5}, "moe": {"router": {"score_fn": "sigmoid"}}},
     "deepseek_v3", "eps 1e-6"),
])
def test_export_refusals_name_the_family(model, family, words, root):
    moe = {"num_experts": 8, "top_k": 2, **model.pop("moe")}
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, ffn_width=64, max_seq_len=64, moe=moe,
                      **model)
    ckpt = root / f"refuse-export-{family}-{len(words)}"
    save_checkpoint(ckpt, model_state=build_model(cfg).state_dict(),
                    meta={"step": 1, "tokens": 0, "model_config": cfg.model_dump(mode="json")})
    with pytest.raises(MoecptError) as exc:
        export_hf(ckpt, root / "refused", family=family)
    assert words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("model, words", [
    ({"attention": "mla"}, "needs a [model.mla] table"),
    ({"mla": MLA}, "attention = 'gqa'"),
    ({"attention": "mla", "mla": MLA, "qk_norm": "head"}, "model.qk_norm is a grouped-query attention setting"),
    ({"attention": "mla", "mla": {**MLA, "qk_rope_head_dim": 7}}, "must be even"),
])
def test_mla_config_validation(model, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig(vocab_size=VOCAB, d_model=64, n_heads=4, **model)


@pytest.mark.parametrize("seq_aux, field", [(True, "seq_aux_loss_weight"), (False, "aux_loss_weight")])
def test_v2_aux_loss_alpha_becomes_the_balance_loss_weight(seq_aux, field, root):
    """DeepSeek's ``aux_loss_alpha`` (expert-level balance loss, per sequence with ``seq_aux``) is the weight."""
    folder = root / "refuse-deepseek_v2"
    if not folder.exists():
        save_tiny_hf("deepseek_v2", folder, seed=9, tokenizer=False)
    original = (folder / "config.json").read_text()
    try:
        _edit_config(folder, aux_loss_alpha=0.003, seq_aux=seq_aux)
        r = load_hf_model(folder).cfg.moe.router
    finally:
        (folder / "config.json").write_text(original)
    other = "aux_loss_weight" if field == "seq_aux_loss_weight" else "seq_aux_loss_weight"
    assert (getattr(r, field), getattr(r, other), r.z_loss_weight) == (0.003, 0.0, 0.0)
