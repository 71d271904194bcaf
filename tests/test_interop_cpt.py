"""CPT of an imported Hugging Face model: data prepared with the checkpoint's tokenizer.json has the sha256 the
checkpoint records, ``moecpt cpt --from`` (the Trainer with ``parent=``) runs on it, keeps the family's router
semantics, logs routing diagnostics and lowers the loss on the new data; ``moecpt eval`` / ``compare`` read the
imported checkpoint, and the result exports back to its family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moecpt.analysis.evaluate import evaluate_checkpoint
from moecpt.cli import main
from moecpt.config import recipe_from_dict
from moecpt.data.prepared import PreparedData
from moecpt.data.shards import prepare
from moecpt.errors import MoecptError
from moecpt.interop.hf_export import export_hf
from moecpt.interop.hf_import import import_hf
from moecpt.interop.testing import save_tiny_hf, synthetic_texts
from moecpt.train.checkpoint import load_checkpoint, load_model
from moecpt.train.trainer import Trainer

transformers.utils.logging.disable_progress_bar()


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _recipe(data: Path, steps: int = 16):
    return recipe_from_dict({
        "name": "cpt-imported",  # no [model] table: the architecture comes from the parent
        "data": {"path": str(data), "mixture": {"new": 1.0}, "seq_len": 32},
        "optim": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"kind": "cosine", "warmup_fraction": 0.1},
        "train": {"steps": steps, "batch_size": 8, "eval_every": steps, "eval_batches": 2,
                  "checkpoint_every": steps, "device": "cpu", "seed": 0},
    })


@pytest.fixture(scope="module")
def cpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop-cpt")
    save_tiny_hf("qwen2_moe", root / "hf", seed=3)  # renormalised gates, sigmoid-gated shared expert, dense layer 0
    ckpt = root / "ckpt"
    import_hf(root / "hf", ckpt)
    new = _jsonl(root / "new.jsonl", synthetic_texts(11, 240, alphabet="aeiofhjvwxyz"))
    prepare({"new": str(new)}, root / "data", tokenizer=str(ckpt / "tokenizer.json"), val_fraction=0.1,
            min_val_tokens=1024, progress=False)
    Trainer(_recipe(root / "data"), root / "run", parent=ckpt, show_progress=False).run()
    return root


def test_prepared_data_matches_the_imported_tokenizer(cpt):
    data = PreparedData.open(cpt / "data")
    assert data.tokenizer_sha256 == load_checkpoint(cpt / "ckpt").meta["tokenizer_sha256"]
    assert (cpt / "data" / "tokenizer.json").read_bytes() == (cpt / "ckpt" / "tokenizer.json").read_bytes()


def test_cpt_lowers_the_loss_and_keeps_the_family_semantics(cpt):
    before, _ = evaluate_checkpoint(cpt / "ckpt", str(cpt / "data"), batch_size=8, max_batches=4)
    after, _ = evaluate_checkpoint(cpt / "run", str(cpt / "data"), batch_size=8, max_batches=4)
    assert after["sources"]["new"]["loss"] < before["sources"]["new"]["loss"] - 0.5
    assert "mri_mean" in after["sources"]["new"]  # routing diagnostics of the imported router
    parent, child = load_checkpoint(cpt / "ckpt"), load_checkpoint(cpt / "run")
    assert child.meta["model_config"] == parent.meta["model_config"]  # renormalize, shared gate, qkv bias kept
    assert child.meta["lineage"]["parent_checkpoint"] == str((cpt / "ckpt").resolve())
    records = [json.loads(x) for x in (cpt / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") != "val" and "event" not in r and "step" in r]
    assert train and {"lb_loss_mean", "mri_mean", "routing_entropy_mean"} <= set(train[-1])


def test_eval_and_compare_commands_read_the_imported_checkpoint(cpt, capsys):
    data = str(cpt / "data")
    assert main(["eval", "--checkpoint", str(cpt / "ckpt"), "--data", data, "--batches", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 0
    assert main(["compare", str(cpt / "ckpt"), str(cpt / "run"), "--data", data, "--batches", "2", "--json"]) == 0
    assert "new" in json.loads(capsys.readouterr().out)["sources"]


def test_cpt_result_exports_back_to_its_family(cpt):
    out = cpt / "run-hf"
    assert export_hf(cpt / "run", out)["family"] == "qwen2_moe"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    # the original tokenizer files and token ids come back through the CPT lineage
    assert (out / "tokenizer_config.json").read_bytes() == (cpt / "hf" / "tokenizer_config.json").read_bytes()
    assert hf.config.eos_token_id == 0
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - load_model(cpt / "run")(ids)).abs().max().item()
    assert diff <= 1e-4


def test_cpt_refuses_data_of_another_tokenizer(cpt):
    other = cpt / "other-data"
    prepare({"new": str(cpt / "new.jsonl")}, other, tokenizer="train:300", val_fraction=0.1, min_val_tokens=1024,
            progress=False)
    with pytest.raises(MoecptError, match="tokenizer"):
        Trainer(_recipe(other), cpt / "run-other", parent=cpt / "ckpt", show_progress=False)
