"""``moecpt generate`` and ``moecpt checkpoint consolidate`` (``moecpt pretrain`` and ``moecpt cpt`` launch runs:
:mod:`moecpt.distributed.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer

from moecpt.argtypes import positive_int
from moecpt.errors import MoecptError
from moecpt.train.checkpoint import load_checkpoint, load_model, run_tokenizer_path
from moecpt.train.checkpoint_dcp import consolidate_checkpoint
from moecpt.train.generate import sample


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run_generate)

    c = subparsers.add_parser("checkpoint", help="convert checkpoints (consolidate a sharded DCP checkpoint)")
    actions = c.add_subparsers(dest="checkpoint_action", metavar="ACTION")
    c.set_defaults(func=lambda args: (c.print_help(), 2)[1])
    cons = actions.add_parser(
        "consolidate", help="write a sharded (DCP) checkpoint as one single-file checkpoint folder",
        description="Convert a DCP checkpoint (train.checkpoint_format = 'dcp', the default under FSDP) into the "
                    "single-file layout (model.safetensors, optimizer.pt) that eval, compare, generate, export-hf "
                    "and moecpt.load_model read, and that a run at any world size resumes from.")
    cons.add_argument("path", metavar="PATH", help="a DCP checkpoint folder (RUN/checkpoints/step_N) or a run folder "
                                                   "(its newest checkpoint)")
    cons.add_argument("--out", required=True, help="the checkpoint folder to create (must not exist)")
    cons.set_defaults(func=run_consolidate)


def run_generate(args: argparse.Namespace) -> int:
    ck = load_checkpoint(args.checkpoint)
    tok = Tokenizer.from_file(str(run_tokenizer_path(ck)))
    model = load_model(ck.path)
    eod = tok.token_to_id("<|endoftext|>")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise MoecptError(f"--seed {args.seed} is out of range; give a whole number between 0 and 2**63 - 1")
    # argv bytes that are not UTF-8 arrive as surrogates: give the tokenizer real text (invalid bytes -> U+FFFD)
    prompt = args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    ids = sample(model, tok.encode(prompt).ids, args.max_tokens, args.temperature, args.top_p, eod, args.seed)
    print(prompt + tok.decode(ids))
    return 0


def run_consolidate(args: argparse.Namespace) -> int:
    existed = Path(args.out).expanduser().exists()
    out = consolidate_checkpoint(args.path, args.out)
    source = load_checkpoint(out, verify=False).meta.get("consolidated_from", {}).get("path")
    print(f"{out} already holds {source}, consolidated; left as it is" if existed
          else f"consolidated {source} -> {out}")
    return 0
