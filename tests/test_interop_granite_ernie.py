"""Granite-MoE (``granitemoe``, ``granitemoeshared``: muP-style embedding / residual / attention / logits
multipliers, stacked expert tensors) and Ernie-4.5-MoE (``ernie4_5_moe``: softmax scores with a selection bias,
shared experts, MoE every n-th layer from a start index, RoPE on interleaved pairs). Tiny random models from
transformers' own config classes, in fp32 and bf16, one file and sharded: the same logits (printed: ``pytest -s -k
max_logit``), the same experts at every layer and the same greedy continuation as transformers; an export
transformers loads to the same logits and a re-import to the same tensors; Granite's transformers-5 tensor names; a
few CPT steps, then export; a moecpt model with multipliers exports to Granite only, one with a softmax bias router
to Ernie-4.5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from hf_compare import TOL, check_export_reload_reimport, check_greedy, check_import, ids_of, tiny_imported

from moecpt.config import ModelConfig, recipe_from_dict
from moecpt.data.shards import prepare
from moecpt.errors import MoecptError
from moecpt.interop.hf_export import export_hf
from moecpt.interop.hf_import import import_hf
from moecpt.interop.testing import VOCAB, hf_forward, ours_forward, same_topk, save_tiny_hf, synthetic_texts
from moecpt.model.transformer import build_model
from moecpt.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from moecpt.train.trainer import Trainer

transformers.utils.logging.disable_progress_bar()

VARIANTS = {
    "granite-sharded": ("granitemoe", {}),
    "granite-top3-unit-multipliers": ("granitemoe", dict(num_experts_per_tok=3, embedding_multiplier=1.0,
                                                         residual_multiplier=1.0, logits_scaling=1.0,
                                                         attention_multiplier=0.25)),
    "granite-bf16": ("granitemoe", dict(dtype="bfloat16")),
    "granite-shared-tied": ("granitemoeshared", {}),
    "ernie-dense-first-shared-tied": ("ernie4_5_moe", {}),
    "ernie-every-2nd-no-shared-sharded": ("ernie4_5_moe", dict(moe_layer_start_index=0, moe_layer_interval=2,
                                                               moe_num_shared_experts=0, tie_word_embeddings=False,
                                                               moe_k=3, head_dim=16)),
    "ernie-bf16": ("ernie4_5_moe", dict(dtype="bfloat16")),
}
SHARDED = {"granite-sharded": "40KB", "ernie-every-2nd-no-shared-sharded": "60KB"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("granite")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, root):
    name = request.param
    return tiny_imported(root, name, *VARIANTS[name], SHARDED.get(name))


def test_import_max_logit_difference_same_experts_and_greedy_text(variant):
    name, family, hf, folder, ckpt = variant
    hf_model, ours = check_import(variant, name in SHARDED, min_shards=2)
    cfg = ModelConfig.model_validate(load_checkpoint(ckpt).meta["model_config"])
    c = hf.config
    if family.startswith("granite"):
        assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier, cfg.logits_scaling) == (
            c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier, c.logits_scaling)
    else:
        r = cfg.moe.router
        assert (r.kind.value, r.score_fn.value, r.renormalize) == ("bias", "softmax", True)
    check_greedy(hf_model, ours, 20)


def test_export_loads_in_transformers_and_reimports(variant, root):
    name, family, _, _, ckpt = variant
    check_export_reload_reimport(root, name, family, ckpt, shard_size="40KB")


def test_transformers_5_in_memory_names_import_too(root):
    """``experts.gate_up_proj`` / ``experts.down_proj`` / ``router.weight``: what a checkpoint written without the
    reverse conversion holds."""
    folder = root / "v5-names"
    hf = save_tiny_hf("granitemoe", folder, seed=9)
    state = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj")
                .replace("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj")
                .replace("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    import_hf(folder, root / "v5-ckpt")
    ids = ids_of(4)
    assert (hf_forward(hf, ids)[0] - ours_forward(load_model(root / "v5-ckpt"), ids)[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["granitemoe", "ernie4_5_moe"])
def test_cpt_then_export(family, root):
    save_tiny_hf(family, root / f"cpt-{family}-hf", seed=5)
    ckpt, run = root / f"cpt-{family}-ckpt", root / f"cpt-{family}-run"
    import_hf(root / f"cpt-{family}-hf", ckpt)
    new = root / "new.jsonl"
    new.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_texts(11, 200, alphabet="aeiofhjvwx")))
    data = root / f"data-{family}"
    prepare({"new": str(new)}, data, tokenizer=str(ckpt / "tokenizer.json"), val_fraction=0.1, min_val_tokens=512,
            progress=False)
    recipe = recipe_from_dict({"name": "cpt", "data": {"path": str(data), "mixture": {"new": 1.0}, "seq_len": 32},
                               "optim": {"lr": 3e-3, "min_lr": 3e-4},
                               "train": {"steps": 6, "batch_size": 4, "eval_every": 6, "eval_batches": 1,
                                         "checkpoint_every": 6, "device": "cpu", "seed": 0}})
    assert Trainer(recipe, run, parent=ckpt, show_progress=False).run()["steps"] == 6
    if family == "ernie4_5_moe":  # the bias-balancing update ran: the selection biases moved
        before, after = load_checkpoint(ckpt).model_state(), load_checkpoint(run).model_state()
        assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("expert_bias"))
    out = root / f"cpt-{family}-export"
    assert export_hf(run, out)["family"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = ids_of(8)
    assert (hf_forward(hf, ids)[0] - ours_forward(load_model(run), ids)[0]).abs().max().item() <= TOL


def _native(root: Path, name: str, router: dict | None = None, **model) -> Path:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_width=64,
                      ffn_kind="swiglu", max_seq_len=64, moe={"num_experts": 8, "top_k": 2, "granularity": 2,
                                                              "router": router or {"renormalize": True}}, **model)
    torch.manual_seed(0)
    net = build_model(cfg)
    for r in net.routers():
        if r.is_bias_balanced:  # random selection biases: a bias dropped, or used in the gates, shows
            r.expert_bias.normal_(0.0, 0.05)
    path = root / f"native-{name}"
    save_checkpoint(path, model_state=net.state_dict(),
                    meta={"step": 1, "tokens": 0, "model_config": cfg.model_dump(mode="json")})
    return path


def test_a_moecpt_model_with_multipliers_exports_to_granite_only(root):
    ckpt = _native(root, "mup", embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0)
    out = root / "native-mup-hf"
    assert export_hf(ckpt, out)["family"] == "granitemoe"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = ids_of(6)
    assert (hf_forward(hf, ids)[0] - ours_forward(load_model(ckpt), ids)[0]).abs().max().item() <= TOL
    with pytest.raises(MoecptError, match="exist only in Granite-MoE; export with --family granitemoe") as e:
        export_hf(ckpt, root / "refused", family="mixtral")
    assert "\n" not in str(e.value)
    # the usual model, with its attention scale written out, is still a Mixtral
    plain = _native(root, "plain", attention_multiplier=16 ** -0.5)
    assert export_hf(plain, root / "plain-hf")["family"] != "granitemoe"


def test_granite_refusals_are_one_line(root):
    folder = root / "biased"
    save_tiny_hf("granitemoe", folder, seed=2)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(MoecptError, match="attention_bias") as e:
        import_hf(folder, root / "biased-ckpt")
    assert "\n" not in str(e.value)
    unshared = _native(root, "unshared", embedding_multiplier=2.0)
    with pytest.raises(MoecptError, match="granitemoeshared is Granite-MoE with a shared expert; this model has none"):
        export_hf(unshared, root / "x", family="granitemoeshared")


def test_a_softmax_bias_router_exports_to_ernie(root):
    """Auxiliary-loss-free balancing with softmax scores (moecpt's ``bias`` router) is Ernie-4.5-MoE's routing."""
    ckpt = _native(root, "softmax-bias", router={"kind": "bias", "renormalize": True})
    out = root / "softmax-bias-hf"
    assert export_hf(ckpt, out)["family"] == "ernie4_5_moe"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = ids_of(12)
    hf_logits, hf_topk = hf_forward(hf, ids)
    logits, topk = ours_forward(load_model(ckpt), ids)
    assert (hf_logits - logits).abs().max().item() <= TOL and same_topk(hf_topk, topk)
    with pytest.raises(MoecptError, match="--family ernie4_5_moe") as e:
        export_hf(ckpt, root / "refused-qwen", family="qwen2_moe")
    assert "\n" not in str(e.value)
    folder = root / "ernie-biased"
    save_tiny_hf("ernie4_5_moe", folder, seed=2)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "use_bias": True}))
    with pytest.raises(MoecptError, match="use_bias = true"):
        import_hf(folder, root / "ernie-biased-ckpt")
