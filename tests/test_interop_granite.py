"""Granite-MoE (``granitemoe``) and Granite-MoE with a shared expert (``granitemoeshared``): the muP-style
multipliers (embedding, residual, attention scale, logits) and the stacked expert tensors. Tiny random models from
transformers' own config classes, in fp32 and bf16, one file and sharded, with the hub's tensor names and with
transformers 5's in-memory names: the same logits (printed: ``pytest -s -k max_logit``), the same experts at every
layer and the same greedy continuation as transformers; an export transformers loads to the same logits and a
re-import to the same tensors; a few CPT steps, then export; a moecpt model with multipliers exports to Granite
only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from moecpt.config import ModelConfig, recipe_from_dict
from moecpt.data.shards import prepare
from moecpt.errors import MoecptError
from moecpt.interop.hf_export import export_hf
from moecpt.interop.hf_import import import_hf
from moecpt.interop.testing import VOCAB, hf_forward, ours_forward, same_topk, save_tiny_hf, synthetic_texts
from moecpt.model.transformer import build_model
from moecpt.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from moecpt.train.generate import sample
from moecpt.train.trainer import Trainer

transformers.utils.logging.disable_progress_bar()

TOL = 1e-5
VARIANTS = {
    "granite-sharded": ("granitemoe", {}),
    "granite-top3-unit-multipliers": ("granitemoe", dict(num_experts_per_tok=3, embedding_multiplier=1.0,
                                                         residual_multiplier=1.0, logits_scaling=1.0,
                                                         attention_multiplier=0.25)),
    "granite-bf16": ("granitemoe", dict(dtype="bfloat16")),
    "granite-shared-tied": ("granitemoeshared", {}),
}
SHARDED = {"granite-sharded": "40KB"}


def _ids(seed: int = 1, n: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("granite")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, root):
    name = request.param
    family, overrides = VARIANTS[name][0], dict(VARIANTS[name][1])
    dtype = overrides.pop("dtype", None)
    folder = root / f"{name}-hf"
    hf = save_tiny_hf(family, folder, seed=len(name), max_shard_size=SHARDED.get(name), **overrides)
    if dtype:
        hf = hf.to(getattr(torch, dtype))
        hf.save_pretrained(str(folder))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ckpt = root / f"{name}-ckpt"
    import_hf(folder, ckpt)
    return name, family, hf, folder, ckpt


def test_import_max_logit_difference_same_experts_and_greedy_text(variant):
    name, family, hf, folder, ckpt = variant
    if name in SHARDED:
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*"))) > 2
    ids = _ids()
    hf_model = hf.float() if name.endswith("bf16") else hf
    hf_logits, hf_topk = hf_forward(hf_model, ids)
    ours = load_model(ckpt)
    logits, topk = ours_forward(ours, ids)
    diff = (hf_logits - logits).abs().max().item()
    print(f"\n{family} {name}: max |logit difference| = {diff:.2e}")
    assert diff <= TOL and same_topk(hf_topk, topk)
    cfg = ModelConfig.model_validate(load_checkpoint(ckpt).meta["model_config"])
    c = hf.config
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier, cfg.logits_scaling) == (
        c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier, c.logits_scaling)
    prompt = _ids(2, 6)[:1]
    with torch.no_grad():
        want = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 6:]
    got = sample(ours, prompt[0].tolist(), max_new_tokens=20, temperature=0.0)
    assert got == want.tolist()


def test_export_loads_in_transformers_and_reimports(variant, root):
    name, family, _, _, ckpt = variant
    out = root / f"{name}-export"
    summary = export_hf(ckpt, out, max_shard_size="40KB")
    assert summary["family"] == family and len(summary["shards"]) > 1
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    ids = _ids(3)
    hf_logits, hf_topk = hf_forward(hf.float().eval(), ids)
    logits, topk = ours_forward(load_model(ckpt), ids)
    assert (hf_logits - logits).abs().max().item() <= TOL and same_topk(hf_topk, topk)
    again = root / f"{name}-reimported"
    import_hf(out, again)
    a, b = load_checkpoint(ckpt), load_checkpoint(again)
    assert a.meta["model_config"] == b.meta["model_config"]
    sa, sb = a.model_state(), b.model_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


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
    ids = _ids(4)
    assert (hf_forward(hf, ids)[0] - ours_forward(load_model(root / "v5-ckpt"), ids)[0]).abs().max().item() <= TOL


def test_cpt_then_export(root):
    save_tiny_hf("granitemoe", root / "cpt-hf", seed=5)
    ckpt = root / "cpt-ckpt"
    import_hf(root / "cpt-hf", ckpt)
    new = root / "new.jsonl"
    new.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_texts(11, 200, alphabet="aeiofhjvwx")))
    prepare({"new": str(new)}, root / "data", tokenizer=str(ckpt / "tokenizer.json"), val_fraction=0.1,
            min_val_tokens=512, progress=False)
    recipe = recipe_from_dict({"name": "granite-cpt", "data": {"path": str(root / "data"), "mixture": {"new": 1.0},
                               "seq_len": 32}, "optim": {"lr": 3e-3, "min_lr": 3e-4},
                               "train": {"steps": 6, "batch_size": 4, "eval_every": 6, "eval_batches": 1,
                                         "checkpoint_every": 6, "device": "cpu", "seed": 0}})
    summary = Trainer(recipe, root / "run", parent=ckpt, show_progress=False).run()
    assert summary["steps"] == 6, summary
    out = root / "cpt-export"
    assert export_hf(root / "run", out)["family"] == "granitemoe"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = _ids(8)
    assert (hf_forward(hf, ids)[0] - ours_forward(load_model(root / "run"), ids)[0]).abs().max().item() <= TOL


def _native(root: Path, name: str, **model) -> Path:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_width=64,
                      ffn_kind="swiglu", max_seq_len=64, moe={"num_experts": 8, "top_k": 2, "granularity": 2,
                                                              "router": {"renormalize": True}}, **model)
    torch.manual_seed(0)
    path = root / f"native-{name}"
    save_checkpoint(path, model_state=build_model(cfg).state_dict(),
                    meta={"step": 1, "tokens": 0, "model_config": cfg.model_dump(mode="json")})
    return path


def test_a_moecpt_model_with_multipliers_exports_to_granite_only(root):
    ckpt = _native(root, "mup", embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0)
    out = root / "native-mup-hf"
    assert export_hf(ckpt, out)["family"] == "granitemoe"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = _ids(6)
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
