"""The schema of a study's results, and its one loader.

The study runner (:func:`moecpt.study.evaluation.collect_results`) builds the ``results`` dict; the report writes
it, with what it derives, to ``DIR/study.json``. :func:`parse_results` (a dict) and :func:`load_results` (a
``study.json``) read it once into the frozen records below, whose docstrings are the schema: findings, report and
plots read attributes (through the shared queries of :mod:`moecpt.study.readers`), never dict chains.

Validation: a field of the wrong type, or a required field that is missing, raises :class:`MoecptError` with one
line naming the file and the field (``study.json: runs['s0/cpt/x'].kind missing — ...``). Every other field is
optional and has a documented default, so older results (the one-seed schema: no ``seeds``, no ``sN/`` key
prefixes, no controls, no optimizer fields) and partial studies (a report of what has finished) still load. A
non-finite number (a diverged run; ``study.json`` stores it as ``null``) is read as None: missing, never a value.
Keys the schema does not name (the report's own ``findings``, ``tables``, ... in ``study.json``) are ignored.

Run keys are prefixed by their seed (``s0/pretrain/dense``, ``s1/cpt/granular-pb/code/inf-r0.3``,
``s0/control/granular-pb/inf``); the key without its ``sN/`` prefix (:func:`base_key`) names one *cell* of the study
across its seeds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

from moecpt.errors import MoecptError
from moecpt.study.config import CPTSchedule

__all__ = [
    "RunKind", "OptimizerCarry", "EvalRecord", "ValPoint", "MriPoint", "ModelRecord", "RunRecord",
    "ComparisonRecord", "ForgettingRecord", "StudyResults", "parse_results", "load_results", "as_results",
    "base_key", "key_seed",
]


class RunKind(StrEnum):
    """What a run is: pre-training, CPT on a shift, a no-shift control, or full re-training on the union."""

    PRETRAIN = "pretrain"
    CPT = "cpt"
    CONTROL = "control"
    RETRAIN = "retrain"


class OptimizerCarry(StrEnum):
    """What a run from a parent checkpoint did with the parent's optimizer state (docs/design.md, rule E3)."""

    CARRIED = "carried"
    FRESH = "fresh"


@dataclass(frozen=True)
class EvalRecord:
    """One checkpoint on one source's held-out split (``runs[key].final[source]`` / ``.start[source]``).

    Attributes:
        loss: mean cross-entropy, nats per token; required (None: the evaluation was not finite).
        mri_mean: MoE only: Maximum Routing Imbalance, mean over MoE layers; default None.
        mri_layers: MoE only: the MRI of each MoE layer; default ``()``.
    """

    loss: float | None
    mri_mean: float | None = None
    mri_layers: tuple[float | None, ...] = ()


@dataclass(frozen=True)
class ValPoint:
    """One validation-loss log entry, ``[step, tokens, loss]`` in the file (``runs[key].val[source][i]``): the
    run's optimizer step, the tokens it had trained on (CPT runs count from 0 at their start), the held-out loss in
    nats per token; each None when not finite."""

    step: float | None
    tokens: float | None
    loss: float | None


@dataclass(frozen=True)
class MriPoint:
    """One training-MRI log entry, ``[step, mri_mean, [mri per MoE layer]]`` in the file (``runs[key].train_mri[i]``):
    the optimizer step and the Maximum Routing Imbalance (the largest fraction of a batch's tokens routed to one
    expert) of that step's batch, mean over MoE layers and per layer (optional, default ``()``); each None when not
    finite."""

    step: float | None
    mri_mean: float | None
    mri_layers: tuple[float | None, ...] = ()


@dataclass(frozen=True)
class ModelRecord:
    """One model of the study (``models[name]``); every field defaults to None.

    Attributes:
        name: the study's name for the model (the key).
        preset: model preset; arch: ``dense`` | ``switch`` | ``granular``; router: ``penalty`` | ``sinkhorn`` |
            ``bias`` | None (dense); is_moe: MoE or dense (older results: derived from ``arch``, see :attr:`moe`);
        top_k, num_experts: routing of an MoE (None for dense);
        total_params, active_params: parameter counts; train_flops_per_token: training FLOPs per token.
    """

    name: str
    preset: str | None = None
    arch: str | None = None
    router: str | None = None
    is_moe: bool | None = None
    top_k: int | None = None
    num_experts: int | None = None
    total_params: int | None = None
    active_params: int | None = None
    train_flops_per_token: float | None = None

    @property
    def moe(self) -> bool | None:
        """True for an MoE, False for a dense model, None when unknown (no ``is_moe`` and no ``arch``)."""
        if self.is_moe is not None:
            return self.is_moe
        return None if self.arch is None else self.arch != "dense"


@dataclass(frozen=True)
class RunRecord:
    """One training run of the study (``runs[key]``). ``kind`` and ``model`` are required; the rest default as
    listed.

    Attributes:
        key: the run key (``s0/cpt/granular-pb/code/inf-r0.3``).
        kind: :class:`RunKind`; model: a name of ``models`` (a model the results do not list is allowed).
        seed: the run's seed; default: the key's ``sN/`` prefix, else 0 (the one-seed schema).
        shift: the shifted source (CPT and re-training runs); replay: the replay fraction (CPT runs);
        schedule: :class:`~moecpt.study.config.CPTSchedule` (CPT runs and controls); control: the key of a CPT
            run's no-shift control; optimizer_state: :class:`OptimizerCarry` (runs from a parent);
        warmup_steps: the LR schedule's warm-up steps; parent: the parent run's key; parent_step: the step of the
            parent checkpoint it branched from; start_tokens: tokens the parent had seen there (0 from scratch);
        steps, tokens, train_flops: the run's own steps, tokens and training FLOPs; run_dir: its folder, relative to
            the study folder. All of these default to None.
        val: ``{source: (ValPoint, ...)}``, the validation-loss log; default empty.
        train_mri: ``(MriPoint, ...)``, the training-MRI log (MoE runs); default empty.
        final: ``{source: EvalRecord}`` of the final checkpoint; default empty.
        start: ``{source: EvalRecord}`` of the parent checkpoint (runs from a parent); default None.
    """

    key: str
    kind: RunKind
    model: str
    seed: int = 0
    shift: str | None = None
    replay: float | None = None
    schedule: CPTSchedule | None = None
    control: str | None = None
    optimizer_state: OptimizerCarry | None = None
    warmup_steps: int | None = None
    parent: str | None = None
    parent_step: int | None = None
    start_tokens: int | None = None
    steps: int | None = None
    tokens: int | None = None
    train_flops: float | None = None
    run_dir: str | None = None
    val: Mapping[str, tuple[ValPoint, ...]] = field(default_factory=dict)
    train_mri: tuple[MriPoint, ...] = ()
    final: Mapping[str, EvalRecord] = field(default_factory=dict)
    start: Mapping[str, EvalRecord] | None = None

    @property
    def replay_or_zero(self) -> float:
        """The replay fraction as a float, 0.0 when there is none (the grouping and sorting value)."""
        return float(self.replay) if self.replay else 0.0


@dataclass(frozen=True)
class ComparisonRecord:
    """A CPT or control run's routing against its CPT start checkpoint on the old source (``comparisons[key]``);
    every field optional.

    Attributes:
        source: the source compared on; crs_layers / crs_mean: Continual Router Saturation per MoE layer / mean;
        cvs_layers / cvs_mean: Continual Vocabulary Specialization; chance_overlap: CRS of unrelated routing (k/E);
        coactivation_before_layers / coactivation_after_layers: per MoE layer the ``[E, E]`` co-activation matrix
            before / after (k > 1 only). Sequences default to ``()``, scalars to None.
    """

    source: str | None = None
    crs_layers: tuple[float | None, ...] = ()
    crs_mean: float | None = None
    cvs_layers: tuple[float | None, ...] = ()
    cvs_mean: float | None = None
    chance_overlap: float | None = None
    coactivation_before_layers: tuple[tuple[tuple[float | None, ...], ...], ...] = ()
    coactivation_after_layers: tuple[tuple[tuple[float | None, ...], ...], ...] = ()


@dataclass(frozen=True)
class ForgettingRecord:
    """Losses of a CPT or control run before (CPT start) and after (``forgetting[key]``); every field optional.

    Attributes:
        forgetting / adaptation: ``{source: loss change}`` on the old sources / the shift (nats); default empty.
        mean_forgetting / mean_adaptation: their means; default None.
        loss_before / loss_after: ``{source: loss}`` at the CPT start checkpoint / at the end; default empty.
    """

    forgetting: Mapping[str, float | None] = field(default_factory=dict)
    adaptation: Mapping[str, float | None] = field(default_factory=dict)
    mean_forgetting: float | None = None
    mean_adaptation: float | None = None
    loss_before: Mapping[str, float | None] = field(default_factory=dict)
    loss_after: Mapping[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyResults:
    """A whole study's results (the top level of ``study.json``); every field optional.

    Attributes:
        origin: where they were read from (for messages): a file path, or ``results`` for a dict.
        name: the study's name (None: unnamed); wall_time_s: this invocation's wall time; stage_time_s: the
            training runs' time summed; jobs: runs in parallel (all default None).
        seeds: the planned seeds (default ``()``: see :func:`moecpt.study.readers.study_seeds`).
        old_sources: the pre-training sources; shifts: the sources CPT shifts to (default ``()``).
        models: ``{name: ModelRecord}``, in the study's order; runs: ``{key: RunRecord}``; comparisons:
            ``{key: ComparisonRecord}``; forgetting: ``{key: ForgettingRecord}`` (all default empty).
    """

    origin: str = "results"
    name: str | None = None
    wall_time_s: float | None = None
    stage_time_s: float | None = None
    jobs: int | None = None
    seeds: tuple[int, ...] = ()
    old_sources: tuple[str, ...] = ()
    shifts: tuple[str, ...] = ()
    models: Mapping[str, ModelRecord] = field(default_factory=dict)
    runs: Mapping[str, RunRecord] = field(default_factory=dict)
    comparisons: Mapping[str, ComparisonRecord] = field(default_factory=dict)
    forgetting: Mapping[str, ForgettingRecord] = field(default_factory=dict)

    def model_info(self, name: str | None) -> ModelRecord:
        """The model's record; a blank one (every field None) for a model the results do not list."""
        return self.models.get(name or "") or ModelRecord(name or "")


# ------------------------------------------------------------------------------------------------------ keys
_SEED_PREFIX = re.compile(r"^s(\d+)/")


def base_key(key: str) -> str:
    """A run key without its ``sN/`` seed prefix: the study cell the run belongs to across seeds."""
    return _SEED_PREFIX.sub("", str(key), count=1)


def key_seed(key: str) -> int | None:
    """The seed of a key's ``sN/`` prefix; None without one."""
    m = _SEED_PREFIX.match(str(key))
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------- loading
_BAD = object()


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _BAD
    return v if not isinstance(v, float) or math.isfinite(v) else None  # non-finite: missing


#: value checks: (check returning the value or _BAD, what the value must be)
_STR = (lambda v: v if isinstance(v, str) else _BAD, "a string")
_INT = (lambda v: v if isinstance(v, int) and not isinstance(v, bool) else _BAD, "a whole number")
_NUM = (_number, "a number")
_BOOL = (lambda v: v if isinstance(v, bool) else _BAD, "true or false")


def _enum(cls: type[StrEnum]) -> tuple[Callable[[Any], Any], str]:
    values = {e.value: e for e in cls}
    return (lambda v: values.get(v, _BAD) if isinstance(v, str) else _BAD), "one of " + ", ".join(values)


class _Reader:
    """Checks values of one results file, naming the file and the field in each error."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str) -> NoReturn:
        raise MoecptError(f"{self.source}: {path} {problem} — re-run `moecpt study` with the same recipe and "
                          "--out to regenerate it")

    def value(self, v: Any, path: str, check: tuple[Callable[[Any], Any], str]) -> Any:
        out = check[0](v)
        if out is _BAD:
            self.fail(path, f"must be {check[1]}, got {json.dumps(v, default=repr)[:60]}")
        return out

    def get(self, obj: Mapping, path: str, key: str, check: tuple, *, required: bool = False,
            nullable: bool = True, default: Any = None) -> Any:
        """``obj[key]`` checked; a missing key is an error when ``required``, else ``default``; null is None when
        ``nullable``, else an error."""
        if key not in obj:
            if required:
                self.fail(f"{path}.{key}", "missing")
            return default
        v = obj[key]
        if v is None:
            if not nullable:
                self.fail(f"{path}.{key}", f"must be {check[1]}, got null")
            return None if required else default
        return self.value(v, f"{path}.{key}", check)

    def mapping(self, v: Any, path: str) -> Mapping:
        if not isinstance(v, Mapping):
            self.fail(path, f"must be an object, got {json.dumps(v, default=repr)[:60]}")
        return v

    def seq(self, v: Any, path: str, min_len: int = 0) -> list | tuple:
        if not isinstance(v, (list, tuple)) or len(v) < min_len:
            what = "a list" + (f" of at least {min_len} items" if min_len else "")
            self.fail(path, f"must be {what}, got {json.dumps(v, default=repr)[:60]}")
        return v

    def numbers(self, v: Any, path: str) -> tuple[float | None, ...]:
        return tuple(self.value(x, f"{path}[{i}]", _NUM) if x is not None else None
                     for i, x in enumerate(self.seq(v, path)))

    def table(self, obj: Mapping, path: str, key: str, item: Callable[[str, Any, str], Any]) -> dict:
        """``obj[key]`` as ``{name: item(name, value, path)}`` (missing or null: empty)."""
        raw = obj.get(key)
        if raw is None:
            return {}
        where = f"{path}.{key}" if path else key
        return {str(k): item(str(k), v, f"{where}[{str(k)!r}]") for k, v in self.mapping(raw, where).items()}


def _eval(rd: _Reader, v: Any, path: str) -> EvalRecord:
    d = rd.mapping(v, path)
    layers = d.get("mri_layers")
    return EvalRecord(loss=rd.get(d, path, "loss", _NUM, required=True),
                      mri_mean=rd.get(d, path, "mri_mean", _NUM),
                      mri_layers=() if layers is None else rd.numbers(layers, f"{path}.mri_layers"))


def _val_points(rd: _Reader, v: Any, path: str) -> tuple[ValPoint, ...]:
    out = []
    for i, e in enumerate(rd.seq(v, path)):
        step, tokens, loss = rd.numbers(rd.seq(e, f"{path}[{i}]", 3)[:3], f"{path}[{i}]")
        out.append(ValPoint(step, tokens, loss))
    return tuple(out)


def _mri_points(rd: _Reader, v: Any, path: str) -> tuple[MriPoint, ...]:
    out = []
    for i, e in enumerate(rd.seq(v, path)):
        at = f"{path}[{i}]"
        step, mri = rd.numbers(rd.seq(e, at, 2)[:2], at)
        layers = rd.numbers(e[2], f"{at}[2]") if len(e) > 2 and e[2] is not None else ()
        out.append(MriPoint(step, mri, layers))
    return tuple(out)


def _run(rd: _Reader, key: str, v: Any, path: str) -> RunRecord:
    d = rd.mapping(v, path)
    g = rd.get
    seed = g(d, path, "seed", _INT)
    start = d.get("start")
    return RunRecord(
        key=key, kind=g(d, path, "kind", _enum(RunKind), required=True, nullable=False),
        model=g(d, path, "model", _STR, required=True, nullable=False),
        seed=seed if seed is not None else (key_seed(key) or 0),
        shift=g(d, path, "shift", _STR), replay=g(d, path, "replay", _NUM),
        schedule=g(d, path, "schedule", _enum(CPTSchedule)), control=g(d, path, "control", _STR),
        optimizer_state=g(d, path, "optimizer_state", _enum(OptimizerCarry)),
        warmup_steps=g(d, path, "warmup_steps", _INT), parent=g(d, path, "parent", _STR),
        parent_step=g(d, path, "parent_step", _INT), start_tokens=g(d, path, "start_tokens", _INT),
        steps=g(d, path, "steps", _INT), tokens=g(d, path, "tokens", _INT),
        train_flops=g(d, path, "train_flops", _NUM), run_dir=g(d, path, "run_dir", _STR),
        val=rd.table(d, path, "val", lambda _, x, p: _val_points(rd, x, p)),
        train_mri=_mri_points(rd, d["train_mri"], f"{path}.train_mri") if d.get("train_mri") is not None else (),
        final=rd.table(d, path, "final", lambda _, x, p: _eval(rd, x, p)),
        start=None if start is None else rd.table(d, path, "start", lambda _, x, p: _eval(rd, x, p)),
    )


def _model(rd: _Reader, name: str, v: Any, path: str) -> ModelRecord:
    d = rd.mapping(v, path)
    g = rd.get
    return ModelRecord(
        name=name, preset=g(d, path, "preset", _STR), arch=g(d, path, "arch", _STR),
        router=g(d, path, "router", _STR), is_moe=g(d, path, "is_moe", _BOOL), top_k=g(d, path, "top_k", _INT),
        num_experts=g(d, path, "num_experts", _INT), total_params=g(d, path, "total_params", _INT),
        active_params=g(d, path, "active_params", _INT),
        train_flops_per_token=g(d, path, "train_flops_per_token", _NUM))


def _matrices(rd: _Reader, d: Mapping, path: str, key: str) -> tuple:
    if d.get(key) is None:
        return ()
    at = f"{path}.{key}"
    return tuple(tuple(rd.numbers(row, f"{at}[{i}][{j}]") for j, row in enumerate(rd.seq(layer, f"{at}[{i}]")))
                 for i, layer in enumerate(rd.seq(d[key], at)))


def _comparison(rd: _Reader, v: Any, path: str) -> ComparisonRecord:
    d = rd.mapping(v, path)
    g = rd.get

    def layers(key: str) -> tuple:
        return () if d.get(key) is None else rd.numbers(d[key], f"{path}.{key}")

    return ComparisonRecord(
        source=g(d, path, "source", _STR), crs_layers=layers("crs_layers"), crs_mean=g(d, path, "crs_mean", _NUM),
        cvs_layers=layers("cvs_layers"), cvs_mean=g(d, path, "cvs_mean", _NUM),
        chance_overlap=g(d, path, "chance_overlap", _NUM),
        coactivation_before_layers=_matrices(rd, d, path, "coactivation_before_layers"),
        coactivation_after_layers=_matrices(rd, d, path, "coactivation_after_layers"))


def _forgetting(rd: _Reader, v: Any, path: str) -> ForgettingRecord:
    d = rd.mapping(v, path)

    def losses(key: str) -> dict:
        return rd.table(d, path, key, lambda _, x, p: rd.value(x, p, _NUM) if x is not None else None)

    return ForgettingRecord(
        forgetting=losses("forgetting"), adaptation=losses("adaptation"),
        mean_forgetting=rd.get(d, path, "mean_forgetting", _NUM),
        mean_adaptation=rd.get(d, path, "mean_adaptation", _NUM),
        loss_before=losses("loss_before"), loss_after=losses("loss_after"))


def _run_of(rd: _Reader) -> Callable[[str, Any, str], RunRecord]:
    return lambda key, v, path: _run(rd, key, v, path)


def _model_of(rd: _Reader) -> Callable[[str, Any, str], ModelRecord]:
    return lambda name, v, path: _model(rd, name, v, path)


def parse_results(data: Mapping, origin: str = "results") -> StudyResults:
    """Parse a study's ``results`` dict (or a loaded ``study.json``) into :class:`StudyResults`.

    Raises:
        MoecptError: one line naming ``origin`` and the field: a required field missing (``runs[key].kind``,
            ``runs[key].model``, ``runs[key].final[source].loss``) or any field of the wrong type.
    """
    rd = _Reader(origin)
    d = rd.mapping(data, "the top level")
    g = rd.get

    def names(key: str) -> tuple[str, ...]:
        raw = d.get(key)
        return () if raw is None else tuple(rd.value(x, f"{key}[{i}]", _STR) for i, x in enumerate(rd.seq(raw, key)))

    seeds = d.get("seeds")
    return StudyResults(
        origin=origin, name=g(d, "", "name", _STR), wall_time_s=g(d, "", "wall_time_s", _NUM),
        stage_time_s=g(d, "", "stage_time_s", _NUM), jobs=g(d, "", "jobs", _INT),
        seeds=() if seeds is None else tuple(rd.value(x, f"seeds[{i}]", _INT)
                                             for i, x in enumerate(rd.seq(seeds, "seeds"))),
        old_sources=names("old_sources"), shifts=names("shifts"),
        models=rd.table(d, "", "models", _model_of(rd)),
        runs=rd.table(d, "", "runs", _run_of(rd)),
        comparisons=rd.table(d, "", "comparisons", lambda _, v, p: _comparison(rd, v, p)),
        forgetting=rd.table(d, "", "forgetting", lambda _, v, p: _forgetting(rd, v, p)))


def load_results(path: str | Path) -> StudyResults:
    """Read ``path`` (a ``study.json``, or a study folder holding one) into :class:`StudyResults`.

    Raises:
        MoecptError: the file is missing, unreadable or not JSON, or a field is missing or malformed
            (:func:`parse_results`).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "study.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoecptError(f"{path} does not exist; give a study folder or its study.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MoecptError(f"{path} cannot be read ({exc.__class__.__name__}); check the path") from None
    except json.JSONDecodeError as exc:
        raise MoecptError(f"{path} is not JSON ({exc.msg}, line {exc.lineno}) — re-run `moecpt study` with the "
                          "same recipe and --out to regenerate it") from None
    return parse_results(data, str(path))


def as_results(results: StudyResults | Mapping) -> StudyResults:
    """``results`` itself when already parsed, else :func:`parse_results` of the dict."""
    return results if isinstance(results, StudyResults) else parse_results(results)
