"""The learned outer step under a decaying inner-LR schedule: the paper's fixed step against moecpt's delta-rms step.

Every method trains K = 8 workers for R rounds of H local SGD steps while the workers' LR follows a cosine from
its peak (the task's LR) to 1e-3 of it (``moecpt.lopt.bench.lr_factor``), the late phase of a decaying recipe.
Per round it records the RMS of the mean delta, the RMS of the global update and the train loss. Compared:

* ``local SGD``: θ ← θ + mean Δ (its step is the delta by definition);
* ``<kind> fixed``: the shipped LOpt-A / LAgg-A weights with the paper's step 0.001 · d · exp(0.001 m);
* ``<kind> as delta-rms``: the same MLP weights with the delta-rms step (not meta-trained for it: this isolates
  what the step form does);
* ``--delta-rms-weights PATH`` (optional): a weight file meta-trained with ``--step-scale delta-rms``.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/lopt_schedule.py --out /tmp/lopt_schedule [--delta-rms-weights F]

Writes ``schedule.json`` and ``schedule.png`` to ``--out`` and prints one line per method and task.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from moecpt.lopt import LearnedOuterOptimizer, LOptSpec, load_optimizer, load_pretrained  # noqa: E402
from moecpt.lopt.bench import run_method  # noqa: E402
from moecpt.lopt.tasks import get_task  # noqa: E402
from moecpt.storage.atomic import write_bytes_atomic, write_json_atomic  # noqa: E402


def _as_delta_rms(opt: LearnedOuterOptimizer) -> LearnedOuterOptimizer:
    s = opt.spec
    return LearnedOuterOptimizer(LOptSpec(s.kind, s.workers, s.hidden, "delta-rms"), opt.meta_params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/lopt_schedule")
    ap.add_argument("--tasks", default="digits-mlp128,code-lm")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--delta-rms-weights", default=None, help="a weight file meta-trained with delta-rms")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods: list[tuple[str, str, LearnedOuterOptimizer | None]] = [("local SGD", "local-sgd", None)]
    for kind in ("lopt-a", "lagg-a"):
        shipped = load_pretrained(kind)
        methods += [(f"{kind} fixed (shipped)", kind, shipped), (f"{kind} as delta-rms", kind, _as_delta_rms(shipped))]
    if args.delta_rms_weights:
        opt = load_optimizer(args.delta_rms_weights)
        methods.append((f"{opt.spec.kind} delta-rms (meta-trained)", opt.spec.kind, opt))
    results: dict = {"rounds": args.rounds, "H": args.local_steps, "K": 8, "seeds": args.seeds, "tasks": {}}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(14, 3.6 * len(tasks)), squeeze=False)
    for i, name in enumerate(tasks):
        task = get_task(name)
        results["tasks"][name] = {}
        for label, method, opt in methods:
            t0 = time.time()
            learned = {method: opt} if opt is not None else {}
            res = run_method(task, method, [{"lr_mult": 1.0}], list(range(args.seeds)), args.local_steps, 8,
                             args.rounds, learned, torch.Generator().manual_seed(0), "cosine")
            d, s, loss = (res["delta_rms"].mean(1), res["step_rms"].mean(1), res["curve"].mean(1))
            ratio = s / d
            late = max(1, args.rounds // 10)
            row = {"delta_rms": d.tolist(), "step_rms": s.tolist(), "train_loss": loss.tolist(),
                   "final_train_loss": float(res["train"].mean()), "final_heldout_loss": float(res["heldout"].mean()),
                   "early_step_to_delta": float(ratio[:late].mean()), "late_step_to_delta": float(ratio[-late:].mean()),
                   "late_step_rms": float(s[-late:].mean()), "late_delta_rms": float(d[-late:].mean())}
            results["tasks"][name][label] = row
            print(f"{name:14s} {label:34s} step/delta first {row['early_step_to_delta']:7.2f} last "
                  f"{row['late_step_to_delta']:9.2f} | late step {row['late_step_rms']:.1e} delta "
                  f"{row['late_delta_rms']:.1e} | train {row['final_train_loss']:.4f} held-out "
                  f"{row['final_heldout_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
            xs = range(1, args.rounds + 1)
            axes[i][0].plot(xs, ratio.tolist(), label=label)
            axes[i][1].plot(xs, s.tolist(), label=label)
            axes[i][2].plot(xs, loss.tolist(), label=label)
        for j, (title, log) in enumerate((("outer step RMS / mean-delta RMS", True), ("outer step RMS", True),
                                          ("train loss (nats)", True))):
            axes[i][j].set_title(f"{name}: {title}", fontsize=9)
            axes[i][j].set_xlabel("round (inner LR: cosine to 1e-3 of its peak)")
            if log:
                axes[i][j].set_yscale("log")
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(out / "schedule.png", buf.getvalue())
    write_json_atomic(out / "schedule.json", results)
    print(f"wrote {out / 'schedule.json'} and {out / 'schedule.png'}")


if __name__ == "__main__":
    main()
