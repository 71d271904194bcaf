"""Hugging Face interop: for each family (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE) a tiny random model built offline
from transformers' own config class imports to the same logits and top-k experts (import, forward), exports to a
folder transformers loads without missing / unexpected weights and with the same logits (export), and that
folder imports again to the same model (reload). Models made by moecpt export to the closest exact family; what
has no equivalent, and bad Hugging Face folders, fail with one line and write nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moecpt
from moecpt.cli import main
from moecpt.config import ModelConfig, model_preset
from moecpt.data.tokenizer import sha256_bytes
from moecpt.errors import MoecptError
from moecpt.interop.hf_export import export_hf, parse_size
from moecpt.interop.hf_import import import_hf
from moecpt.interop.testing import VOCAB, save_tiny_hf, tiny_tokenizer
from moecpt.model.transformer import build_model
from moecpt.train.checkpoint import load_checkpoint, load_model, save_checkpoint

transformers.utils.logging.disable_progress_bar()

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"]
TOL = 1e-4
#: families saved in many small shards (the others as one model.safetensors)
SHARDED = {"mixtral": "40KB", "qwen2_moe": "60KB"}


def _ids(seed: int = 1, B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_forward(model, ids):
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    k = model.config.num_experts_per_tok
    return out.logits, [torch.topk(r.float(), k, dim=-1).indices for r in out.router_logits]


def _ours_forward(model, ids):
    with torch.no_grad():
        logits, routing = model(ids, return_routing=True)
    return logits, [r.topk_idx_TK for r in routing]


def _same_topk(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.sort(-1).values, y.sort(-1).values) for x, y in zip(a, b))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_hf_quietly(folder: Path):
    """``from_pretrained`` with its loading report and every transformers warning captured."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, handler.messages


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, root):
    """(name, transformers model, HF folder, imported checkpoint)."""
    name = request.param
    folder = root / f"{name}-hf"
    hf = save_tiny_hf(name, folder, seed=FAMILIES.index(name), max_shard_size=SHARDED.get(name))
    ckpt = root / f"{name}-ckpt"
    import_hf(folder, ckpt)
    return name, hf, folder, ckpt


@pytest.fixture(scope="module")
def exported(family, root):
    name, _, _, ckpt = family
    out = root / f"{name}-export"
    summary = export_hf(ckpt, out)
    return summary, out


# ------------------------------------------------------------------------------------------ equivalence
def test_import_max_logit_difference_and_same_experts(family):
    name, hf, folder, ckpt = family
    if name in SHARDED:
        assert len(list(folder.glob("model-*-of-*.safetensors"))) > 3  # streamed shard by shard
    model = load_model(ckpt)
    ids = _ids()
    hf_logits, hf_topk = _hf_forward(hf, ids)
    logits, topk = _ours_forward(model, ids)
    diff = (hf_logits - logits).abs().max().item()
    print(f"\n{name}: max |logit difference| = {diff:.2e}")  # docs/interop.md quotes it (pytest -s -k max_logit)
    assert diff <= TOL
    assert len(topk) == sum(model.cfg.is_moe_layer(i) for i in range(model.cfg.n_layers)) >= 1
    assert _same_topk(hf_topk, topk)  # the same experts at every MoE layer

    ck = load_checkpoint(ckpt)
    assert ck.step == 0 and ck.meta["tokens"] == 0
    assert ck.meta["imported_from"]["family"] == name
    assert ck.meta["imported_from"]["path"] == str(folder.resolve())
    assert ck.meta["tokenizer_sha256"] == sha256_bytes((ckpt / "tokenizer.json").read_bytes())
    cfg = ModelConfig.model_validate(ck.meta["model_config"])
    assert cfg.moe.router.renormalize == (name != "olmoe")  # tiny Qwen configs set norm_topk_prob; Mixtral always
    assert cfg.moe.shared_expert_gate == (name == "qwen2_moe")
    assert cfg.qk_norm.value == {"olmoe": "full", "qwen3_moe": "head"}.get(name, "none")
    assert cfg.attn_bias == (name == "qwen2_moe")


def test_load_model_accepts_a_hugging_face_folder(family):
    name, hf, folder, _ = family
    model = moecpt.load_model(folder)
    ids = _ids(2)
    hf_logits, hf_topk = _hf_forward(hf, ids)
    logits, topk = _ours_forward(model, ids)
    assert (hf_logits - logits).abs().max().item() <= TOL
    assert _same_topk(hf_topk, topk)
    assert model.imported_from["family"] == name
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_export_loads_in_transformers_with_same_logits(family, exported):
    name, _, _, ckpt = family
    summary, out = exported
    assert summary["family"] == name  # an imported model goes back to its own family
    hf, info, warnings = _load_hf_quietly(out)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"] or info["error_msgs"])
    bad = [m for m in warnings if any(w in m.lower() for w in ("missing", "unexpected", "initialized", "mismatch"))]
    assert not bad, bad
    ids = _ids(3)
    hf_logits, hf_topk = _hf_forward(hf, ids)
    logits, topk = _ours_forward(load_model(ckpt), ids)
    assert (hf_logits - logits).abs().max().item() <= TOL
    assert _same_topk(hf_topk, topk)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "bada kilo mesu."
    assert tok(text).input_ids == tiny_tokenizer().encode(text).ids


def test_reload_of_export_is_the_same_model(family, exported, root):
    name, _, _, ckpt = family
    _, out = exported
    again = root / f"{name}-reimported"
    import_hf(out, again)
    a, b = load_checkpoint(ckpt), load_checkpoint(again)
    assert a.meta["model_config"] == b.meta["model_config"]
    assert a.meta["tokenizer_sha256"] == b.meta["tokenizer_sha256"]
    sa, sb = a.model_state(), b.model_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------- other layouts
def test_fused_expert_tensors_of_transformers_5_import(root):
    """A checkpoint written with transformers >= 5's in-memory names (stacked ``experts.gate_up_proj``)."""
    from safetensors.torch import save_file

    hf = save_tiny_hf("olmoe", root / "fused-src", seed=7)
    folder = root / "fused"
    folder.mkdir()
    shutil.copy(root / "fused-src" / "config.json", folder / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model = moecpt.load_model(folder)
    ids = _ids(4)
    hf_logits, hf_topk = _hf_forward(hf, ids)
    logits, topk = _ours_forward(model, ids)
    assert (hf_logits - logits).abs().max().item() <= TOL and _same_topk(hf_topk, topk)


def test_sliding_window_and_tied_embeddings(root):
    folder = root / "mixtral-window"
    hf = save_tiny_hf("mixtral", folder, seed=8, sliding_window=32, tie_word_embeddings=True)
    ckpt = root / "mixtral-window-ckpt"
    import_hf(folder, ckpt)
    model = load_model(ckpt)  # the window is kept, the length is the family's (tests/test_interop_gptoss.py)
    assert (model.cfg.max_seq_len, model.cfg.sliding_window) == (hf.config.max_position_embeddings, 32)
    assert model.cfg.tie_embeddings
    ids = _ids(5, T=40)
    assert (_hf_forward(hf, ids)[0] - _ours_forward(model, ids)[0]).abs().max().item() <= TOL
    hf2, info, _ = _load_hf_quietly(Path(export_hf(ckpt, root / "mixtral-window-export")["out"]))
    assert not (info["missing_keys"] or info["unexpected_keys"])
    assert (_hf_forward(hf2, ids)[0] - _ours_forward(model, ids)[0]).abs().max().item() <= TOL


# ------------------------------------------------------------------------------- models made by moecpt
def _native(root: Path, name: str, cfg: ModelConfig, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial norms and router, as after training
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            elif "router" in n:
                p.normal_(0, 0.5)
    path = root / f"native-{name}"
    save_checkpoint(path, model_state=model.state_dict(),
                    meta={"step": 5, "tokens": 0, "model_config": cfg.model_dump(mode="json")})
    return path


def _swiglu(**kw) -> ModelConfig:
    moe = {"num_experts": 8, "top_k": 2, "granularity": 2}
    moe.update(kw.pop("moe", {}))
    return ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_width=64,
                       ffn_kind="swiglu", max_seq_len=64, moe=moe, **kw)


NATIVE = {
    # the paper's granular MoE (GEGLU, 31 routed + 1 shared without gate, top-3): Qwen2-MoE, gate synthesised
    "granular": (lambda: model_preset("smoke-granular", vocab_size=VOCAB), "qwen2_moe"),
    # Switch top-1, no shared expert: Qwen2-MoE with a null shared expert
    "switch": (lambda: model_preset("smoke-switch", vocab_size=VOCAB, tie_embeddings=True), "qwen2_moe"),
    "olmoe-like": (lambda: _swiglu(qk_norm="full"), "olmoe"),
    "qwen3-like": (lambda: _swiglu(qk_norm="head", head_dim=24, moe={"router": {"renormalize": True},
                                                                     "layout": "after_dense", "first_dense": 1}),
                   "qwen3_moe"),
    "mixtral-like": (lambda: _swiglu(moe={"router": {"renormalize": True, "kind": "sinkhorn"}}), "mixtral"),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_moecpt_models_export_to_the_closest_family(name, root):
    make, expected = NATIVE[name]
    cfg = make()
    ckpt = _native(root, name, cfg)
    out = root / f"native-{name}-hf"
    summary = export_hf(ckpt, out)
    assert summary["family"] == expected
    hf, info, _ = _load_hf_quietly(out)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    ids = _ids(6)
    hf_logits, hf_topk = _hf_forward(hf, ids)
    logits, topk = _ours_forward(load_model(ckpt), ids)
    assert (hf_logits - logits).abs().max().item() <= TOL
    assert _same_topk(hf_topk, topk)
    if cfg.ffn_kind.value == "geglu":
        assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"


@pytest.mark.parametrize("update, family, words", [
    ({"moe": {"capacity_factor": 1.25}}, "auto", "capacity"),
    ({"rotary_fraction": 0.5}, "auto", "partial rope"),
    ({"moe": {"router": {"kind": "bias"}}}, "auto", "bias"),
    ({"moe": {"top_k": 1, "router": {"kind": "sinkhorn"}}}, "auto", "sigmoid"),
    ({"moe": None}, "auto", "dense"),
    ({}, "mixtral", "renormalises"),
    ({"qk_norm": "full"}, "qwen2_moe", "q/k norm"),
])
def test_export_refuses_what_no_family_has(update, family, words, root):
    raw = _swiglu().model_dump(mode="json")
    for key, value in update.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and raw.get(key) else value
    cfg = ModelConfig.model_validate(raw)
    ckpt = _native(root, f"refuse-{words.replace(' ', '-').replace('/', '')}-{family}", cfg)
    out = root / "refused"
    with pytest.raises(MoecptError) as exc:
        export_hf(ckpt, out, family=family)
    assert words in str(exc.value).lower() and "\n" not in str(exc.value)
    assert not out.exists() and not list(root.glob("refused.tmp-*"))


@pytest.mark.parametrize("family", ["qwen3_moe"], indirect=True)
def test_export_shards_and_dtype(family, root):
    _, _, _, ckpt = family
    out = root / "qwen3-sharded-bf16"
    summary = export_hf(ckpt, out, dtype="bf16", max_shard_size="50KB")
    assert len(summary["shards"]) > 3 and (out / "model.safetensors.index.json").is_file()
    hf, info, _ = _load_hf_quietly(out)
    assert not (info["missing_keys"] or info["unexpected_keys"])
    assert next(hf.parameters()).dtype == torch.bfloat16
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KiB") == 102400


# -------------------------------------------------------------------------------------------- bad input
def _fresh(root: Path, name: str, family: str = "olmoe", **kw) -> Path:
    folder = root / name
    save_tiny_hf(family, folder, **kw)
    return folder


def _fails(folder: Path, root: Path, words: str, capsys, *extra: str) -> None:
    out = root / f"bad-{folder.name}"
    before = sorted(os.listdir(root))
    capsys.readouterr()
    assert main(["import-hf", str(folder), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moecpt: error:") and err.strip().count("\n") == 0, err
    assert words in err, err
    assert not out.exists() and sorted(os.listdir(root)) == before  # nothing written, no temp folder left


def test_unsupported_family_names_the_supported_ones(root, capsys):
    folder = _fresh(root, "llama-like")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    _fails(folder, root, "supported families: olmoe", capsys)


def test_missing_shard(root, capsys):
    folder = _fresh(root, "missing-shard", max_shard_size="40KB")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[2]
    shard.unlink()
    _fails(folder, root, "missing", capsys)


def test_truncated_shard(root, capsys):
    folder = _fresh(root, "truncated-shard", max_shard_size="40KB")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(folder, root, "unreadable", capsys)


@pytest.mark.parametrize("key, value, words", [
    ("intermediate_size", 48, "shape"),
    ("num_experts", 6, "not described by config.json"),
    ("num_hidden_layers", 3, "missing"),
    ("hidden_act", "relu", "hidden_act"),
    ("clip_qkv", 8.0, "clip_qkv"),
])
def test_config_that_does_not_match_the_weights(key, value, words, root, capsys):
    folder = _fresh(root, f"mismatch-{key}")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
    _fails(folder, root, words, capsys)


@pytest.mark.parametrize("key, value, words", [
    ("num_experts_per_tok", 2.5, "num_experts_per_tok = 2.5 must be a whole number"),  # int() would make it top-2
    ("num_experts", "eight", "num_experts = 'eight' must be a whole number"),
    ("rms_norm_eps", [1e-6], "rms_norm_eps = [1e-06] must be a finite number"),
    ("norm_topk_prob", "yes", "norm_topk_prob = 'yes' must be true or false"),
    ("rope_scaling", {"rope_type": "yarn", "factor": "4"}, "rope_scaling.factor = '4' must be a finite number"),
    ("hidden_size", None, "while reading 'hidden_size'"),  # null passes the type check; the family names the key
])
def test_wrong_typed_config_value_is_named(key, value, words, root, capsys):
    folder = _fresh(root, f"typed-{key}")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
    _fails(folder, root, words, capsys)


def test_missing_tokenizer(root, capsys):
    folder = _fresh(root, "no-tokenizer", tokenizer=False)
    _fails(folder, root, "--allow-missing-tokenizer", capsys)
    out = root / "no-tokenizer-ckpt"
    assert main(["import-hf", str(folder), "--out", str(out), "--allow-missing-tokenizer"]) == 0
    assert load_checkpoint(out).meta["tokenizer_sha256"] is None and not (out / "tokenizer.json").exists()


@pytest.mark.parametrize("family", ["olmoe"], indirect=True)
def test_existing_output_is_never_overwritten(family, root, capsys):
    _, _, folder, ckpt = family
    before = (ckpt / "meta.json").read_bytes()
    assert main(["import-hf", str(folder), "--out", str(ckpt)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (ckpt / "meta.json").read_bytes() == before
    assert main(["export-hf", str(ckpt), "--out", str(ckpt)]) == 2
    assert "is the input" in capsys.readouterr().err  # the checkpoint is what export-hf reads
    assert main(["export-hf", str(ckpt), "--out", str(folder)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (ckpt / "meta.json").read_bytes() == before


def test_config_missing_a_required_key(root, capsys):
    folder = _fresh(root, "no-hidden-size")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    _fails(folder, root, "hidden_size", capsys)


def test_the_models_own_eos_ends_cpt_documents_when_moecpt_does_not_know_it(tmp_path):
    """A tokenizer whose EOS is outside moecpt's usual end tokens (here ``<|return|>``, GPT-OSS's): import, data
    prepare and export all use the model's ``eos_token_id``; nothing is added to the tokenizer."""
    from moecpt.data.prepared import PreparedData
    from moecpt.data.shards import prepare
    from moecpt.interop.testing import save_tokenizer, synthetic_texts

    folder = tmp_path / "hf"
    save_tiny_hf("mixtral", folder, seed=1, tokenizer=False, eos_token_id=VOCAB - 1)
    tok = tiny_tokenizer(VOCAB - 1)
    tok.add_special_tokens(["<|return|>"])
    assert tok.token_to_id("<|return|>") == VOCAB - 1 and tok.token_to_id("<|endoftext|>") == 0
    save_tokenizer(tok, folder)
    import_hf(folder, tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["imported_from"]["eod_id"] == VOCAB - 1
    docs = tmp_path / "new.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_texts(3, 60)))
    prepare({"new": str(docs)}, tmp_path / "data", tokenizer=str(tmp_path / "ckpt" / "tokenizer.json"),
            val_fraction=0.1, min_val_tokens=64, progress=False)
    data = PreparedData.open(tmp_path / "data")
    assert data.eod_id == VOCAB - 1 and data.tokenizer_sha256 == ckpt.meta["tokenizer_sha256"]
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == VOCAB - 1


def test_the_usual_end_token_is_kept_when_the_model_declares_it_too():
    from moecpt.data.tokenizer import ensure_eod

    tok = tiny_tokenizer(VOCAB - 1)
    tok.add_special_tokens(["<|return|>"])
    ret = VOCAB - 1
    assert ensure_eod(tok, [ret, 0]) == 0  # GPT-OSS declares <|return|> and <|endoftext|>: the document end is kept
    assert ensure_eod(tok, [ret]) == ret and ensure_eod(tok, ret) == ret
    assert ensure_eod(tok) == 0 and ensure_eod(tok, [10_000]) == 0  # nothing (usable) declared: as before
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB  # nothing added


@pytest.mark.parametrize("family, extra", [("qwen3_moe", {}), ("mixtral", {"head_dim": 16}), ("glm4_moe", {}),
                                           ("ernie4_5_moe", {})])
def test_yarn_rope_scaling_imports_and_exports_in_every_family(family, extra, tmp_path):
    """YaRN (Peng et al. 2024) as transformers applies it to any family (e.g. Qwen3's long-context recipe):
    positions past ``original_max_position_embeddings`` give the same logits as transformers, before and after
    export; export writes ``rope_scaling``."""
    from moecpt.interop.testing import hf_forward, ours_forward

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    hf = save_tiny_hf(family, tmp_path / "hf", seed=4, rope_parameters=dict(rope), **extra)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = load_model(tmp_path / "ckpt")
    assert ours.cfg.rope_yarn is not None and ours.cfg.rope_yarn.factor == 4.0
    ids = _ids(5, T=48)
    logits = ours_forward(ours, ids)[0]
    assert (hf_forward(hf, ids)[0] - logits).abs().max().item() <= 1e-5
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_scaling"]["rope_type"] == "yarn" and written["rope_scaling"]["factor"] == 4.0
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert (hf_forward(again, ids)[0] - logits).abs().max().item() <= 1e-5
