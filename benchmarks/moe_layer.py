"""MoE layer speed: moecpt's MoELayer (grouped dispatch) vs a FLOP-matched dense GLU FFN vs Hugging Face OLMoE.

All three run forward + backward (gradients for every parameter and for the input) on the same problem: d_model
256, 32 experts of width 256, top-4, 2048 tokens, fp32, CPU, SwiGLU (OLMoE's activation). The dense FFN has width
top_k * expert_width = 1024, so it does the same expert matmul FLOPs per token as the MoE. The OLMoE block
(``OlmoeSparseMoeBlock``) gets *our* weights (router, experts), so both MoEs route every token identically and the
script checks that their outputs agree before timing. moecpt's layer runs its default penalty router, so its time
includes the load-balancing and z-loss (backpropagated); the HF block computes no aux loss.

Every experts implementation the installed ``transformers`` registers and that runs here ("eager", "grouped_mm",
"batched_mm", ...) is timed; ``ms.hf_olmoe`` is the fastest, ``hf_all_ms`` lists all. Timing: warm-up, then
``--rounds`` rounds, each timing every candidate once in a rotating order; medians are reported.

Run: ``.venv/bin/python benchmarks/moe_layer.py [--rounds 30] [--tokens 2048]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from moecpt.argtypes import int_at_least, positive_int
from moecpt.config import ModelConfig
from moecpt.model.expert_dispatch import grouped_mm_usable
from moecpt.model.moe import GLUFeedForward, MoELayer
from moecpt.train.host_memory import retain_freed_memory


def build_moecpt(D: int, E: int, F: int, K: int) -> MoELayer:
    cfg = ModelConfig(  # the attention fields are unused here: a head_dim that fits any d_model
        vocab_size=2, d_model=D, n_heads=1, head_dim=2, ffn_width=F, ffn_kind="swiglu",
        moe=dict(num_experts=E, top_k=K, expert_width=F, dispatch="grouped"),
    )
    layer = MoELayer(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(layer.experts.w_in, std=0.02)
        torch.nn.init.normal_(layer.experts.w_out, std=0.02)
    return layer


def build_hf(ours: MoELayer, D: int, E: int, F: int, K: int, impl: str):
    """OLMoE sparse MoE block with ``impl`` experts and our weights; None if it cannot be built here."""
    try:
        from transformers import OlmoeConfig
        from transformers.models.olmoe import modeling_olmoe as m
    except ImportError:
        return None
    cls = getattr(m, "OlmoeSparseMoeBlock", None)
    if cls is None:
        return None
    cfg = OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                      norm_topk_prob=False, hidden_act="silu")
    cfg._experts_implementation = impl
    block = cls(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        # ours: w_in [E, D, 2F] ([gate | up] on the last dim), w_out [E, F, D]; HF: [E, 2F, D] and [E, D, F]
        block.experts.gate_up_proj.copy_(ours.experts.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(ours.experts.w_out.transpose(1, 2))
    return block


def hf_impls() -> list[str]:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"]
    return ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=positive_int, default=2048)
    ap.add_argument("--d-model", type=positive_int, default=256)
    ap.add_argument("--experts", type=positive_int, default=32)
    ap.add_argument("--expert-width", type=positive_int, default=256)
    ap.add_argument("--top-k", type=positive_int, default=4)
    ap.add_argument("--rounds", type=int_at_least(2), default=30, help="interleaved timing rounds (>= 2: quartiles)")
    ap.add_argument("--warmup", type=int_at_least(0), default=3)
    ap.add_argument("--slow-factor", type=float, default=3.0,
                    help="HF implementations slower than this times the fastest get only a 3-run pre-pass")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc malloc as is (default: retain freed memory, as the trainer does on CPU)")
    args = ap.parse_args()
    malloc_tuned = False if args.no_malloc_tuning else retain_freed_memory()
    T, D, E, F, K = args.tokens, args.d_model, args.experts, args.expert_width, args.top_k

    torch.manual_seed(0)
    try:
        ours = build_moecpt(D, E, F, K)
    except ValueError as exc:  # pydantic's ValidationError: one line naming the field
        ap.error(exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc))
    dense = GLUFeedForward(D, K * F, "swiglu")
    with torch.no_grad():
        for p in dense.parameters():
            torch.nn.init.normal_(p, std=0.02)
    x_TD = torch.randn(T, D)
    g_TD = torch.randn(T, D)  # a fixed upstream gradient

    def step_ours():
        x = x_TD.detach().requires_grad_(True)
        y, r = ours(x)
        ((y * g_TD).sum() + r.weighted_aux_loss()).backward()

    def step_dense():
        x = x_TD.detach().requires_grad_(True)
        (dense(x) * g_TD).sum().backward()

    def make_hf_step(block):
        def step():
            x = x_TD.detach().requires_grad_(True)
            (block(x[None]) * g_TD).sum().backward()
        return step

    with torch.no_grad():
        y_ours, _ = ours(x_TD)
    candidates = {"moecpt": (ours, step_ours), "dense": (dense, step_dense)}
    hf_errors = {}
    for impl in hf_impls():
        try:
            block = build_hf(ours, D, E, F, K, impl)
            if block is None:
                break
            with torch.no_grad():
                y_hf = block(x_TD[None])[0]
            err = (y_hf - y_ours).abs().max().item()
            if err > 1e-4 * max(1.0, y_ours.abs().max().item()):
                hf_errors[impl] = f"output differs from moecpt by {err:.3g}"
                continue
            make_hf_step(block)()  # must also run backward
            candidates[f"hf:{impl}"] = (block, make_hf_step(block))
        except Exception as exc:  # an implementation that needs a GPU / extra kernels
            hf_errors[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"

    def timed(name):
        module, step = candidates[name]
        for p in module.parameters():
            p.grad = None
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3

    names = list(candidates)
    for _ in range(args.warmup):
        for n in names:
            timed(n)
    # HF implementations far slower than the best one (e.g. batched_mm, which gathers a weight copy per routed
    # token) are timed in a short pre-pass only, so the interleaved rounds stay affordable.
    pre = {n: statistics.median(timed(n) for _ in range(3)) for n in names if n.startswith("hf:")}
    slow = {n for n, v in pre.items() if v > args.slow_factor * min(pre.values())}
    names = [n for n in names if n not in slow]
    times = {n: [] for n in names}
    for i in range(args.rounds):
        rot = names[i % len(names):] + names[: i % len(names)]
        for n in rot:
            times[n].append(timed(n))
    med = {n: statistics.median(v) for n, v in times.items()}
    med.update({n: pre[n] for n in slow})
    spread = {n: [round(q, 1) for q in statistics.quantiles(v, n=4)] for n, v in times.items() if len(v) > 1}

    hf_all = {n.removeprefix("hf:"): round(v, 3) for n, v in med.items() if n.startswith("hf:")}
    hf_best = min(hf_all, key=hf_all.get) if hf_all else None
    ms = {"moecpt": round(med["moecpt"], 3), "dense": round(med["dense"], 3),
          "hf_olmoe": hf_all[hf_best] if hf_best else None}
    ratios = {"moecpt_over_dense": round(ms["moecpt"] / ms["dense"], 3)}
    if hf_best:
        ratios["hf_over_moecpt"] = round(ms["hf_olmoe"] / ms["moecpt"], 3)
        ratios["hf_over_dense"] = round(ms["hf_olmoe"] / ms["dense"], 3)
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    out = {
        "config": {"tokens": T, "d_model": D, "num_experts": E, "expert_width": F, "top_k": K,
                   "dense_width": K * F, "dtype": "float32", "device": "cpu", "activation": "swiglu",
                   "rounds": args.rounds, "warmup": args.warmup, "threads": torch.get_num_threads(),
                   "malloc_tuned": malloc_tuned,
                   "moecpt_layout": "grouped_mm" if grouped_mm_usable(D, F, torch.float32, torch.device("cpu"))
                   else "padded_bmm",
                   "torch": torch.__version__, "transformers": hf_version, "machine": platform.machine()},
        "ms": ms,
        "ratios": ratios,
        "hf_impl": hf_best,
        "hf_all_ms": hf_all,
        "hf_skipped": hf_errors,
        "quartiles_ms": spread,
        "hf_prepass_only": sorted(n.removeprefix("hf:") for n in slow),
        "targets": {"moecpt_over_dense_max": 1.35, "hf_over_moecpt_min": 1.1},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
