"""The study's plan: its stages (one training run each), their keys, recipes and dependencies, over the grid of
models x shifts x CPT schedules x replay fractions x seeds of a :class:`~moecpt.study.config.StudyRecipe`.

Keys and schedules are described in :mod:`moecpt.study.config` and ``docs/study-rules.md``; a stage's folder is
``DIR/runs/<key>-<hash>``, ``hash`` fingerprinting its full configuration and its parent's, so an edited recipe
reruns only the stages it changed. Planning reads no files and starts nothing (that is :mod:`moecpt.study.runner`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from moecpt.config import (
    DataConfig,
    OptimConfig,
    Recipe,
    ScheduleConfig,
    ScheduleKind,
    identity_json,
    recipe_from_dict,
)
from moecpt.study.config import CPTSchedule, OptimizerState, StudyModel, StudyRecipe
from moecpt.train.checkpoint import checkpoint_dir_name
from moecpt.train.schedules import anneal_start_step, run_end_step, warmup_end_step

__all__ = ["Stage", "plan_stages"]


@dataclass
class Stage:
    """One training run of the study."""

    key: str  # e.g. "s0/cpt/granular-pb/code/inf-r0.3"
    kind: str  # pretrain | cpt | control | retrain
    model: str
    recipe: Recipe
    seed: int = 0
    parent: "Stage | None" = None
    parent_point: str | None = None  # "pre_anneal" | "final"
    shift: str | None = None
    replay: float | None = None
    schedule: str | None = None
    control: str | None = None  # cpt runs: the key of their no-shift control
    deps: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        ident = {"recipe": identity_json(self.recipe), "parent": self.parent.fingerprint if self.parent
                 else None, "point": self.parent_point}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]

    def run_dir(self, root: Path) -> Path:
        return root / "runs" / f"{self.key}-{self.fingerprint}"

    def end_step(self) -> int:
        return run_end_step(self.recipe.schedule, self.recipe.train.steps)

    @property
    def optimizer_state(self) -> str | None:
        """``carried`` / ``fresh`` for runs from a parent checkpoint; None for runs from scratch."""
        if self.parent is None:
            return None
        return "carried" if self.recipe.cpt.load_optimizer else "fresh"

    @property
    def warmup_steps(self) -> int:
        """The run's warm-up steps, as its LR schedule counts them."""
        return warmup_end_step(self.recipe.schedule, self.recipe.train.steps)

    def parent_checkpoint(self, root: Path) -> Path | None:
        if self.parent is None:
            return None
        p = self.parent
        step = p.end_step() if self.parent_point == "final" else anneal_start_step(p.recipe.schedule,
                                                                                   p.recipe.train.steps)
        return p.run_dir(root) / "checkpoints" / checkpoint_dir_name(step)




def _run_recipe(study: StudyRecipe, m: StudyModel, name: str, mixture: dict[str, float], steps: int,
                schedule: ScheduleConfig, seed: int, optim: OptimConfig | None = None,
                load_optimizer: bool = False) -> Recipe:
    train = study.train.model_copy(update={"steps": steps, "seed": seed})
    eval_every = max(1, steps // study.eval_points)
    # keep_last=1: a study holds many runs; the pre-anneal milestone is kept anyway for the inf CPT runs
    train = train.model_copy(update={"eval_every": eval_every, "keep_last": 1,
                                     "checkpoint_every": min(study.train.checkpoint_every, steps)})
    raw = {
        "name": name,
        "model": m.model_table(),
        "data": DataConfig(path=study.data.path, mixture=mixture, seq_len=study.data.seq_len,
                           allow_repeat=study.data.allow_repeat).model_dump(mode="json"),
        "optim": (optim or study.optim).model_dump(mode="json"),
        "schedule": schedule.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "cpt": {"load_optimizer": load_optimizer},
    }
    return recipe_from_dict(raw)


def _cpt_schedule(study: StudyRecipe, schedule: CPTSchedule) -> tuple[ScheduleConfig, OptimConfig, str, bool]:
    """(LR schedule, optimizer settings, parent point, carry the optimizer state) of a CPT run (and its control).

    ``inf`` continues at the constant LR and anneals over the last 20%; a fresh state is first warmed up to the
    constant LR (the peak of that run is the constant). ``rewarm`` warms up from the minimum LR to the peak and
    re-decays with a cosine; that re-warm is also the fresh state's warm-up. See ``docs/study-rules.md``."""
    cpt = study.cpt
    const_lr = study.const_lr_fraction * study.optim.lr
    carry = cpt.optimizer_state(schedule) == OptimizerState.CARRY
    if schedule == CPTSchedule.INF:
        warm = 0.0 if carry else cpt.fresh_warmup_fraction
        sched = ScheduleConfig(kind=ScheduleKind.COSINE_INF, warmup_fraction=warm, const_lr=const_lr,
                               cooldown_fraction=0.0, constant_fraction=max(0.0, 0.8 - warm))
        optim = study.optim if carry else study.optim.model_copy(update={"lr": const_lr})
        return sched, optim, "pre_anneal", carry
    sched = ScheduleConfig(kind=ScheduleKind.COSINE, warmup_fraction=cpt.rewarm_warmup_fraction,
                           warmup_start_lr=study.optim.min_lr)
    return sched, study.optim, "final", carry


def plan_stages(study: StudyRecipe) -> list[Stage]:
    """All stages of ``study`` in dependency order (per seed: pre-training and re-training, then CPT runs and
    their no-shift controls)."""
    stages: list[Stage] = []
    for seed in study.seeds:
        stages += _plan_seed(study, seed)
    return stages


def _plan_seed(study: StudyRecipe, seed: int) -> list[Stage]:
    pt, cpt = study.pretrain, study.cpt
    const_lr = study.const_lr_fraction * study.optim.lr
    old = {s: 1.0 / len(study.data.old) for s in study.data.old}
    pt_sched = ScheduleConfig(kind=ScheduleKind.COSINE_INF, warmup_fraction=pt.warmup_fraction, const_lr=const_lr,
                              cooldown_fraction=max(0.0, 0.7 - pt.warmup_fraction), constant_fraction=0.1)
    tag = f"s{seed}"
    stages: list[Stage] = []
    pretrain: dict[str, Stage] = {}
    for m in study.models:
        st = Stage(key=f"{tag}/pretrain/{m.name}", kind="pretrain", model=m.name, seed=seed,
                   recipe=_run_recipe(study, m, f"{tag}-pretrain-{m.name}", old, pt.steps, pt_sched, seed))
        pretrain[m.name] = st
        stages.append(st)
    by_name = {m.name: m for m in study.models}
    for name in study.retrain.models:
        m = by_name[name]
        total = pt.steps + cpt.steps
        for shift in study.retrain.shifts or study.data.shifts:
            mix = {s: w * pt.steps / total for s, w in old.items()} | {shift: cpt.steps / total}
            sched = ScheduleConfig(kind=ScheduleKind.COSINE, warmup_fraction=pt.warmup_fraction)
            stages.append(Stage(key=f"{tag}/retrain/{name}/{shift}", kind="retrain", model=name, shift=shift,
                                seed=seed, recipe=_run_recipe(study, m, f"{tag}-retrain-{name}-{shift}", mix, total,
                                                              sched, seed)))
    controls: dict[tuple[str, str], str] = {}
    for name, schedule in study.control_cells():
        sched, optim, point, carry = _cpt_schedule(study, schedule)
        key = f"{tag}/control/{name}/{schedule.value}"
        controls[(name, schedule.value)] = key
        stages.append(Stage(key=key, kind="control", model=name, schedule=schedule.value, seed=seed,
                            parent=pretrain[name], parent_point=point, deps=[pretrain[name].key],
                            recipe=_run_recipe(study, by_name[name], key.replace("/", "-"), dict(old), cpt.steps,
                                               sched, seed, optim, carry)))
    for name, shift, schedule, replay in study.cpt_cells():
        sched, optim, point, carry = _cpt_schedule(study, schedule)
        mix = {shift: 1.0 - replay} | {s: replay * w for s, w in old.items()}
        key = f"{tag}/cpt/{name}/{shift}/{schedule.value}-r{replay:g}"
        stages.append(Stage(key=key, kind="cpt", model=name, shift=shift, replay=replay, schedule=schedule.value,
                            seed=seed, parent=pretrain[name], parent_point=point, deps=[pretrain[name].key],
                            control=controls.get((name, schedule.value)),
                            recipe=_run_recipe(study, by_name[name], key.replace("/", "-"), mix, cpt.steps, sched,
                                               seed, optim, carry)))
    return stages
