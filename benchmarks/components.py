"""Component timings behind the training-step speed work, each against its peer in the same run.

Prints one JSON object:

* ``adamw_ms``: one AdamW step over the demo Granular model's parameters (random gradients), the default
  for-loop implementation vs ``foreach`` vs ``fused`` (what ``moecpt.train.optim.build_optimizer`` uses on CPU);
* ``cross_entropy_ms``: forward + backward of ``F.cross_entropy`` vs ``moecpt.train.loss.cross_entropy`` on
  ``[2048, 4096]`` fp32 logits (the demo step's LM loss);
* ``rope_ms``: forward + backward of rotary embeddings on one demo q/k tensor: ``moecpt.model.transformer.apply_rope``
  on the ``[B, T, H, Dh]`` projection layout vs the usual rotate-half formula on the transposed ``[B, H, T, Dh]``
  view and vs that formula slicing off the rotary part and concatenating the pass-through part back (key
  ``previous_moecpt``: what slicing costs at full rotary, which ``apply_rope`` avoids);
* ``moe_step_page_faults``: minor page faults per forward + backward of the ``benchmarks/moe_layer.py`` MoE layer
  (with its dense FFN alongside, as in that benchmark), in two fresh processes: glibc ``malloc`` as is vs
  ``moecpt.train.host_memory.retain_freed_memory`` (``MOECPT_MALLOC_TUNING=0`` vs default).

The main process applies ``retain_freed_memory`` (as the trainer does) to every timed candidate alike. Medians over
``--reps`` calls per round, rounds interleaved. Run: ``.venv/bin/python benchmarks/components.py [--reps 20]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from moecpt.argtypes import int_at_least

_FAULTS = """
import resource, torch
from moecpt.train.host_memory import retain_freed_memory
retain_freed_memory()
from moecpt.config import ModelConfig
from moecpt.model.moe import GLUFeedForward, MoELayer
torch.manual_seed(0)
moe = MoELayer(ModelConfig(vocab_size=2, d_model=256, n_heads=1, head_dim=2, ffn_width=256, ffn_kind="swiglu",
                           moe=dict(num_experts=32, top_k=4, expert_width=256)))
dense = GLUFeedForward(256, 1024, "swiglu")
for p in [*moe.parameters(), *dense.parameters()]:
    torch.nn.init.normal_(p, std=0.02)
x, g = torch.randn(2048, 256), torch.randn(2048, 256)
def step_moe():
    y, r = moe(x.detach().requires_grad_(True))
    ((y * g).sum() + r.weighted_aux_loss()).backward()
    moe.zero_grad(set_to_none=True)
def step_dense():
    (dense(x.detach().requires_grad_(True)) * g).sum().backward()
    dense.zero_grad(set_to_none=True)
for _ in range(3):
    step_moe(); step_dense()
faults = 0
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step_moe()
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    step_dense()
print(faults // 10)
"""


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def interleaved(cands: dict, reps: int, rounds: int = 3) -> dict[str, float]:
    """Median over ``rounds`` of per-round medians, candidates alternating round by round."""
    res: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, fn in cands.items():
            res[k].append(timed(fn, reps))
    return {k: round(statistics.median(v), 3) for k, v in res.items()}


def bench_adamw(reps: int) -> dict[str, float]:
    from moecpt.config import model_preset
    from moecpt.model.transformer import build_model
    from moecpt.train.optim import param_groups

    model = build_model(model_preset("demo-granular", vocab_size=4096, max_seq_len=128))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kinds = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {name: torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), **kw)
            for name, kw in kinds.items()}
    return interleaved({k: o.step for k, o in opts.items()}, reps)


def bench_cross_entropy(reps: int) -> dict[str, float]:
    from moecpt.train.loss import cross_entropy

    logits = (torch.randn(2048, 4096) * 3).requires_grad_(True)
    targets = torch.randint(0, 4096, (2048,))

    def run(loss_fn):
        def step():
            logits.grad = None
            loss_fn(logits, targets).backward()
        return step

    return interleaved({"torch": run(F.cross_entropy), "moecpt": run(cross_entropy)}, reps)


def _rope_transposed(x_BHTA: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """The usual rotate-half RoPE on the ``[B, H, T, Dh]`` view (Llama / GPT-NeoX), the peer of ``apply_rope``."""
    x1, x2 = x_BHTA.chunk(2, dim=-1)
    return x_BHTA * cos_TR + torch.cat([-x2, x1], dim=-1) * sin_TR


def _rope_previous(x_BHTA: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate-half on the transposed view that slices the rotary part and concatenates the (empty, at full rotary)
    pass-through part back: the partial-rotary-ready form whose slicing cost ``apply_rope`` avoids."""
    R = cos_TR.shape[-1]
    x_rot, x_pass = x_BHTA[..., :R], x_BHTA[..., R:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    out = x_rot.float() * cos_TR + torch.cat([-x2, x1], dim=-1) * sin_TR
    return torch.cat([out.to(x_BHTA.dtype), x_pass], dim=-1)


def bench_rope(reps: int) -> dict[str, float]:
    from moecpt.model.transformer import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(128, 32, 10000.0)
    q_BTHA = torch.randn(16, 128, 4, 32, requires_grad=True)  # demo: batch 16, seq 128, 4 heads of 32
    g = torch.randn(16, 128, 4, 32)
    assert torch.allclose(apply_rope(q_BTHA, cos, sin), _rope_transposed(q_BTHA.transpose(1, 2), cos, sin)
                          .transpose(1, 2), atol=1e-6)

    def ours():
        q_BTHA.grad = None
        apply_rope(q_BTHA, cos, sin).backward(g)

    def peer(fn):
        def step():
            q_BTHA.grad = None
            fn(q_BTHA.transpose(1, 2), cos, sin).backward(g.transpose(1, 2))
        return step

    return interleaved({"previous_moecpt": peer(_rope_previous), "transposed_rotate_half": peer(_rope_transposed),
                        "moecpt": ours}, reps, rounds=5)


def bench_faults() -> dict[str, int]:
    out = {}
    for name, flag in (("glibc_default", "0"), ("retain_freed_memory", "1")):
        env = {**os.environ, "MOECPT_MALLOC_TUNING": flag}
        proc = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, check=True)
        out[name] = int(proc.stdout.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int_at_least(1), default=20, help="timed calls per candidate and round")
    args = ap.parse_args()
    from moecpt.train.host_memory import retain_freed_memory

    retain_freed_memory()
    out = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "adamw_ms": bench_adamw(args.reps),
        "cross_entropy_ms": bench_cross_entropy(args.reps),
        "rope_ms": bench_rope(args.reps),
        "moe_step_page_faults": bench_faults(),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
