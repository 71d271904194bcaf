"""Typed study recipes for ``moecpt study`` (the router-robustness CPT study of Thérien et al. 2025).

A study recipe lists models, the old (pre-training) sources, the shifted sources CPT moves to, the replay
fractions and CPT schedules to compare, and the compute of each phase. From it the study plans its stages::

    s<seed>/pretrain/<model>                         CosineInf on the old sources; keeps the pre-anneal checkpoint
    s<seed>/cpt/<model>/<shift>/<schedule>-r<replay> from the pre-anneal checkpoint (inf) or the annealed one (rewarm)
    s<seed>/control/<model>/<schedule>               the no-shift control: as the CPT runs, old sources only
    s<seed>/retrain/<model>/<shift>                  from scratch on the union, cosine, pre-training + CPT tokens

Every stage runs once per seed of ``seeds`` (the seed sets the initialisation and the data order). The decision
rules that read these runs are in ``docs/study-rules.md``.

Schedules (Ibrahim et al. 2024, arXiv 2403.08763; docs/references.md): pre-training uses CosineInf (warm-up, cosine cool-down to a
constant LR ending at 70%, constant to 80%, exponential anneal); ``inf`` CPT continues at the constant LR from the
pre-anneal checkpoint and anneals at its own end; ``rewarm`` CPT re-warms from the decayed checkpoint's LR to the
peak and re-decays with a cosine (Ibrahim et al. 2024). Replay is compute-equivalent: with replay r the CPT mixture
is ``{shift: 1 - r, old: r}`` inside the same step budget.

Optimizer state across the CPT boundary (``docs/study-rules.md``): ``inf`` CPT carries the parent's AdamW moments
by default (continuing at the constant LR is continuing the run); ``rewarm`` CPT starts a fresh state, which its
re-warm from the minimum LR warms up (GPT-NeoX ``finetune``). A fresh ``inf`` state is warmed up linearly to the
constant LR over ``cpt.fresh_warmup_fraction`` of the run.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, StrictInt, model_validator

from moecpt.config import (
    MODEL_PRESETS,
    Bool,
    Float,
    Int,
    OptimConfig,
    RouterKind,
    TrainConfig,
    _Strict,
    apply_overrides,
    build_section,
    read_toml,
)
from moecpt.errors import MoecptError


class StudyModel(_Strict):
    """One architecture of the study: a model preset plus a routing strategy."""

    name: str
    preset: str
    router: RouterKind | None = Field(None, description="routing strategy of MoE presets; None = preset default")
    overrides: dict[str, Any] = Field(default_factory=dict, description="extra [model] keys")

    @model_validator(mode="after")
    def _check(self) -> "StudyModel":
        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"preset {self.preset!r} is unknown; allowed: {', '.join(sorted(MODEL_PRESETS))}")
        if not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"model name {self.name!r} must be letters, digits, '-' or '_' (it names a folder)")
        return self

    def model_table(self) -> dict[str, Any]:
        """The ``[model]`` table of the runs of this architecture."""
        table: dict[str, Any] = {"preset": self.preset, **self.overrides}
        if self.router is not None:
            if MODEL_PRESETS[self.preset].get("moe") is None:
                raise MoecptError(f"study model {self.name!r}: preset {self.preset!r} is dense and has no router")
            moe = dict(table.get("moe", {}))
            moe["router"] = {**moe.get("router", {}), "kind": self.router.value}
            table["moe"] = moe
        return table

    @property
    def arch(self) -> str:
        p = MODEL_PRESETS[self.preset]
        if p.get("moe") is None:
            return "dense"
        return "granular" if p["moe"].get("num_shared_experts", 0) or p["moe"].get("granularity", 1) > 1 else "switch"


class CPTSchedule(StrEnum):
    """``inf``: continue an infinite schedule at its constant LR from the pre-anneal checkpoint, anneal at the end;
    ``rewarm``: re-warm from the annealed checkpoint's LR to the peak, cosine re-decay (Ibrahim et al. 2024)."""

    INF = "inf"
    REWARM = "rewarm"


class OptimizerState(StrEnum):
    """What CPT does with the parent's AdamW moments: ``carry`` them, or start ``fresh`` (warmed up)."""

    CARRY = "carry"
    FRESH = "fresh"


class StudyData(_Strict):
    path: str = Field("demo", description="prepared data folder, or 'demo'")
    old: list[str] = Field(default_factory=lambda: ["english"], min_length=1,
                           description="pre-training sources (equal weights)")
    shifts: list[str] = Field(default_factory=lambda: ["code"], min_length=1,
                              description="new sources, one CPT target each")
    seq_len: Int = Field(128, ge=2)
    allow_repeat: Bool = False


class StudyPhase(_Strict):
    steps: Int = Field(ge=1)
    warmup_fraction: Float = Field(0.01, ge=0, le=1)


class CPTCells(_Strict):
    """A sub-grid of CPT runs: every combination of the listed values (None = the ``[cpt]`` table's value)."""

    models: list[str] | None = Field(None, min_length=1)
    shifts: list[str] | None = Field(None, min_length=1)
    schedules: list[CPTSchedule] | None = Field(None, min_length=1)
    replay: list[Float] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "CPTCells":
        _check_replays(self.replay or [], "cpt.cells replay")
        return self


def _check_replays(values: list[float], where: str) -> None:
    for r in values:
        if not 0 <= r < 1:
            raise ValueError(f"{where} value {r} must be in [0, 1)")


class StudyCPT(_Strict):
    steps: Int = Field(ge=1)
    replay: list[Float] = Field(default_factory=lambda: [0.0, 0.3], min_length=1)
    schedules: list[CPTSchedule] = Field(default_factory=lambda: [CPTSchedule.INF, CPTSchedule.REWARM], min_length=1)
    rewarm_warmup_fraction: Float = Field(0.01, ge=0, le=1)
    models: list[str] | None = Field(None, min_length=1, description="models to continue; None = all")
    cells: list[CPTCells] | None = Field(
        None, min_length=1, description="the CPT runs as a union of sub-grids; None = the full grid models x shifts x schedules x "
                          "replay")
    inf_optimizer: OptimizerState = Field(OptimizerState.CARRY, description="inf CPT: the parent's AdamW moments")
    rewarm_optimizer: OptimizerState = Field(OptimizerState.FRESH, description="rewarm CPT: the parent's moments")
    fresh_warmup_fraction: Float = Field(
        0.02, ge=0, le=1, description="inf CPT with a fresh optimizer state: linear warm-up to the constant LR")

    @model_validator(mode="after")
    def _check(self) -> "StudyCPT":
        _check_replays(self.replay, "cpt.replay")
        return self

    def optimizer_state(self, schedule: CPTSchedule) -> OptimizerState:
        return self.inf_optimizer if schedule == CPTSchedule.INF else self.rewarm_optimizer


class StudyControls(_Strict):
    """No-shift controls: for each listed model and schedule, a CPT run on the old sources only (same parent,
    schedule, steps, optimizer state and seed as the CPT runs), so an optimisation artefact cancels."""

    models: list[str] | None = Field(None, description="None = every model that has CPT runs; [] = no controls")
    schedules: list[CPTSchedule] | None = Field(None, description="None = every schedule of the CPT runs")


class StudyRetrain(_Strict):
    models: list[str] = Field(default_factory=list, description="models re-trained from scratch on the union")
    shifts: list[str] | None = Field(None, description="shifts to re-train on; None = all")


class StudyEval(_Strict):
    batches: Int = Field(8, ge=1, description="held-out batches per source for the final evaluations")
    batch_size: Int = Field(16, ge=1)


class StudyRecipe(_Strict):
    """A whole study (one TOML file: ``recipes/study/*.toml``)."""

    name: str = "study"
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], min_length=1,
                             description="every stage runs once per seed (initialisation and data order)")
    data: StudyData = Field(default_factory=StudyData)
    models: list[StudyModel]
    pretrain: StudyPhase
    cpt: StudyCPT
    retrain: StudyRetrain = Field(default_factory=StudyRetrain)
    controls: StudyControls = Field(default_factory=StudyControls)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig, description="passed to every run (steps ignored)")
    eval: StudyEval = Field(default_factory=StudyEval)
    eval_points: Int = Field(10, ge=1, description="validation evaluations per run (eval_every = steps // this)")
    const_lr_fraction: Float = Field(0.55, gt=0, le=1, description="CosineInf constant LR / peak (1.65e-4/3e-4)")

    @model_validator(mode="after")
    def _check(self) -> "StudyRecipe":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"study model names must be unique, got {names}")
        if len(set(self.seeds)) != len(self.seeds) or any(x < 0 for x in self.seeds):
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        listed_models = [("cpt.models", self.cpt.models or []), ("retrain.models", self.retrain.models),
                         ("controls.models", self.controls.models or [])]
        listed_models += [("cpt.cells models", c.models or []) for c in self.cpt.cells or []]
        for group, listed in listed_models:
            for n in listed:
                if n not in names:
                    raise ValueError(f"{group} names {n!r}, which is not among the study's models {names}")
        listed_shifts = [("retrain.shifts", self.retrain.shifts or [])]
        listed_shifts += [("cpt.cells shifts", c.shifts or []) for c in self.cpt.cells or []]
        for group, listed in listed_shifts:
            for n in listed:
                if n not in self.data.shifts:
                    raise ValueError(f"{group} names {n!r}, which is not among data.shifts {self.data.shifts}")
        overlap = set(self.data.old) & set(self.data.shifts)
        if overlap:
            raise ValueError(f"sources {sorted(overlap)} are both old and shifted; a shift must be a new source")
        self._check_controls()
        return self

    def _check_controls(self) -> None:
        """A control the recipe asks for by name must exist: a listed model or schedule without CPT runs would
        silently give no control (and so no control-relative finding)."""
        cells = self.cpt_cells()
        for m in self.controls.models or []:
            if all(m != c[0] for c in cells):
                raise ValueError(f"controls.models names {m!r}, which has no CPT runs (a control continues a model "
                                 "the study continually pre-trains); add it to the CPT runs or drop it")
        for sch in self.controls.schedules or []:
            if all(sch != c[2] for c in cells):
                raise ValueError(f"controls.schedules names {sch.value!r}, which no CPT run uses; add it to "
                                 "cpt.schedules / cpt.cells or drop it")

    def cpt_cells(self) -> list[tuple[str, str, CPTSchedule, float]]:
        """Every CPT run of one seed as ``(model, shift, schedule, replay)``, in recipe order, without repeats:
        the union of ``cpt.cells`` (each a full grid of its lists), or the full grid of the ``[cpt]`` table."""
        cpt = self.cpt
        grids = cpt.cells if cpt.cells is not None else [CPTCells()]
        out: dict[tuple, None] = {}
        for g in grids:
            for model in g.models or cpt.models or [m.name for m in self.models]:
                for shift in g.shifts or self.data.shifts:
                    for schedule in g.schedules or cpt.schedules:
                        for replay in g.replay if g.replay is not None else cpt.replay:
                            out[(model, shift, CPTSchedule(schedule), float(replay))] = None
        return list(out)

    def control_cells(self) -> list[tuple[str, CPTSchedule]]:
        """The no-shift controls of one seed as ``(model, schedule)``: by default one per (model, schedule) that
        has CPT runs."""
        have = list(dict.fromkeys((m, s) for m, _, s, _ in self.cpt_cells()))
        models = self.controls.models
        schedules = self.controls.schedules
        return [(m, s) for m, s in have if (models is None or m in models) and (schedules is None or s in schedules)]


def load_study_recipe(path, overrides: list[str] | None = None) -> StudyRecipe:
    """Read and validate a study TOML (``--set`` overrides allowed).

    Raises:
        MoecptError: one line naming the bad key; a training recipe (``[model]`` and no ``[[models]]``), which
            ``moecpt pretrain`` runs.
    """
    raw = read_toml(path)
    if "models" not in raw and any(k in raw for k in ("model", "schedule", "distributed")):
        raise MoecptError(f"{path} is a training recipe (it has [model] and no [[models]]), not a study recipe; run "
                          f"it with `moecpt pretrain --recipe {path} --out DIR`, or give `moecpt study` a study "
                          "recipe such as recipes/study/smoke.toml")
    raw = apply_overrides(raw, overrides or [])
    return build_section(StudyRecipe, raw)
