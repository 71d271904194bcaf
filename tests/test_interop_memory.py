"""Streaming import and load: importing a multi-shard Hugging Face checkpoint grows the process's peak resident memory by
at most the model's size plus its largest shard plus a little slack (measured in a fresh subprocess through
``VmHWM`` of ``/proc/self/status``, reset by ``/proc/self/clear_refs`` right before the import). Loading every
shard first, or holding the model twice, would exceed the bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moecpt.config import ModelConfig
from moecpt.interop.testing import write_synthetic_hf

MB = 2**20
SLACK = 48 * MB

_SCRIPT = r"""
import json, sys
import torch
from moecpt.interop.hf_import import import_hf, load_hf_model
from moecpt.interop.hf_export import export_hf

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

def measure(fn):
    import gc
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
    base = status()["VmRSS"]
    result = fn()
    return status()["VmHWM"] - base, result

folder, out = sys.argv[1], sys.argv[2]
# Load libraries before measuring: kernels, and torch._dynamo, which the first meta-device model build imports
# (about 75 MB of code, once per process, whatever the model's size).
from moecpt.config import model_preset
from moecpt.model.transformer import build_model
build_model(model_preset("smoke-switch", vocab_size=64), "meta")
torch.ones(8).sum()
grow_import, _ = measure(lambda: import_hf(folder, out, allow_missing_tokenizer=True))
grow_load, model = measure(lambda: load_hf_model(folder))
del model
grow_export, _ = measure(lambda: export_hf(out, out + "-hf", max_shard_size=sys.argv[3]))
from moecpt.train.checkpoint import load_model
grow_ckpt, model = measure(lambda: load_model(out))
print(json.dumps({"import": grow_import, "load_hf_model": grow_load, "export": grow_export, "load_model": grow_ckpt}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streaming_import_peak_memory(tmp_path):
    cfg = ModelConfig.model_validate({
        "vocab_size": 1024, "d_model": 256, "n_layers": 4, "n_heads": 4, "ffn_width": 512, "ffn_kind": "swiglu",
        "max_seq_len": 64, "qk_norm": "full", "moe": {"num_experts": 16, "top_k": 2, "expert_width": 512}})
    shard = 10 * MB
    sizes = write_synthetic_hf("olmoe", tmp_path / "hf", cfg, max_shard_bytes=shard)
    assert sizes["shards"] >= 8 and sizes["model_bytes"] > 100 * MB
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "hf"), str(tmp_path / "ckpt"), "10MB"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = sizes["model_bytes"] + sizes["max_shard_bytes"] + SLACK
    report = {k: round(v / MB, 1) for k, v in grew.items()} | {
        "model_MB": round(sizes["model_bytes"] / MB, 1), "shard_MB": round(sizes["max_shard_bytes"] / MB, 1)}
    print("peak memory growth (MB):", report)
    assert grew["import"] <= bound, report
    assert grew["load_hf_model"] <= bound, report
    # a moecpt checkpoint streams into the model tensor by tensor: the model once, not twice
    assert grew["load_model"] <= sizes["model_bytes"] + SLACK, report
    # export holds one output shard and one source tensor (a layer's stacked experts), never the model
    layer_experts = 16 * 256 * 1024 * 4
    assert grew["export"] <= shard + 2 * layer_experts + SLACK, report
