"""``moecpt generate`` (``moecpt pretrain`` and ``moecpt cpt`` launch runs: :mod:`moecpt.distributed.cli`)."""

from __future__ import annotations

import argparse

from moecpt.argtypes import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokenizers import Tokenizer

    from moecpt.errors import MoecptError
    from moecpt.train.checkpoint import load_checkpoint, load_model
    from moecpt.train.generate import sample

    ck = load_checkpoint(args.checkpoint)
    tok_path = next((p / "tokenizer.json" for p in (ck.path, ck.path.parent.parent) if (p / "tokenizer.json").is_file()),
                    None)
    if tok_path is None:
        raise MoecptError(f"no tokenizer.json next to {ck.path} or in its run folder; copy the run's tokenizer there")
    tok = Tokenizer.from_file(str(Path(tok_path)))
    model = load_model(ck.path)
    eod = tok.token_to_id("<|endoftext|>")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise MoecptError(f"--seed {args.seed} is out of range; give a whole number between 0 and 2**63 - 1")
    # argv bytes that are not UTF-8 arrive as surrogates: give the tokenizer real text (invalid bytes -> U+FFFD)
    prompt = args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    ids = sample(model, tok.encode(prompt).ids, args.max_tokens, args.temperature, args.top_p, eod, args.seed)
    print(prompt + tok.decode(ids))
    return 0
