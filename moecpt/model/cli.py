"""``moecpt inspect``: parameter and FLOP counts of a preset or recipe model, computed on the meta device."""

from __future__ import annotations

import argparse
import json

from moecpt.config import load_recipe, recipe_from_dict
from moecpt.data.prepared import PreparedData
from moecpt.errors import MoecptError
from moecpt.model.flops import model_stats


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="parameters and FLOPs per token of a model preset or recipe")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model preset name (e.g. paper-granular, demo-switch)")
    src.add_argument("--recipe", help="recipe TOML whose [model] to inspect")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe/model key")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size when the model leaves it unset")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.vocab_size is not None and args.vocab_size < 2:
        raise MoecptError(f"--vocab-size {args.vocab_size} must be a whole number >= 2 (the tokenizer's vocabulary)")
    if args.preset:
        recipe = recipe_from_dict({"model": {"preset": args.preset}}, [f"model.{s}" if not s.startswith("model.")
                                                                      else s for s in args.set])
    else:
        recipe = load_recipe(args.recipe, args.set)
    cfg = recipe.model
    if cfg.vocab_size is not None and args.vocab_size is not None and args.vocab_size != cfg.vocab_size:
        raise MoecptError(f"--vocab-size {args.vocab_size} differs from the model's vocab_size={cfg.vocab_size}; "
                          f"--vocab-size only fills an unset one: use --set model.vocab_size={args.vocab_size} "
                          "to change it")
    if cfg.vocab_size is None:
        if args.vocab_size is None:
            try:
                vocab = PreparedData.open(recipe.data.path).vocab_size
            except MoecptError:
                raise MoecptError("the model's vocab_size comes from the data; pass --vocab-size N") from None
        else:
            vocab = args.vocab_size
        cfg = cfg.model_copy(update={"vocab_size": vocab})
    stats = {"preset": args.preset, **model_stats(cfg)}
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        for k, v in stats.items():
            print(f"{k:>26}: {v:,}" if isinstance(v, int) else f"{k:>26}: {v}")
    return 0
