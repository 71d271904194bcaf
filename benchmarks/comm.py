"""Communication of DDP vs local SGD / DiLoCo: bytes per token and wall-clock under an emulated slow link.

Every configuration is a real ``torchrun --standalone --nproc-per-node W -m moecpt pretrain`` job (gloo on CPU,
loopback only) on the bundled demo data, with the link emulated by ``distributed.emulate_bandwidth_gbit`` and
``distributed.emulate_latency_ms``: after every collective each rank sleeps ``latency + bytes_sent / bandwidth``
(``moecpt.distributed.accounting.LinkEmulator``). Configurations: ``ddp`` (one gradient all-reduce per step, plus a
small all-reduce of losses / router loads), and ``local-sgd`` / ``diloco`` at each H of ``--hs`` (one all-reduce of
the parameter deltas every H steps, nothing in between). Evaluation and checkpoints only at the end, so every
round is H steps long.

Reported per configuration, from the run's ``comm_summary`` record (``metrics.jsonl``): bytes per token (sent +
received by one worker, per token that worker trained on), bytes per round, rounds, communication / compute / step
wall-clock time of the training loop (rank 0), the final training loss of worker 0, and against DDP: the ratio of
bytes per token (expected H) and the wall-clock speed-up. ``modelled_comm_s`` is what the link model predicts from
the bytes (latency x collectives + bytes / bandwidth) as a check on the measured sleep.

EP row (``--ep N``, default 2; 0 skips it): ``ddp`` with ``distributed.expert_parallel = N`` at the same world size,
experts split over N ranks, tokens by all-to-all. Its ``a2a_bytes_per_token`` (all-to-all bytes sent + received by
one worker per token it trained on, from the ``all_to_all`` kind) is set against the analytic figure for uniform
routing, ``2 x 4 (N - 1) / N x K x D x 4 bytes`` per MoE layer (dispatch and combine, forward and backward, each
way; ``moecpt.distributed.expert_parallel.expected_a2a_bytes``), and its step time against the replicated-expert DDP
run under the same emulated link (``speedup_vs_ddp``).

Run: ``.venv/bin/python benchmarks/comm.py [--workers 2] [--steps 64] [--hs 4 16 64] [--bandwidth-gbit 1]
[--latency-ms 10] [--preset smoke-switch]``; prints one JSON object (wall time per configuration: ``README.md``).
Step times on a shared machine are noisy; bytes are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BASE_RECIPE = ROOT / "moecpt" / "recipes" / "smoke.toml"


def run_one(out: Path, args: argparse.Namespace, sync: str, h: int, ep: int = 1) -> dict:
    sets = {
        "model.preset": args.preset,
        "data.seq_len": args.seq_len,
        "train.batch_size": args.batch_size,
        "train.steps": args.steps,
        "train.eval_every": args.steps,
        "train.checkpoint_every": args.steps,
        "train.eval_batches": 1,
        "train.device": "cpu",
        "schedule.warmup_fraction": 0.05,
        "distributed.sync": sync,
        "distributed.emulate_bandwidth_gbit": args.bandwidth_gbit,
        "distributed.emulate_latency_ms": args.latency_ms,
    }
    if sync != "ddp":
        sets["distributed.local_steps"] = h
    if ep > 1:
        sets["distributed.expert_parallel"] = ep
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={args.workers}",
           "-m", "moecpt", "pretrain", "--recipe", str(BASE_RECIPE), "--out", str(out), "--no-progress"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{sync} H={h} EP={ep} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summ = next(r for r in recs if r.get("event") == "comm_summary")
    last = [r for r in recs if "lr" in r][-1]
    kinds = summ["by_kind"]
    collectives = sum(k["collectives"] for k in kinds.values())
    sent = summ["bytes_sent"]
    modelled = collectives * args.latency_ms / 1e3 + sent * 8 / (args.bandwidth_gbit * 1e9)
    a2a = kinds.get("all_to_all", {})
    return {
        "sync": sync if ep == 1 else f"{sync}+ep{ep}",
        "H": h,
        "rounds": summ["rounds"],
        "bytes_per_token": summ["bytes_per_token"],
        "bytes_per_round": summ["bytes_per_round"],
        "comm_bytes": summ["comm_bytes"],
        "collectives": collectives,
        "comm_time_s": round(summ["comm_time_s"], 3),
        "modelled_comm_s": round(modelled, 3),
        "compute_time_s": round(summ["compute_time_s"], 3),
        "train_wall_s": round(summ["wall_time_s"], 3),
        "process_wall_s": round(elapsed, 1),
        "final_loss": round(last["loss"], 4),
        **({"a2a_bytes_per_token": (a2a["bytes_sent"] + a2a["bytes_received"]) / (summ["tokens"] / args.workers),
            "a2a_time_s": round(a2a["time_s"], 3)} if ep > 1 else {}),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--hs", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--syncs", nargs="*", default=["local-sgd", "diloco"])
    p.add_argument("--bandwidth-gbit", type=float, default=1.0)
    p.add_argument("--latency-ms", type=float, default=10.0)
    p.add_argument("--preset", default="smoke-switch")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel row: DDP with experts over N ranks (0: none)")
    args = p.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory(prefix="moecpt-comm-") as tmp:
        runs.append(run_one(Path(tmp) / "ddp", args, "ddp", 1))
        if args.ep > 1:
            runs.append(run_one(Path(tmp) / f"ep{args.ep}", args, "ddp", 1, args.ep))
        for sync in args.syncs:
            for h in args.hs:
                runs.append(run_one(Path(tmp) / f"{sync}-{h}", args, sync, h))
    ddp = runs[0]
    for r in runs:
        r["bytes_per_token_ddp_over_this"] = round(ddp["bytes_per_token"] / r["bytes_per_token"], 3)
        r["speedup_vs_ddp"] = round(ddp["train_wall_s"] / r["train_wall_s"], 3)
    from moecpt.config import model_preset
    from moecpt.distributed.expert_parallel import expected_a2a_bytes
    from moecpt.model.transformer import build_model

    cfg = model_preset(args.preset, vocab_size=_vocab())
    for r in runs:
        if "a2a_bytes_per_token" in r:  # uniform routing: (N-1)/N of each token's K slots leave, as many arrive
            n, moe = args.ep, cfg.moe
            slots = (n - 1) / n * moe.top_k
            layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
            r["a2a_bytes_per_token_analytic"] = 2 * layers * expected_a2a_bytes(slots, slots, cfg.d_model,
                                                                                 torch.float32)

    print(json.dumps({
        "benchmark": "comm",
        "workers": args.workers,
        "steps": args.steps,
        "preset": args.preset,
        "parameters": sum(p.numel() for p in build_model(cfg, "meta").parameters()),
        "tokens_per_step": args.batch_size * args.seq_len,
        "link": {"bandwidth_gbit": args.bandwidth_gbit, "latency_ms": args.latency_ms},
        "load_avg": os.getloadavg()[0],
        "runs": runs,
    }, indent=1))


def _vocab() -> int:
    from moecpt.data.prepared import PreparedData

    return PreparedData.open("demo").vocab_size


if __name__ == "__main__":
    main()
