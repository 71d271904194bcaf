"""``moecpt plan``: the memory and communication plan of a recipe on ``--world`` ranks, before anything runs (the
arithmetic and its sources: :mod:`moecpt.distributed.plan`). Nothing is trained, allocated or written: the model is
built on the meta device, and the data folder is opened only when the model's vocabulary comes from it. The layout is
checked by :func:`moecpt.distributed.runtime.check_launch`, the function a run calls at its start, so a layout that
``plan`` accepts is one ``pretrain`` accepts on ``W`` ranks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moecpt.config import ModelConfig, Recipe, load_recipe
from moecpt.data.prepared import PreparedData
from moecpt.distributed.cli import check_diloco_rounds
from moecpt.distributed.plan import job_plan
from moecpt.distributed.runtime import check_launch
from moecpt.errors import MoecptError
from moecpt.model.flops import model_stats
from moecpt.storage.preflight import human_bytes
from moecpt.train.checkpoint import load_checkpoint
from moecpt.train.parallel import DistInfo
from moecpt.train.trainer import cpt_model_config

GIB = 1024**3


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="memory and communication per rank of a recipe on W ranks (no run)")
    p.add_argument("--recipe", required=True, help="recipe TOML (bundled ones: recipes/*.toml)")
    p.add_argument("--world", required=True, type=int, metavar="W", help="ranks of the job (GPUs, processes)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key, validated like the file (repeatable)")
    p.add_argument("--from", dest="parent", default=None, metavar="CKPT",
                   help="plan a CPT run from this checkpoint or run folder (its architecture is the model)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, metavar="X",
                   help="say whether the peak per rank fits in X GiB of device memory")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def resolve_model(recipe: Recipe, parent: str | None) -> ModelConfig:
    """The model the run would train: the recipe's (its vocabulary from the data folder when unset), or, with
    ``parent``, the parent checkpoint's architecture as ``moecpt cpt`` resolves it.

    Raises:
        MoecptError: no ``[model]`` and no parent; a missing parent; an architecture change in CPT; an unset
            vocabulary whose data folder cannot be opened; ``data.seq_len`` above the model's ``max_seq_len``.
    """
    if parent is not None:
        if not Path(parent).exists():
            raise MoecptError(f"--from {parent!r} does not exist; give a checkpoint or run folder")
        ck = load_checkpoint(parent, verify=False)  # its meta only: the architecture
        return cpt_model_config(recipe.model, ck.meta, ck.path, recipe.data.seq_len)
    if "model" not in recipe.model_fields_set:
        raise MoecptError("the recipe has no [model] table, so there is nothing to plan; add one, or give --from "
                          "CKPT for a CPT recipe")
    cfg = recipe.model
    if cfg.vocab_size is None:
        try:
            vocab = PreparedData.open(recipe.data.path).vocab_size
        except MoecptError as exc:
            raise MoecptError(f"the model's vocab_size comes from the data, which cannot be read ({exc}); "
                              "give --set model.vocab_size=N") from None
        cfg = cfg.model_copy(update={"vocab_size": vocab})
    if recipe.data.seq_len > cfg.max_seq_len:
        raise MoecptError(f"data.seq_len={recipe.data.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    return cfg


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    check_diloco_rounds(recipe)
    if args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0:
        raise MoecptError(f"--gpu-memory-gib {args.gpu_memory_gib} must be a positive number of GiB")
    if args.world < 1:
        raise MoecptError(f"--world {args.world}: a world of {args.world} ranks cannot run; give at least 1")
    # rank 0 of a W-rank job: the very checks `moecpt pretrain` runs at its start, so plan refuses what it refuses
    mesh = check_launch(recipe, DistInfo(rank=0, world_size=args.world))
    cfg = resolve_model(recipe, args.parent)
    stats = model_stats(cfg, recipe.data.seq_len)
    gpu = None if args.gpu_memory_gib is None else int(args.gpu_memory_gib * GIB)
    plan = job_plan(recipe, cfg, stats, mesh, gpu)
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0


def _b(n: int) -> str:
    return f"{human_bytes(n):>10}"


def render(plan: dict[str, Any]) -> str:
    """The plan as text: one line per quantity, bytes in binary units (GiB), per rank."""
    m, lay, p, mem, comm = plan["mesh"], plan["layout"], plan["params"], plan["memory_bytes"], plan["comm_bytes"]
    step = ("nothing (each rank is a worker of its own)" if lay["step"] == "none"
            else f"{ {'ddp': 'DDP', 'fsdp': 'FSDP2'}[lay['step']]} over {lay['step_group']} rank(s)")
    lines = [
        f"plan of {plan['recipe']!r} on {m['world']} ranks: {m['islands']} island(s) x {m['dp']} dp x {m['ep']} ep",
        f"  every step: {step}"
        + (f"; outer {lay['outer']} every {lay['local_steps']} steps over {lay['outer_workers']} workers"
           if lay["outer"] else ""),
        f"  per rank: {lay['rows_per_rank']} sequences a step in micro-batches of {lay['micro_batch']}; "
        f"inner {lay['inner_optimizer']}; activations {'bf16' if lay['bf16'] else 'fp32'}",
        "parameters",
        f"  total {p['total']:,}  active {p['active']:,}  expert {p['expert']:,}  non-expert {p['non_expert']:,}",
        f"  on one rank {p['per_rank']['total']:,} (expert {p['per_rank']['expert']:,}, "
        f"non-expert {p['per_rank']['non_expert']:,})",
        "memory per rank",
    ]
    for key, label in (("weights", "weights (fp32)"), ("grads", "gradients (fp32)"),
                       ("optimizer_state", "optimizer state"), ("outer_state", "outer state"),
                       ("fsdp_gathered", "FSDP unit, unsharded"), ("activations", "activations (1 micro-batch)")):
        lines.append(f"  {label:<28}{_b(mem[key])}")
    lines.append(f"  {'peak (sum)':<28}{_b(mem['total'])}")
    fits = plan["fits"]
    if fits is not None:
        verdict = "fits" if fits["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {human_bytes(fits['gpu_memory_bytes'])} "
                     f"(headroom {human_bytes(fits['headroom_bytes'])})")
    per_step = comm["per_step"]
    lines += ["communication sent per rank (as much is received)",
              f"  {'island, every step':<28}{_b(per_step['island'])}",
              f"  {'EP all-to-all, every step':<28}{_b(per_step['ep'])}",
              f"  {'outer round, every round':<28}{_b(comm['per_round'])}",
              f"  {'outer round, per step':<28}{_b(per_step['cross_island'])}",
              f"  {'total per step':<28}{_b(per_step['total'])}"]
    return "\n".join(lines)
