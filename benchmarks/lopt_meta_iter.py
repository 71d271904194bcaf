"""Learned-optimizer benchmark: wall time of one PES meta-iteration and of one outer step.

Prints one JSON object:

* ``meta_iteration_s``: seconds per meta-iteration (8 antithetic pairs = 16 particles x K = 8 workers x H = 4
  local steps x 50 rounds, plus 50 learned outer steps per particle) on ``digits-mlp32``, for LAgg-A and LOpt-A;
* ``outer_step_ms``: one :class:`~moecpt.lopt.LearnedOuterOptimizer` step (B = 1) on a 1M-parameter model
  (``[1024, 1024]`` weight + bias), the cost a distributed runtime pays per communication round;
* ``outer_step_memory``: the peak memory one LAgg-A (K = 8) step adds on a 4M-element ``[2048, 2048]`` tensor,
  features built a block of rows at a time (moecpt's path) against all at once (the peer, the same step with
  blocking turned off), each in a fresh process: peak RSS during the second step minus the RSS before it, with
  glibc returning large frees to the system (``MALLOC_MMAP_THRESHOLD_``) so that RSS follows the live tensors.
  The step necessarily holds the new accumulators beside the old ones (``state_MB``); the rest is transient,
  compared with one block's features (``block_features_MB``).

Usage: ``python benchmarks/lopt_meta_iter.py [--iterations 2] [--threads 1]`` (run it with ``nice`` on a shared
machine). The full learned-vs-baselines comparison is ``moecpt lopt bench``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from moecpt.lopt.mlp import LOptSpec, init_meta_params
    from moecpt.lopt.optimizers import LearnedOuterOptimizer
    from moecpt.lopt.pes import PESConfig, init_pes_state, pes_gradient
    from moecpt.lopt.tasks import get_task

    torch.set_num_threads(args.threads)
    task = get_task("digits-mlp32")
    out: dict = {"threads": args.threads, "task": task.name, "meta_iteration_s": {}, "outer_step_ms": {}}
    for kind in ("lagg-a", "lopt-a"):
        spec = LOptSpec(kind, 8)
        gen = torch.Generator().manual_seed(0)
        phi = init_meta_params(spec, gen)
        cfg = PESConfig()
        state = init_pes_state(task, spec, cfg, gen)
        pes_gradient(task, spec, phi, state, PESConfig(truncation=2), gen)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.iterations):
            pes_gradient(task, spec, phi, state, cfg, gen)
        out["meta_iteration_s"][kind] = round((time.perf_counter() - t0) / args.iterations, 3)

        opt = LearnedOuterOptimizer(spec, phi)
        params = [torch.randn(1024, 1024), torch.randn(1024)]
        k = (8,) if spec.aggregator else ()
        deltas = [torch.randn(*k, *p.shape) * 1e-3 for p in params]
        opt.step(params, deltas)
        t0 = time.perf_counter()
        for _ in range(3):
            opt.step(params, deltas)
        out["outer_step_ms"][kind] = round((time.perf_counter() - t0) / 3 * 1000, 1)
    out["outer_step_memory"] = {mode: _step_memory(mode) for mode in ("blocked", "all_at_once")}
    print(json.dumps(out))


_MEMORY_CHILD = """
import json, resource, sys, torch
from moecpt.lopt import optimizers
from moecpt.lopt.features import num_features
from moecpt.lopt.mlp import LOptSpec, init_meta_params
torch.set_num_threads(1)
if sys.argv[1] == "all_at_once":
    optimizers.MLP_CHUNK = 1 << 40
spec = LOptSpec("lagg-a", 8)
opt = optimizers.LearnedOuterOptimizer(spec, init_meta_params(spec, torch.Generator().manual_seed(0)))
params = [torch.randn(2048, 2048)]
deltas = [torch.randn(8, 2048, 2048) * 1e-3]
opt.step(params, deltas)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before = rss()
opt.step(params, deltas)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mb = 2 ** 20
print(json.dumps({"extra_peak_MB": round((peak - before) / mb, 1),
                  "state_MB": round(4 * 2048 * 2048 * 4 / mb, 1),
                  "block_features_MB": round(optimizers.MLP_CHUNK * num_features(8, True) * 4 / mb, 1)
                  if sys.argv[1] == "blocked" else None}))
"""


def _step_memory(mode: str) -> dict:
    import os
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, mode], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout)


if __name__ == "__main__":
    main()
