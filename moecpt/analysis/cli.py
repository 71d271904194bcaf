"""``moecpt eval`` and ``moecpt compare``: the metrics of one checkpoint, and the routing change between two."""

from __future__ import annotations

import argparse
import json

from moecpt.analysis.evaluate import compare_traces, evaluate_checkpoint
from moecpt.analysis.harness_run import check_results_path, run_harness, write_results
from moecpt.argtypes import positive_int
from moecpt.errors import MoecptError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="validation loss and routing diagnostics of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    p.add_argument("--data", default="demo", help="prepared data folder (default: bundled demo)")
    p.add_argument("--sources", nargs="*", default=None, help="sources to evaluate (default: all)")
    p.add_argument("--batches", type=positive_int, default=8, help="held-out batches per source")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=None)
    p.add_argument("--coactivation", action="store_true", help="include co-activation matrices (k > 1)")
    p.add_argument("--json", action="store_true")
    h = p.add_argument_group("lm-evaluation-harness (pip install 'moecpt[eval]'; docs/eval.md)")
    h.add_argument("--harness", nargs="+", metavar="TASK", default=None,
                   help="score the checkpoint on these lm-eval tasks instead (names or groups)")
    h.add_argument("--include-path", action="append", default=None, help="folder of your own task YAMLs")
    h.add_argument("--limit", type=float, default=None, help="examples per task (count, or fraction < 1)")
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    h.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks that execute the model's code (HumanEval; also set HF_ALLOW_CODE_EVAL=1)")
    h.add_argument("--out", default=None, help="write the results JSON here (a new file or an earlier one)")
    p.set_defaults(func=run_eval)

    p = subparsers.add_parser("compare", help="routing change between two checkpoints (CRS, CVS, MRI, loss)")
    p.add_argument("before", help="earlier checkpoint (e.g. the CPT parent)")
    p.add_argument("after", help="later checkpoint (e.g. after CPT)")
    p.add_argument("--data", default="demo")
    p.add_argument("--sources", nargs="*", default=None)
    p.add_argument("--batches", type=positive_int, default=8)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_compare)


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2))
        return
    for source, vals in obj.get("sources", {}).items():
        line = f"{source:>12}: loss {vals['loss']:.4f}"
        if "mri_mean" in vals:
            line += f"  MRI {vals['mri_mean']:.3f}"
        if "crs_mean" in vals:
            line += f"  CRS {vals['crs_mean']:.3f}  CVS {vals['cvs_mean']:.3f}"
        print(line)


def run_eval(args: argparse.Namespace) -> int:
    if args.harness:
        return run_eval_harness(args)
    if getattr(args, "out", None):
        raise MoecptError("--out writes lm-evaluation-harness scores: add --harness TASKS, or drop --out "
                          "(--json prints the evaluation)")
    report, _ = evaluate_checkpoint(args.checkpoint, args.data, args.sources, args.seq_len, args.batch_size,
                                    args.batches)
    if not args.coactivation:
        for vals in report["sources"].values():
            vals.pop("coactivation_layers", None)
    _print(report, args.json)
    return 0


def run_eval_harness(args: argparse.Namespace) -> int:
    """``moecpt eval --harness TASKS``: lm-eval scores, printed one line per metric (or as JSON) and, with
    ``--out``, written to a results file (docs/eval.md)."""
    out = check_results_path(args.out, [args.checkpoint, *(args.include_path or [])]) if args.out else None
    report = run_harness(args.checkpoint, args.harness, include_path=args.include_path, limit=args.limit,
                         batch_size=args.batch_size, device=args.device, num_fewshot=args.num_fewshot,
                         confirm_run_unsafe_code=args.confirm_run_unsafe_code)
    if out is not None:
        write_results(out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for task, metrics in report["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                print(f"{task:>24}: {key:<24} {value:.4f}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    rep_a, tr_a = evaluate_checkpoint(args.before, args.data, args.sources, args.seq_len, args.batch_size,
                                      args.batches)
    # the second checkpoint is evaluated on exactly the first one's tokens (same sources, length, batches)
    rep_b, tr_b = evaluate_checkpoint(args.after, args.data, list(tr_a), rep_a["seq_len"], args.batch_size,
                                      args.batches)
    out = {"before": rep_a["checkpoint"], "after": rep_b["checkpoint"], "sources": {}}
    for source in tr_a:
        a, b = rep_a["sources"][source], rep_b["sources"][source]
        entry = {"loss_before": a["loss"], "loss": b["loss"], "loss_change": b["loss"] - a["loss"]}
        if "mri_mean" in a or "mri_mean" in b:
            change = compare_traces(tr_a[source], tr_b[source])  # refuses dense vs MoE or a shape mismatch
            entry |= {"mri_before": a["mri_mean"], "mri_mean": b["mri_mean"], "mri_layers_before": a["mri_layers"],
                      "mri_layers": b["mri_layers"], **change}
        out["sources"][source] = entry
    _print(out, args.json)
    return 0
