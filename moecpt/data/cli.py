"""``moecpt data prepare`` and ``moecpt data inspect``. Heavy imports stay inside the command functions."""

from __future__ import annotations

import argparse
import json

from moecpt.data.prepared import PreparedData
from moecpt.data.shards import prepare
from moecpt.errors import MoecptError


def register(subparsers) -> None:
    """Add the ``data`` command group to the top-level ``moecpt`` parser."""
    data = subparsers.add_parser("data", help="prepare and inspect tokenized training data")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = sub.add_parser(
        "prepare",
        help="tokenize sources into token shards with a held-out split",
        description="Tokenize text sources into memory-mapped token shards (one folder, manifest.json written last).",
    )
    p.add_argument("--source", action="append", required=True, metavar="NAME=PATH",
                   help="a source: file, folder, glob, datasets folder or hf:NAME[:CONFIG][#SPLIT]; repeatable")
    p.add_argument("--text-field", default="text", help="JSON Lines / Parquet / datasets field with the text")
    p.add_argument("--tokenizer", required=True, metavar="train:VOCAB_SIZE|PATH",
                   help="train a byte-level BPE (e.g. train:4096) or load a tokenizer.json / tokenizer folder")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or one made by moecpt data prepare (never one of the inputs)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of each source (tokens)")
    p.add_argument("--min-val-docs", type=int, default=1, help="minimum held-out documents per source")
    p.add_argument("--min-val-tokens", type=int, default=4096,
                   help="minimum held-out tokens per source (capped at half the source)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) JSON Lines lines that are not JSON instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_prepare)

    i = sub.add_parser("inspect", help="show what a prepared folder holds",
                       description="Print the vocabulary, tokenizer hash and per-source token/document counts.")
    i.add_argument("dir", help="prepared folder, or 'demo'")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=_inspect)


def _parse_sources(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise MoecptError(f"--source {item!r} is not of the form NAME=PATH")
        if name in out:
            raise MoecptError(f"--source {name!r} is given twice; use one NAME per source")
        out[name] = path
    return out


def _prepare(args: argparse.Namespace) -> int:
    manifest = prepare(
        _parse_sources(args.source), args.out, tokenizer=args.tokenizer, text_field=args.text_field,
        val_fraction=args.val_fraction, seed=args.seed, workers=args.workers, skip_bad_lines=args.skip_bad_lines,
        min_val_documents=args.min_val_docs, min_val_tokens=args.min_val_tokens, progress=not args.quiet,
    )
    total = sum(s["train_tokens"] + s["val_tokens"] for s in manifest["sources"].values())
    n = len(manifest["sources"])
    print(f"prepared {n} sources, {total:,} tokens, vocab {manifest['vocab_size']} -> {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    summary = PreparedData.open(args.dir).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['path']}")
    print(f"vocab_size {summary['vocab_size']}  eod_id {summary['eod_id']}  dtype {summary['dtype']}  "
          f"tokenizer_sha256 {summary['tokenizer_sha256'][:16]}...")
    cols = ("train_tokens", "val_tokens", "train_documents", "val_documents")
    width = max([6] + [len(n) for n in summary["sources"]])
    print(f"{'source':<{width}}  " + "  ".join(f"{c:>15}" for c in cols))
    for name, s in summary["sources"].items():
        print(f"{name:<{width}}  " + "  ".join(f"{s[c]:>15,}" for c in cols))
    return 0
