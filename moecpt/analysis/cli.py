"""``moecpt eval`` and ``moecpt compare``: the metrics of one checkpoint, and the routing change between two."""

from __future__ import annotations

import argparse
import json

from moecpt.analysis.evaluate import compare_traces, evaluate_checkpoint
from moecpt.argtypes import positive_int


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
    report, _ = evaluate_checkpoint(args.checkpoint, args.data, args.sources, args.seq_len, args.batch_size,
                                    args.batches)
    if not args.coactivation:
        for vals in report["sources"].values():
            vals.pop("coactivation_layers", None)
    _print(report, args.json)
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
