"""Peak-memory growth of Hugging Face import, loading and export, measured: the figures of docs/interop.md.

For each size a synthetic OLMoE-family folder is written with safetensors (random weights, shards of the given
size), then a fresh Python process, with torch and moecpt already imported, measures the growth of its peak resident
memory (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` right before each call) for

* ``import_hf(folder, ckpt)`` (streaming: the model plus at most one shard is the target),
* ``load_hf_model(folder)`` (the same, in memory),
* ``load_model(ckpt)`` (a moecpt checkpoint: the model once is the target),
* ``export_hf(ckpt, out, max_shard_size=shard)`` (one output shard plus one source tensor).

Prints one JSON object: per size, the model and shard bytes and each growth, in MB (2^20 bytes). Linux only.

    python benchmarks/interop_memory.py                 # 100 MB in 10 MB shards and 1.2 GB in 100 MB shards
    python benchmarks/interop_memory.py --sizes small   # only the first (a few seconds)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from moecpt.config import ModelConfig
from moecpt.interop.testing import write_synthetic_hf

MB = 2**20

#: name -> (moecpt config of the synthetic OLMoE model, shard size)
SIZES = {
    "small": ({"vocab_size": 1024, "d_model": 256, "n_layers": 4, "n_heads": 4, "ffn_width": 512,
               "ffn_kind": "swiglu", "max_seq_len": 64, "qk_norm": "full",
               "moe": {"num_experts": 16, "top_k": 2, "expert_width": 512}}, "10MB"),
    "large": ({"vocab_size": 8192, "d_model": 1024, "n_layers": 6, "n_heads": 8, "ffn_width": 1024,
               "ffn_kind": "swiglu", "max_seq_len": 64, "qk_norm": "full",
               "moe": {"num_experts": 16, "top_k": 2, "expert_width": 1024}}, "100MB"),
}

_MEASURE = r"""
import gc, json, sys
import torch
from moecpt.config import model_preset
from moecpt.interop.hf_export import export_hf
from moecpt.interop.hf_import import import_hf, load_hf_model
from moecpt.model.transformer import build_model
from moecpt.train.checkpoint import load_model

def status(key):
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k == key:
            return int(v.split()[0]) * 1024

def grow(fn):
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # the peak restarts from the current resident size
    base = status("VmRSS")
    kept = fn()
    out = status("VmHWM") - base
    del kept
    gc.collect()
    return out

folder, ckpt, shard = sys.argv[1:4]
build_model(model_preset("smoke-switch", vocab_size=64), "meta")  # library code loaded once, not counted
torch.ones(8).sum()
print(json.dumps({
    "import_hf": grow(lambda: import_hf(folder, ckpt, allow_missing_tokenizer=True)),
    "load_hf_model": grow(lambda: load_hf_model(folder)),
    "load_model": grow(lambda: load_model(ckpt)),
    "export_hf": grow(lambda: export_hf(ckpt, ckpt + "-hf", max_shard_size=shard)),
}))
"""


def measure(name: str, work: Path) -> dict:
    cfg, shard = SIZES[name]
    folder = work / f"{name}-hf"
    sizes = write_synthetic_hf("olmoe", folder, ModelConfig.model_validate(cfg),
                               max_shard_bytes=int(shard.removesuffix("MB")) * MB)
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), str(work / f"{name}-ckpt"), shard],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{name}: the measuring process failed:\n{proc.stderr[-3000:]}")
    grew = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"model_MB": round(sizes["model_bytes"] / MB, 1), "shards": sizes["shards"],
            "max_shard_MB": round(sizes["max_shard_bytes"] / MB, 1),
            **{f"{k}_MB": round(v / MB, 1) for k, v in grew.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,large", help=f"comma-separated, of: {', '.join(SIZES)}")
    names = [s for s in ap.parse_args().sizes.split(",") if s]
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    if not Path("/proc/self/clear_refs").exists():
        ap.error("needs Linux /proc (VmHWM and clear_refs)")
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps({name: measure(name, Path(tmp)) for name in names}, indent=1))


if __name__ == "__main__":
    main()
