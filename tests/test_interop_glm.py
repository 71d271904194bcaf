"""GLM-4.5 (``glm4_moe``) and dots.llm1 (``dots1``) import / export: DeepSeek-V3 routing (sigmoid, selection
bias, groups, renormalised and scaled gates), shared experts, dense first layers, partial RoPE, q/k/v biases and
q/k norm. Tiny random models from transformers' own ``Glm4MoeConfig`` / ``Dots1Config``, varied over those
features, in fp32 and bf16, one file and sharded: the same logits (printed: ``pytest -s -k max_logit``) and the
same experts at every MoE layer as transformers, an export transformers loads to the same logits, a re-import to
the same tensors; a moecpt model trained from scratch with the DeepSeek-V3-style router exports to GLM-4.5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_compare import TOL, check_export_reload_reimport, check_import, ids_of, tiny_imported

from moecpt.cli import main
from moecpt.config import ModelConfig
from moecpt.errors import MoecptError
from moecpt.interop.hf_export import export_hf
from moecpt.interop.hf_import import import_hf, load_hf_model
from moecpt.interop.testing import VOCAB, hf_forward, ours_forward, same_topk, save_tiny_hf
from moecpt.model.transformer import build_model
from moecpt.train.checkpoint import load_checkpoint, load_model, save_checkpoint

transformers.utils.logging.disable_progress_bar()

#: name -> (family, config overrides over moecpt.interop.testing.TINY_CONFIGS)
VARIANTS = {
    "glm-groups-scaled-dense1": ("glm4_moe", {}),  # sharded below
    "glm-one-group-unnormalised-all-moe": ("glm4_moe", dict(
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=0,
        use_qk_norm=False, attention_bias=False, partial_rotary_factor=1.0)),
    "glm-four-groups-two-kept-top3": ("glm4_moe", dict(
        n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=1.7, n_shared_experts=2,
        partial_rotary_factor=0.25)),
    "glm-bf16": ("glm4_moe", dict(dtype="bfloat16")),
    "dots1-groups-scaled-dense1": ("dots1", {}),
    "dots1-one-group-unnormalised-all-moe": ("dots1", dict(n_group=1, topk_group=1, norm_topk_prob=False,
                                                           first_k_dense_replace=0, routed_scaling_factor=1.0)),
}
SHARDED = {"glm-groups-scaled-dense1": "60KB", "dots1-groups-scaled-dense1": "40KB"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glm")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, root):
    name = request.param
    return tiny_imported(root, name, *VARIANTS[name], SHARDED.get(name))


def test_import_max_logit_difference_and_same_experts(variant):
    name, family, hf, folder, ckpt = variant
    check_import(variant, name in SHARDED)
    cfg = ModelConfig.model_validate(load_checkpoint(ckpt).meta["model_config"])
    r = cfg.moe.router
    assert (r.kind.value, r.score_fn.value) == ("bias", "sigmoid")
    assert (r.n_group, r.routed_scale) == (hf.config.n_group, hf.config.routed_scaling_factor)
    assert cfg.rotary_fraction == hf.config.rope_parameters.get("partial_rotary_factor", 1.0)
    assert any(load_checkpoint(ckpt).model_state()[k].abs().sum() > 0
               for k in load_checkpoint(ckpt).model_state() if k.endswith("expert_bias"))


def test_export_loads_in_transformers_and_reimports(variant, root):
    name, family, _, _, ckpt = variant
    check_export_reload_reimport(root, name, family, ckpt)


def _trained_from_scratch(root: Path, name: str, router: dict, **model) -> Path:
    """A few AdamW steps with the bias update after each, on random tokens: the biases move away from zero."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_width=64,
                      ffn_kind="swiglu", max_seq_len=64,
                      moe={"num_experts": 8, "top_k": 2, "granularity": 2, "router": router}, **model)
    torch.manual_seed(0)
    net = build_model(cfg).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for step in range(4):
        ids = ids_of(10 + step)
        logits, routing = net(ids, return_routing=True)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        (loss + sum(r.weighted_aux_loss() for r in routing)).backward()
        opt.step()
        opt.zero_grad()
        for r in net.routers():
            r.update_bias()
    assert all(r.expert_bias.abs().sum() > 0 for r in net.routers() if r.is_bias_balanced)
    path = root / f"native-{name}"
    save_checkpoint(path, model_state=net.state_dict(),
                    meta={"step": 4, "tokens": 0, "model_config": cfg.model_dump(mode="json")})
    return path


DSV3 = {"kind": "bias", "score_fn": "sigmoid", "n_group": 4, "topk_group": 2, "renormalize": True,
        "routed_scale": 2.0, "seq_aux_loss_weight": 1e-4}


@pytest.mark.parametrize("name, router, model, family", [
    ("dsv3", DSV3, {}, "auto"),
    ("sigmoid-penalty-partial-rope", {"kind": "penalty", "score_fn": "sigmoid"}, {"rotary_fraction": 0.5}, "auto"),
    ("dsv3-qk-norm-to-dots1", DSV3, {"qk_norm": "head"}, "dots1"),  # through the CLI's --family
])
def test_moecpt_sigmoid_models_export(name, router, model, family, root):
    ckpt = _trained_from_scratch(root, name, router, **model)
    out = root / f"native-{name}-hf"
    assert main(["export-hf", str(ckpt), "--out", str(out), "--family", family]) == 0
    want = "glm4_moe" if family == "auto" else family
    assert json.loads((out / "config.json").read_text())["model_type"] == want
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    ids = ids_of(6)
    hf_logits, hf_topk = hf_forward(hf.eval(), ids)
    logits, topk = ours_forward(load_model(ckpt), ids)
    assert (hf_logits - logits).abs().max().item() <= TOL and same_topk(hf_topk, topk)


@pytest.mark.parametrize("router, family, words", [
    ({"kind": "bias"}, "auto", "glm4_moe"),  # softmax bias: no family, the message says what would fit
    ({"kind": "bias", "score_fn": "sigmoid"}, "qwen2_moe", "--family glm4_moe"),
    ({"kind": "penalty"}, "glm4_moe", "sigmoid"),
])
def test_bias_and_sigmoid_refusals_name_the_family(router, family, words, root):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, ffn_width=64, max_seq_len=64,
                      moe={"num_experts": 8, "top_k": 2, "router": router})
    ckpt = root / f"refuse-{family}-{router['kind']}-{router.get('score_fn', 'softmax')}"
    save_checkpoint(ckpt, model_state=build_model(cfg).state_dict(),
                    meta={"step": 1, "tokens": 0, "model_config": cfg.model_dump(mode="json")})
    with pytest.raises(MoecptError) as exc:
        export_hf(ckpt, root / "refused", family=family)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_model_type_is_inferred_from_architectures(root, capsys):
    folder = root / "no-model-type"
    hf = save_tiny_hf("glm4_moe", folder, seed=5)
    _edit_config(folder, model_type=None)
    ids = ids_of(7)
    assert (hf_forward(hf, ids)[0] - ours_forward(load_hf_model(folder), ids)[0]).abs().max().item() <= TOL
    _edit_config(folder, architectures=None)
    capsys.readouterr()
    assert main(["import-hf", str(folder), "--out", str(root / "neither")]) == 2
    err = capsys.readouterr().err
    assert "neither model_type nor architectures" in err and err.strip().count("\n") == 0


def test_multi_token_prediction_layers_are_dropped_with_a_note(root):
    from safetensors.torch import load_file, save_file

    folder = root / "mtp"
    save_tiny_hf("glm4_moe", folder, seed=6)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # the MTP layer GLM-4.5 checkpoints carry
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MoecptError, match="not described by config.json"):
        import_hf(folder, root / "mtp-refused")
    _edit_config(folder, num_nextn_predict_layers=1)
    summary = import_hf(folder, root / "mtp-ckpt")
    assert any("multi-token-prediction" in n for n in summary["notes"])


def test_trainer_trains_a_deepseek_v3_router_that_exports_to_glm(root):
    """The real trainer, from scratch: the biases move, the sequence-wise loss is logged and optimised, and the
    checkpoint exports to GLM-4.5 with the same logits and experts."""
    from tiny_recipes import raw_recipe

    from moecpt.config import recipe_from_dict
    from moecpt.train.trainer import Trainer

    router = {"kind": "bias", "score_fn": "sigmoid", "n_group": 4, "topk_group": 2, "routed_scale": 2.5,
              "seq_aux_loss_weight": 0.01, "bias_update_rate": 0.01}
    recipe = recipe_from_dict(raw_recipe("smoke-switch", steps=3, checkpoint_every=3,
                                         model={"moe": {"router": router}}))
    run = root / "dsv3-run"
    Trainer(recipe, run, show_progress=False).run()
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("split") != "val" and "event" not in r]
    assert all(r["seq_balance_mean"] > 0 and r["aux_loss"] > 0 for r in train)  # the only weighted loss
    assert all(max(map(abs, r["bias_std_layers"])) > 0 for r in train)
    out = root / "dsv3-run-hf"
    assert export_hf(run, out)["family"] == "glm4_moe"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model = load_model(run)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    hf_logits, hf_topk = hf_forward(hf, ids)
    logits, topk = ours_forward(model, ids)
    assert (hf_logits - logits).abs().max().item() <= TOL and same_topk(hf_topk, topk)
