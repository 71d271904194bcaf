"""Helpers shared by the interop tests that compare moecpt with transformers (the forwards themselves are in
:mod:`moecpt.interop.testing`): the tiny-model fixture body (save, optionally re-save in bf16, import) and the
import comparison (logits, experts, greedy tokens) and the export -> reload -> re-import check."""

from __future__ import annotations

from pathlib import Path

import torch

from moecpt.interop.hf_export import export_hf
from moecpt.interop.hf_import import import_hf
from moecpt.interop.testing import VOCAB, hf_forward, ours_forward, same_topk, save_tiny_hf
from moecpt.train.checkpoint import load_checkpoint, load_model
from moecpt.train.generate import sample

TOL = 1e-5


def ids_of(seed: int = 1, n: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def tiny_imported(root: Path, name: str, family: str, overrides: dict, shard: str | None):
    """Save a tiny transformers model of ``family`` (``overrides``; ``dtype`` re-saves it in that dtype: router
    weight and bias stay fp32, as transformers keeps them), import it; ``(name, family, hf, folder, ckpt)``."""
    import transformers

    overrides = dict(overrides)
    dtype = overrides.pop("dtype", None)
    folder = root / f"{name}-hf"
    hf = save_tiny_hf(family, folder, seed=len(name), max_shard_size=shard, **overrides)
    if dtype:
        hf = hf.to(getattr(torch, dtype))
        hf.save_pretrained(str(folder))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ckpt = root / f"{name}-ckpt"
    import_hf(folder, ckpt)
    return name, family, hf, folder, ckpt


def check_export_reload_reimport(root: Path, name: str, family: str, ckpt: Path, shard_size: str = "50KB") -> None:
    """Export ``ckpt`` in shards, reload it with ``AutoModelForCausalLM`` (no missing / unexpected / mismatched
    keys), compare logits and experts, re-import the export: the same config and bit-identical tensors."""
    import transformers

    out = root / f"{name}-export"
    summary = export_hf(ckpt, out, max_shard_size=shard_size)
    assert summary["family"] == family and len(summary["shards"]) > 1
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    ids = ids_of(3)
    hf_logits, hf_topk = hf_forward(hf.float().eval(), ids)
    logits, topk = ours_forward(load_model(ckpt), ids)
    assert (hf_logits - logits).abs().max().item() <= TOL and same_topk(hf_topk, topk)
    again = root / f"{name}-reimported"
    import_hf(out, again)
    a, b = load_checkpoint(ckpt), load_checkpoint(again)
    assert a.meta["model_config"] == b.meta["model_config"]
    sa, sb = a.model_state(), b.model_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_import(variant: tuple, sharded: bool, min_shards: int = 3):
    """The imported ``variant`` (:func:`tiny_imported`) against transformers: the index and more than
    ``min_shards`` shards when ``sharded``; fp32 logits within :data:`TOL` (bf16 weights computed in fp32; the
    figure is printed: ``pytest -s -k max_logit``) and the same experts at every MoE layer. Returns
    ``(hf_model, model)`` for further checks."""
    name, family, hf, folder, ckpt = variant
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*"))) > min_shards
    hf_model = hf.float() if "bf16" in name else hf
    model = load_model(ckpt)
    ids = ids_of()
    hf_logits, hf_topk = hf_forward(hf_model, ids)
    logits, topk = ours_forward(model, ids)
    diff = (hf_logits - logits).abs().max().item()
    print(f"\n{family} {name}: max |logit difference| = {diff:.2e}")
    assert diff <= TOL
    assert same_topk(hf_topk, topk)
    return hf_model, model


def check_greedy(hf_model, model, n: int) -> None:
    """The same ``n`` greedy tokens after a 6-token prompt as transformers' (cached) ``generate``."""
    prompt = ids_of(2, 6)[:1]
    with torch.no_grad():
        want = hf_model.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n)[0, 6:]
    assert sample(model, prompt[0].tolist(), max_new_tokens=n, temperature=0.0) == want.tolist()
