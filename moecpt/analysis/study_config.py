"""Typed study recipes for ``moecpt study`` (the router-robustness CPT study of Thérien et al. 2025).

A study recipe lists models, the old (pre-training) sources, the shifted sources CPT moves to, the replay
fractions and CPT schedules to compare, and the compute of each phase. From it the study plans its stages::

    pretrain/<model>                         CosineInf on the old sources; keeps the pre-anneal checkpoint
    cpt/<model>/<shift>/<schedule>-r<replay> from the pre-anneal checkpoint (inf) or the annealed one (rewarm)
    retrain/<model>/<shift>                  from scratch on the union, cosine, pre-training + CPT tokens

Schedules (PAPERS.md, "Data, replay, schedules"): pre-training uses CosineInf (warm-up, cosine cool-down to a
constant LR ending at 70%, constant to 80%, exponential anneal); ``inf`` CPT continues at the constant LR from the
pre-anneal checkpoint and anneals at its own end; ``rewarm`` CPT re-warms from the decayed checkpoint's LR to the
peak and re-decays with a cosine (Ibrahim et al. 2024). Replay is compute-equivalent: with replay r the CPT mixture
is ``{shift: 1 - r, old: r}`` inside the same step budget.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from moecpt.config import (
    MODEL_PRESETS,
    OptimConfig,
    RouterKind,
    TrainConfig,
    _Strict,
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


class StudyData(_Strict):
    path: str = Field("demo", description="prepared data folder, or 'demo'")
    old: list[str] = Field(default_factory=lambda: ["english"], description="pre-training sources (equal weights)")
    shifts: list[str] = Field(default_factory=lambda: ["code"], description="new sources, one CPT target each")
    seq_len: int = Field(128, ge=2)
    allow_repeat: bool = False


class StudyPhase(_Strict):
    steps: int = Field(ge=1)
    warmup_fraction: float = Field(0.01, ge=0, le=1)


class StudyCPT(_Strict):
    steps: int = Field(ge=1)
    replay: list[float] = Field(default_factory=lambda: [0.0, 0.3])
    schedules: list[str] = Field(default_factory=lambda: ["inf", "rewarm"])
    rewarm_warmup_fraction: float = Field(0.01, ge=0, le=1)
    models: list[str] | None = Field(None, description="models to continue; None = all")

    @model_validator(mode="after")
    def _check(self) -> "StudyCPT":
        for r in self.replay:
            if not 0 <= r < 1:
                raise ValueError(f"cpt.replay value {r} must be in [0, 1)")
        for s in self.schedules:
            if s not in ("inf", "rewarm"):
                raise ValueError(f"cpt.schedules value {s!r} is not allowed; allowed: 'inf', 'rewarm'")
        return self


class StudyRetrain(_Strict):
    models: list[str] = Field(default_factory=list, description="models re-trained from scratch on the union")


class StudyEval(_Strict):
    batches: int = Field(8, ge=1, description="held-out batches per source for the final evaluations")
    batch_size: int = Field(16, ge=1)


class StudyRecipe(_Strict):
    """A whole study (one TOML file: ``recipes/study/*.toml``)."""

    name: str = "study"
    data: StudyData = Field(default_factory=StudyData)
    models: list[StudyModel]
    pretrain: StudyPhase
    cpt: StudyCPT
    retrain: StudyRetrain = Field(default_factory=StudyRetrain)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig, description="passed to every run (steps ignored)")
    eval: StudyEval = Field(default_factory=StudyEval)
    eval_points: int = Field(10, ge=1, description="validation evaluations per run (eval_every = steps // this)")
    const_lr_fraction: float = Field(0.55, gt=0, le=1, description="CosineInf constant LR / peak (1.65e-4/3e-4)")

    @model_validator(mode="after")
    def _check(self) -> "StudyRecipe":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"study model names must be unique, got {names}")
        for group, listed in (("cpt.models", self.cpt.models or []), ("retrain.models", self.retrain.models)):
            for n in listed:
                if n not in names:
                    raise ValueError(f"{group} names {n!r}, which is not among the study's models {names}")
        overlap = set(self.data.old) & set(self.data.shifts)
        if overlap:
            raise ValueError(f"sources {sorted(overlap)} are both old and shifted; a shift must be a new source")
        return self


def load_study_recipe(path, overrides: list[str] | None = None) -> StudyRecipe:
    """Read and validate a study TOML (``--set`` overrides allowed).

    Raises:
        MoecptError: one line naming the bad key.
    """
    from moecpt.config import apply_overrides

    raw = apply_overrides(read_toml(path), overrides or [])
    return build_section(StudyRecipe, raw)
