"""Checkpoint memory under FSDP2: each rank's peak resident memory, single-file (rank 0 gathers) vs DCP (sharded).

Launches ``moecpt pretrain`` twice on ``--world`` gloo processes of this machine (as torchrun would), once per
``train.checkpoint_format``, a few steps of a switch MoE of the given width and depth on the bundled demo data, one
checkpoint at the end; each rank runs under ``/usr/bin/time -f %M`` (peak RSS). With ``single`` rank 0 holds the
gathered full model and optimizer state on top of its shard; with ``dcp`` every rank writes only its own shard, so
the ranks' peaks stay equal.

Run: ``.venv/bin/python benchmarks/checkpoint_memory.py [--world 2] [--d-model 512] [--layers 4] [--out DIR]``;
prints one JSON object (one entry per format).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from moecpt.argtypes import positive_int

RECIPE = """name = "checkpoint-memory"
[model]
preset = "smoke-switch"
d_model = {d}
n_layers = {layers}
n_heads = 8
ffn_width = {ffn}
[data]
path = "demo"
mixture = {{ english = 1.0 }}
seq_len = 32
eval_sources = ["english"]
[train]
steps = {steps}
batch_size = {batch}
checkpoint_every = {steps}
eval_every = 1000
eval_batches = 1
device = "cpu"
[distributed]
sync = "fsdp"
"""


def run(fmt: str, recipe: Path, out: Path, world: int) -> dict:
    store = out.parent / f"store-{uuid.uuid4().hex[:8]}"
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MOECPT_INIT_METHOD": f"file://{store}", "OMP_NUM_THREADS": "1"}
        cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "moecpt", "pretrain", "--recipe", str(recipe),
               "--out", str(out), "--no-progress", "--set", f"train.checkpoint_format={fmt}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, results):
        if p.returncode:
            raise SystemExit(f"{fmt}: a rank failed:\n{err[-2000:]}")
    size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    return {"world": world, "peak_rss_mib_per_rank": [int(e.split()[-1]) // 1024 for _, e in results],
            "checkpoint_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=positive_int, default=2)
    ap.add_argument("--d-model", type=positive_int, default=512)
    ap.add_argument("--layers", type=positive_int, default=4)
    ap.add_argument("--steps", type=positive_int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="folder for the two runs (default: a temp folder)")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="moecpt-ckpt-mem-"))
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.toml"
    recipe.write_text(RECIPE.format(d=a.d_model, layers=a.layers, ffn=a.d_model * 11 // 4, steps=a.steps,
                                    batch=4 * a.world))
    print(json.dumps({fmt: run(fmt, recipe, out / fmt, a.world) for fmt in ("single", "dcp")}))


if __name__ == "__main__":
    main()
