"""The trainer's runtime for distributed and simulated runs: :class:`Distributed`, and :func:`build_sync`.

The trainer does not import this package (docs/design.md, rule A2): it receives a runtime object. ``moecpt
pretrain`` / ``moecpt cpt`` pass :class:`Distributed`; from Python::

    from moecpt.distributed.runtime import Distributed
    Trainer(recipe, out, simulate_workers=4, parallel=Distributed()).run()

Without it the trainer runs one process with the no-communication :class:`moecpt.train.parallel.SingleProcess`.
"""

from __future__ import annotations

from typing import Any

import torch

from moecpt.config import DispatchKind, Recipe, SyncKind
from moecpt.distributed import launch
from moecpt.distributed.ddp import DDPSync, FSDPSync
from moecpt.distributed.ep_fsdp import ExpertParallelFSDPSync
from moecpt.distributed.ep_sync import ExpertParallelSync
from moecpt.distributed.islands import IslandSync
from moecpt.distributed.islands_ep import IslandEPSync
from moecpt.distributed.islands_fsdp import IslandFSDPSync
from moecpt.distributed.local_sgd import LocalSGDSync
from moecpt.distributed.mesh import Mesh, build_mesh, check_expert_split
from moecpt.distributed.simulate import SimulatedDDPSync
from moecpt.distributed.strategy import LOCAL_SYNCS, SyncStrategy
from moecpt.errors import MoecptError
from moecpt.lopt import load_pretrained
from moecpt.train.parallel import DistInfo, SingleProcess, check_checkpoint_format


class Distributed(SingleProcess):
    """Runtime of a rank of a ``torchrun`` job (the default process group, when one is initialised, e.g. by
    :func:`moecpt.distributed.launch.session`), or of a single process that simulates workers or runs a
    local-SGD family sync. With world size 1 every collective is the identity, as in :class:`SingleProcess`."""

    def info(self) -> DistInfo:
        return launch.rank_info()

    def check_same_config(self, identity: dict[str, Any]) -> None:
        launch.check_same_config(identity)

    def run_on_main(self, fn):
        return launch.run_on_main(fn)

    def broadcast_object(self, obj: Any) -> Any:
        return launch.broadcast_object(obj)

    def check_launch(self, recipe: Recipe, info: DistInfo, simulate_workers: int | None = None,
                     outer_optimizer: Any = None) -> None:
        check_launch(recipe, info, simulate_workers, outer_optimizer)

    def build_sync(self, recipe: Recipe, info: DistInfo, device: torch.device, simulate_workers: int | None = None,
                   outer_optimizer: Any = None) -> SyncStrategy:
        return build_sync(recipe, info, device, simulate_workers, outer_optimizer)

    def is_distributed_error(self, exc: BaseException) -> bool:
        return launch.is_distributed_error(exc)

    def publish_error(self, message: str) -> None:
        launch.publish_error(message)

    def diagnose(self) -> str:
        return launch.diagnose()


def check_launch(recipe: Recipe, info: DistInfo, simulate_workers: int | None = None,
                 outer_optimizer: Any = None) -> Mesh:
    """Every check of a launch that needs no model, as one-line errors; returns the job's mesh. The one function
    behind ``moecpt pretrain`` / ``cpt`` (before the run folder is claimed, so a refused layout writes nothing),
    :func:`build_sync` and ``moecpt plan`` (with ``DistInfo(world_size=W)``, the rank 0 of a ``W``-rank job), so
    that ``plan`` accepts exactly what a run accepts.

    Raises:
        MoecptError: see :func:`build_sync`; ``train.checkpoint_format = "dcp"`` for checkpoints that hold several
            workers (:func:`moecpt.train.parallel.check_checkpoint_format`); a learned outer optimizer meta-trained
            for another K than the outer step's workers (the islands, or every worker).
    """
    check_checkpoint_format(recipe, simulate_workers)
    kind = recipe.distributed.sync
    local = kind in LOCAL_SYNCS
    if outer_optimizer is not None and not local:
        raise MoecptError(f"an outer optimizer applies to sync = local-sgd, slowmo or diloco, not {kind.value!r}")
    if simulate_workers is not None:
        if simulate_workers < 1:
            raise MoecptError(f"--simulate-workers {simulate_workers}: give a number of workers >= 1")
        if info.distributed:
            raise MoecptError("--simulate-workers runs every worker in one process; do not combine it with torchrun "
                              f"(this is rank {info.rank} of {info.world_size})")
        if kind == SyncKind.FSDP:
            raise MoecptError("sync = 'fsdp' cannot be simulated (it shards one model over real devices); "
                              "simulate 'ddp' or a local-SGD strategy instead")
    workers = simulate_workers or info.world_size
    if recipe.distributed.expert_parallel > 1:
        _check_expert_parallel(recipe, info, simulate_workers)
    mesh = build_mesh(recipe, workers)  # the plan's check, at start: a mesh that does not divide is one line
    name = recipe.distributed.outer()[0] if local and outer_optimizer is None else None
    if mesh.islands > 1 and recipe.distributed.island_sync == SyncKind.FSDP:
        if simulate_workers is not None:
            raise MoecptError("distributed.island_sync = 'fsdp' cannot be simulated (it shards each island over "
                              "real devices); simulate island_sync = 'ddp', or launch the ranks with torchrun")
    if name in ("lagg-a", "lopt-a") or (name or "").endswith(".safetensors"):
        load_pretrained(name, workers=mesh.islands if mesh.islands > 1 else workers)  # K checked, one line
    return mesh


def build_sync(recipe: Recipe, info: DistInfo, device: torch.device, simulate_workers: int | None = None,
               outer_optimizer: Any = None) -> SyncStrategy:
    """The strategy for this recipe and launch.

    Args:
        recipe: its ``[distributed]`` section chooses the strategy.
        info: this process's rank / world size (:func:`moecpt.distributed.launch.rank_info`).
        device: the training device.
        simulate_workers: run this many workers in this one process (``--simulate-workers``).
        outer_optimizer: overrides ``distributed.outer_optimizer`` (local-SGD family): a
            :class:`moecpt.lopt.OuterOptimizer`, or a factory ``params -> torch.optim.Optimizer``.

    Raises:
        MoecptError: simulation under a multi-process launch or with FSDP (flat or inside islands); an outer
            optimizer for a sync that has none; a mesh that does not divide the world, the experts or the batch
            (:func:`moecpt.distributed.mesh.build_mesh`); expert parallelism in one process, with simulated workers,
            with a sync other than DDP or FSDP2 (or a local-SGD family one with islands), with FSDP2 inside islands,
            or with the loop dispatch.
    """
    mesh = check_launch(recipe, info, simulate_workers, outer_optimizer)
    local = recipe.distributed.sync in LOCAL_SYNCS
    kind = recipe.distributed.sync
    workers = simulate_workers or info.world_size
    local_workers = simulate_workers or 1
    if mesh.islands > 1 and recipe.distributed.island_sync == SyncKind.FSDP:
        sync: SyncStrategy = IslandFSDPSync(recipe, info, mesh, device, outer=outer_optimizer)
    elif mesh.islands > 1 and mesh.ep > 1:
        sync = IslandEPSync(recipe, info, mesh, device, outer=outer_optimizer)
    elif mesh.islands > 1:
        sync = IslandSync(recipe, info, mesh, local_workers, device, outer=outer_optimizer)
    elif local:
        sync = LocalSGDSync(recipe, info, workers, local_workers, device, outer=outer_optimizer)
    elif simulate_workers is not None:
        sync = SimulatedDDPSync(recipe, info, workers, local_workers, device)
    elif mesh.ep > 1 and kind == SyncKind.FSDP:
        sync = ExpertParallelFSDPSync(recipe, info, workers, 1, device, mesh=mesh,
                                      timeout_s=recipe.distributed.timeout_s)
    elif mesh.ep > 1:
        sync = ExpertParallelSync(recipe, info, workers, 1, device, mesh=mesh, timeout_s=recipe.distributed.timeout_s)
    elif info.distributed and kind == SyncKind.DDP:
        sync = DDPSync(recipe, info, workers, 1, device)
    elif info.distributed and kind == SyncKind.FSDP:
        sync = FSDPSync(recipe, info, workers, 1, device)
    else:
        sync = SyncStrategy(recipe, info, 1, 1, device)
    sync.local_batch_rows(recipe.train.batch_size)
    return sync


def _check_expert_parallel(recipe: Recipe, info: DistInfo, simulate_workers: int | None) -> None:
    """One-line refusals of what EP does not run: a dense model or experts it does not divide, a sync other than DDP
    or FSDP2 (without islands), FSDP2 inside islands, the loop dispatch, a single process or simulated workers (the
    world is checked by ``build_mesh``). With islands the sync is a local-SGD family one (the config checks it)."""
    d, moe = recipe.distributed, recipe.model.moe
    check_expert_split(recipe)
    if d.islands > 1 and d.island_sync != SyncKind.DDP:
        raise MoecptError(f"distributed.expert_parallel={d.expert_parallel} inside islands runs with island_sync = "
                          f"'ddp' (DDP over the non-expert parameters), not {d.island_sync.value!r}; set "
                          "distributed.island_sync = 'ddp', or expert_parallel = 1")
    if d.islands == 1 and d.sync not in (SyncKind.DDP, SyncKind.FSDP):
        raise MoecptError(f"distributed.expert_parallel={d.expert_parallel} runs with sync = 'ddp' or 'fsdp' (DDP or "
                          f"FSDP2 over the non-expert parameters), not sync = {d.sync.value!r}; set distributed.sync "
                          "= 'ddp' or 'fsdp', or expert_parallel = 1")
    if moe is not None and moe.dispatch == DispatchKind.LOOP:
        raise MoecptError("model.moe.dispatch = 'loop' is the single-process reference path; use 'grouped' with "
                          "distributed.expert_parallel > 1")
    if simulate_workers is not None:
        raise MoecptError(f"distributed.expert_parallel={d.expert_parallel} splits the experts over real ranks, "
                          "which --simulate-workers does not have; launch a multiple of "
                          f"{d.expert_parallel} ranks with torchrun instead")
    if not info.distributed:
        raise MoecptError(f"distributed.expert_parallel={d.expert_parallel} splits the experts over ranks, but this "
                          f"is one process; launch a multiple of {d.expert_parallel} ranks with torchrun "
                          "(torchrun --nproc-per-node N -m moecpt ...)")
