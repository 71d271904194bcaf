"""``moecpt import-hf`` and ``moecpt export-hf``. Heavy imports stay inside the command functions."""

from __future__ import annotations

import argparse
import json

from moecpt.interop.families import FAMILIES
from moecpt.interop.hf_export import export_hf
from moecpt.interop.hf_import import import_hf, write_error


def _one_line_os_errors(run, args: argparse.Namespace) -> int:
    """Run ``run(args)``; an ``OSError`` left over (the writers turn theirs into one line already, so this is
    mostly a failed read of an input) becomes a one-line ``MoecptError``, not a traceback."""
    try:
        return run(args)
    except OSError as exc:
        raise write_error(exc, args.out) from None


def register(subparsers) -> None:
    """Add ``import-hf`` and ``export-hf`` to the top-level ``moecpt`` parser."""
    p = subparsers.add_parser(
        "import-hf", help="convert a local Hugging Face MoE folder into a moecpt checkpoint",
        description="Convert a local Hugging Face folder (config.json, safetensors shards, tokenizer.json) of a "
                    f"supported family ({', '.join(FAMILIES)}) into a moecpt checkpoint folder (step 0) that "
                    "`moecpt cpt --from`, `moecpt eval` and `moecpt compare` accept. Shards are streamed: peak "
                    "memory is about the model plus one shard.",
    )
    p.add_argument("path", help="local Hugging Face model folder")
    p.add_argument("--out", required=True, help="checkpoint folder to create (must not exist)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="weights dtype in the checkpoint (auto: as stored)")
    p.add_argument("--allow-missing-tokenizer", action="store_true",
                   help="import a folder without tokenizer.json (the checkpoint then records no tokenizer)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=lambda args: _one_line_os_errors(_import, args))

    e = subparsers.add_parser(
        "export-hf", help="write a moecpt checkpoint as a Hugging Face folder",
        description="Write a moecpt checkpoint (or a run's latest) as a Hugging Face folder that "
                    "AutoModelForCausalLM.from_pretrained loads, in the family it was imported from or the closest "
                    "one that represents it exactly (see docs/interop.md).",
    )
    e.add_argument("checkpoint", help="checkpoint folder or run folder")
    e.add_argument("--out", required=True, help="folder to create (must not exist)")
    e.add_argument("--family", default="auto", choices=("auto", *FAMILIES),
                   help="target family (auto: the imported one if it fits, else the closest exact one)")
    e.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="weights dtype (auto: as stored)")
    e.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.set_defaults(func=lambda args: _one_line_os_errors(_export, args))


def _import(args: argparse.Namespace) -> int:
    s = import_hf(args.path, args.out, dtype=args.dtype, allow_missing_tokenizer=args.allow_missing_tokenizer)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    sha = (s["tokenizer_sha256"] or "none")[:16]
    print(f"imported {s['family']} ({s['params']:,} parameters, {s['dtype']}) -> {s['out']}  tokenizer {sha}")
    for note in s["notes"]:
        print(f"  note: {note}")
    return 0


def _export(args: argparse.Namespace) -> int:
    s = export_hf(args.checkpoint, args.out, family=args.family, dtype=args.dtype,
                  max_shard_size=args.max_shard_size)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"exported {s['architecture']} ({s['dtype']}, {len(s['shards'])} shard(s)) -> {s['out']}")
    for note in s["notes"]:
        print(f"  note: {note}")
    return 0
