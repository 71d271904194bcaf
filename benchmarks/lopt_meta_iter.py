"""Learned-optimizer benchmark: wall time of one PES meta-iteration and of one outer step.

Prints one JSON object:

* ``meta_iteration_s``: seconds per meta-iteration (8 antithetic pairs = 16 particles x K = 8 workers x H = 4
  local steps x 50 rounds, plus 50 learned outer steps per particle) on ``digits-mlp32``, for LAgg-A and LOpt-A;
* ``outer_step_ms``: one :class:`~moecpt.lopt.LearnedOuterOptimizer` step (B = 1) on a 1M-parameter model
  (``[1024, 1024]`` weight + bias), the cost a distributed runtime pays per communication round.

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
    print(json.dumps(out))


if __name__ == "__main__":
    main()
