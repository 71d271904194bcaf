"""Activation checkpointing: memory saved against time paid, ``none`` vs ``moe-only`` vs ``full``, in one run.

One training forward + backward of a decoder (default the ``demo-granular`` preset: 31 routed + 1 shared expert,
top-3, at the bundled study's sequence length 128) on random tokens. Memory is counted exactly, not sampled: the
bytes autograd saves for the backward in the forward (``torch.autograd.graph.saved_tensors_hooks``), which is what
checkpointing removes; what the replay allocates transiently in the backward is one block's (or one MoE FFN's)
worth and is not counted. Time: warm-up, then ``--rounds`` rounds timing each mode once in a rotating order;
medians, and each mode's time relative to ``none`` measured in the same run.

Run: ``.venv/bin/python benchmarks/activation_checkpointing.py [--preset demo-granular] [--batch 8] [--rounds 5]``;
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from moecpt.argtypes import positive_int
from moecpt.config import ActivationCheckpointing, model_preset
from moecpt.model.flops import saved_activation_bytes
from moecpt.model.transformer import build_model
from moecpt.train.trainer import lm_loss


def step_s(model, ids_BT: torch.Tensor) -> float:
    t0 = time.perf_counter()
    lm_loss(model(ids_BT[:, :-1]), ids_BT[:, 1:]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo-granular")
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--seq", type=positive_int, default=128)
    ap.add_argument("--vocab", type=positive_int, default=8192)
    ap.add_argument("--rounds", type=positive_int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(model_preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq))
    ids_BT = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    modes = list(ActivationCheckpointing)
    mem = {}
    for m in modes:
        model.set_activation_checkpointing(m)
        mem[m.value] = saved_activation_bytes(model, ids_BT[:, :-1])
        step_s(model, ids_BT)  # warm-up
    times: dict[str, list[float]] = {m.value: [] for m in modes}
    for r in range(args.rounds):
        for m in modes[r % len(modes):] + modes[: r % len(modes)]:
            model.set_activation_checkpointing(m)
            times[m.value].append(step_s(model, ids_BT))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "preset": args.preset, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "saved_activation_MB": {k: round(v / 2**20, 2) for k, v in mem.items()},
        "saved_vs_none": {k: round(v / mem["none"], 3) for k, v in mem.items()},
        "step_s_median": {k: round(v, 4) for k, v in med.items()},
        "time_vs_none": {k: round(v / med["none"], 3) for k, v in med.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
