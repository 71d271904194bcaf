"""Training-step speed of the demo models: tokens/s, step time, model FLOPs utilisation, MoE / dense ratios.

One full optimizer step exactly as the trainer does it (``moecpt.train.trainer``): forward with routing records,
fp32 cross-entropy, the layer-averaged weighted aux loss, backward, grad-norm clipping, AdamW (the trainer's
parameter groups), zero_grad, the bias update hook. Models: ``demo-dense``, ``demo-switch``, ``demo-granular``
(vocab 4096, seq 128, batch 16, fp32, CPU unless ``--device``), fed with real demo-English batches. Each model gets
``--warmup`` untimed steps; then ``--steps`` rounds each time one step of every model (rotating order) and one
peak measurement, so that drifting machine speed (shared cores) hits all alike; medians are reported.

MFU = ``model_stats(cfg, seq_len)["train_flops_per_token"]`` x tokens/s / peak, where the peak is measured in the
same process with the same thread count, once per round: the best of ``--peak-reps`` fp32 ``torch.mm`` of
2048 x 2048 (2 n^3 FLOPs). ``mfu`` pairs every step with its own round's peak (median over rounds);
``mfu_vs_best_peak`` divides the median step's FLOP rate by the best peak of the whole run (a lower bound).
Targets (reported, not enforced): MFU >= 0.5 for dense, MoE step time <= 1.3 x dense.

``--profile`` adds, per model, the top ops by self CPU time over a few profiled steps (``torch.profiler``).

Run: ``.venv/bin/python benchmarks/train_step.py [--steps 20] [--warmup 5] [--profile]``; prints one JSON object.
Timings on a shared, loaded machine are noisy; ``load_avg`` is printed so a reader can judge.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from moecpt.argtypes import int_at_least
from moecpt.config import OptimConfig, model_preset
from moecpt.model.flops import model_stats
from moecpt.model.transformer import build_model
from moecpt.train.host_memory import retain_freed_memory
from moecpt.train.optim import build_optimizer
from moecpt.train.trainer import lm_loss

PRESETS = ("demo-dense", "demo-switch", "demo-granular")


def measure_peak(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Best fp32 matmul throughput in FLOP/s for an n x n x n product."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(n: int, batch: int, seq: int) -> list[torch.Tensor]:
    from moecpt.data.mixture import MixtureSampler
    from moecpt.data.prepared import PreparedData

    sampler = MixtureSampler(PreparedData.open("demo"), {"english": 1.0}, seq, batch, seed=0, allow_repeat=True)
    return [sampler.next_batch() for _ in range(n)]


def make_step(model, optimizer, grad_clip: float):
    def step(b: torch.Tensor) -> float:
        logits, routing = model(b[:, :-1], return_routing=True)
        ce = lm_loss(logits, b[:, 1:])
        aux = sum((o.weighted_aux_loss() for o in routing), ce.new_zeros(()))
        if routing:
            aux = aux / len(routing)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for r in model.routers():
            r.update_bias()
        return ce.item()

    return step


def build(preset: str, args, device: torch.device):
    """Model, its step function and config for ``preset`` (seeded: every run starts from the same weights)."""
    cfg = model_preset(preset, vocab_size=4096, max_seq_len=args.seq)
    torch.manual_seed(0)
    model = build_model(cfg, device=device).train()
    optim_cfg = OptimConfig()
    optimizer = build_optimizer(model, optim_cfg, device)
    return cfg, make_step(model, optimizer, optim_cfg.grad_clip)


def timed_step(step, b: torch.Tensor, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step(b)
    _sync(device)
    return time.perf_counter() - t0


def bench_all(args, device: torch.device, data: list[torch.Tensor]) -> tuple[dict, list[float]]:
    """Warm up every model, then time ``--steps`` rounds; each round runs one step of every model (in an order
    that rotates per round) and one peak-matmul measurement, so a machine whose speed drifts (shared cores)
    slows every candidate alike. Returns per-model results and the per-round peaks (FLOP/s)."""
    built = {m: build(m, args, device) for m in args.models}
    for m, (_, step) in built.items():
        for i in range(args.warmup):
            step(data[i % len(data)].to(device))
    times = {m: [] for m in built}
    peaks = []
    names = list(built)
    for i in range(args.steps):
        b = data[(args.warmup + i) % len(data)].to(device)
        for m in names[i % len(names):] + names[: i % len(names)]:
            times[m].append(timed_step(built[m][1], b, device))
        peaks.append(measure_peak(device, reps=args.peak_reps))
    peak = max(peaks)
    tokens = args.batch * args.seq
    results = {}
    for m, (cfg, step) in built.items():
        med = statistics.median(times[m])
        stats = model_stats(cfg, seq_len=args.seq)
        tps = tokens / med
        results[m] = {
            "step_ms_median": round(med * 1e3, 2),
            "step_ms_quartiles": [round(q * 1e3, 2) for q in statistics.quantiles(times[m], n=4)],
            "tokens_per_s": round(tps, 1),
            "train_flops_per_token": stats["train_flops_per_token"],
            "achieved_gflops": round(stats["train_flops_per_token"] * tps / 1e9, 2),
            # each step against the peak measured in its own round (drift cancels), median over rounds; and, more
            # conservatively, the median step against the best peak of the whole run
            "mfu": round(statistics.median(stats["train_flops_per_token"] * tokens / t / p
                                           for t, p in zip(times[m], peaks)), 4),
            "mfu_vs_best_peak": round(stats["train_flops_per_token"] * tps / peak, 4),
            "active_params": stats["active_params"],
            "total_params": stats["total_params"],
        }
        if args.profile:
            results[m]["top_ops_self_cpu"] = profile(step, data, device)
    return results, peaks


def profile(step, data, device, n: int = 3, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for i in range(n):
            step(data[i % len(data)].to(device))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "calls_per_step": e.count / n, "self_ms_per_step": round(e.self_cpu_time_total / n / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:top]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int_at_least(2), default=20, help="timed rounds (>= 2; medians and quartiles)")
    p.add_argument("--warmup", type=int_at_least(0), default=5)
    p.add_argument("--batch", type=int_at_least(1), default=16)
    p.add_argument("--seq", type=int_at_least(2), default=128)
    p.add_argument("--peak-reps", type=int_at_least(1), default=3, help="matmuls per peak measurement (one per round)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--profile", action="store_true", help="add the top ops (torch.profiler) per model")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc malloc as is (default: retain freed memory, as the trainer does on CPU)")
    args = p.parse_args()
    malloc_tuned = False if args.no_malloc_tuning else retain_freed_memory()
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        p.error(f"--device {args.device!r} is not usable here ({str(exc).splitlines()[0]})")
    if len(set(args.models)) != len(args.models):
        p.error("--models lists a model twice")
    data = batches(args.warmup + args.steps, args.batch, args.seq)
    results, peaks = bench_all(args, device, data)
    out = {
        "benchmark": "train_step",
        "config": {"batch": args.batch, "seq_len": args.seq, "vocab": 4096, "dtype": "fp32", "device": args.device,
                   "warmup": args.warmup, "steps": args.steps, "malloc_tuned": malloc_tuned,
                   "optimizer": "AdamW (trainer groups), clip 1.0"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "peak_fp32_mm_gflops": round(max(peaks) / 1e9, 1),
        "peak_fp32_mm_gflops_median": round(statistics.median(peaks) / 1e9, 1),
        "models": results,
    }
    if "demo-dense" in results:
        dense = results["demo-dense"]["step_ms_median"]
        out["step_time_ratio_to_dense"] = {m: round(r["step_ms_median"] / dense, 3)
                                           for m, r in results.items() if m != "demo-dense"}
        out["targets"] = {
            "dense_mfu_ge_0.5": results["demo-dense"]["mfu"] >= 0.5,
            **{f"{m}_ratio_le_1.3": v <= 1.3 for m, v in out["step_time_ratio_to_dense"].items()},
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
