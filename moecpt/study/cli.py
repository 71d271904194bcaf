"""``moecpt study``: run the router-robustness CPT study and write its report (:mod:`moecpt.study.runner`)."""

from __future__ import annotations

import argparse
import json

from moecpt.argtypes import positive_int
from moecpt.config import find_bundled_recipe
from moecpt.study.config import load_study_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="run the router-robustness CPT study and write a report")
    p.add_argument("recipe", nargs="?", default=None, help="study recipe TOML (default: bundled study/demo)")
    p.add_argument("--out", required=True, help="study folder (re-running resumes and reuses finished stages)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a study key")
    p.add_argument("--jobs", type=positive_int, default=None, help="parallel training runs (default: CPU cores)")
    p.set_defaults(func=run_study_cmd)


def run_study_cmd(args: argparse.Namespace) -> int:
    # here, not at the top: the runner brings matplotlib (the report's figures), which no other command needs
    from moecpt.study.runner import run_study

    path = args.recipe or find_bundled_recipe("study/demo")
    study = load_study_recipe(path, args.set)
    results = run_study(study, args.out, jobs=args.jobs, recipe_path=path)
    summary = [{"id": f["id"], "reproduced": f["reproduced"]} for f in results.get("findings", [])]
    print(json.dumps({"out": args.out, "wall_time_s": round(results["wall_time_s"], 1), "findings": summary}))
    return 0
