"""Learning-rate schedules as pure functions of (schedule config, optimiser config, step).

docs/design.md, rule C3: the LR is never read back from optimizer param groups; the trainer calls :func:`lr_at` for
every optimizer step and writes the value into the param groups. A resumed or continued run therefore cannot carry
a stale peak LR.

Conventions (``T`` = ``total_steps``; ``s`` = 0-based optimizer step; ``peak`` = ``optim.lr``;
``min`` = ``optim.min_lr``; phase lengths are ``round(fraction * T)``, halves rounded up):

* Warm-up, steps ``0 <= s < W``: ``lr = start + (peak - start) * s / W`` with ``start = warmup_start_lr``. Step 0
  uses ``start`` exactly (the LR the previous run ended at, for CPT re-warming); step ``W`` is the first at peak.
  With ``start = 0`` step 0 only fills the AdamW moments (as in Hugging Face's linear warm-up).
* Every decaying phase is anchored at both ends: it starts at its start value on its first step and reaches its
  end value on its last step, so the schedule is continuous and ``lr_at(T - 1) == min`` for cosine, wsd and the
  infinite schedules (unless their anneal is empty).
* Steps ``s >= T`` keep the LR of step ``T - 1``.

Kinds (:class:`moecpt.config.ScheduleKind`):

* ``constant``: warm-up, then ``peak``.
* ``cosine``: warm-up, then ``lr = min + (peak - min) * 0.5 * (1 + cos(pi * (s - W) / (T - 1 - W)))``.
* ``wsd`` (warm-up, stable, decay; Hu et al. 2024, MiniCPM, arXiv 2404.06395): warm-up, ``peak`` until the last
  ``D = round(decay_fraction * T)`` steps, then a *linear* decay ``lr = peak + (min - peak) * (s - S_d) / (D - 1)``
  with ``S_d = T - D`` (from peak on the first decay step to min on the last). MiniCPM leaves the decay function
  free; linear is the common choice and is what Hägele et al. 2024 (arXiv 2405.18392) found to work as well as
  cosine-to-zero. It also reaches ``min`` exactly, which an exponential decay does not.
* ``cosine-inf`` (Ibrahim et al. 2024, arXiv 2403.08763, Sec. 7; Thérien et al. 2025, arXiv 2503.05029): warm-up
  to ``peak``; cool-down over ``N_c = C - W`` steps (``C = round((warmup + cooldown) * T)``)
  ``lr = c + (peak - c) * 0.5 * (1 + cos(pi * t / N_c))``, ``t = s - W``; constant ``c`` until
  ``A = round((warmup + cooldown + constant) * T)``; then the exponential anneal
  ``lr = c * (min / c) ** (t' / N_a)``, ``t' = s - A``, ``N_a = T - 1 - A``, which reaches ``min`` on the last step.
  ``c = schedule.const_lr`` or ``0.55 * peak`` (the paper's 1.65e-4 for a 3e-4 peak).
* ``invsqrt-inf`` (Ibrahim et al. 2024): as ``cosine-inf`` but the cool-down is
  ``lr = peak + (c - peak) * h(x) / h(1)`` with ``h(x) = 1 / sqrt(1 + a x) - 1``, ``x = t / N_c``,
  ``a = invsqrt_alpha``; ``h(0) = 0`` and the ratio is 1 at ``x = 1``, so it goes from peak to ``c`` exactly.

``warmup_fraction = 0`` and ``cooldown_fraction = 0`` with an infinite kind give "constant ``c``, then anneal": CPT
from a pre-anneal checkpoint. ``stop_before_anneal`` ends the run at ``A`` (see :func:`run_end_step`), which
keeps the pre-anneal checkpoint of a pre-training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moecpt.config import OptimConfig, ScheduleConfig, ScheduleKind
from moecpt.errors import MoecptError

_INF_KINDS = (ScheduleKind.COSINE_INF, ScheduleKind.INVSQRT_INF)


@dataclass(frozen=True)
class Phase:
    """One phase of a schedule: steps ``start <= s < end``; names: warmup, stable, decay, cooldown, constant,
    anneal."""

    name: str
    start: int
    end: int


def _steps_of(fraction: float, total_steps: int) -> int:
    # Round half up (Python's round() is banker's); the epsilon absorbs sums like 0.01 + 0.69 + 0.1 = 0.8000000001.
    return int(math.floor(fraction * total_steps + 0.5 + 1e-9))


def _check_total(total_steps: int) -> None:
    if total_steps < 1:
        raise MoecptError(f"total_steps={total_steps}; a schedule needs at least one step (train.steps >= 1)")


def _boundaries(schedule: ScheduleConfig, total_steps: int) -> tuple[int, int, int]:
    """``(W, C, A)``: warm-up end, cool-down end (wsd: decay start) and anneal start, clipped to ``[0, T]``."""
    T = total_steps
    W = min(_steps_of(schedule.warmup_fraction, T), T)
    if schedule.kind in _INF_KINDS:
        C = min(_steps_of(schedule.warmup_fraction + schedule.cooldown_fraction, T), T)
        A = min(_steps_of(schedule.warmup_fraction + schedule.cooldown_fraction + schedule.constant_fraction, T), T)
        return W, max(C, W), max(A, C, W)
    if schedule.kind == ScheduleKind.WSD:
        S_d = max(T - _steps_of(schedule.decay_fraction, T), W)
        return W, S_d, T
    return W, T, T


def const_lr(schedule: ScheduleConfig, optim: OptimConfig) -> float:
    """The constant LR ``c`` of the infinite schedules: ``schedule.const_lr`` or ``0.55 * optim.lr``."""
    return float(schedule.const_lr) if schedule.const_lr is not None else 0.55 * optim.lr


def schedule_phases(schedule: ScheduleConfig, total_steps: int) -> list[Phase]:
    """The non-empty phases of a schedule over ``total_steps`` steps, in order (for plots and logs)."""
    _check_total(total_steps)
    T = total_steps
    W, C, A = _boundaries(schedule, T)
    if schedule.kind in _INF_KINDS:
        spans = [("warmup", 0, W), ("cooldown", W, C), ("constant", C, A), ("anneal", A, T)]
    elif schedule.kind == ScheduleKind.WSD:
        spans = [("warmup", 0, W), ("stable", W, C), ("decay", C, T)]
    elif schedule.kind == ScheduleKind.COSINE:
        spans = [("warmup", 0, W), ("decay", W, T)]
    else:
        spans = [("warmup", 0, W), ("stable", W, T)]
    return [Phase(n, a, b) for n, a, b in spans if b > a]


def warmup_end_step(schedule: ScheduleConfig, total_steps: int) -> int:
    """Number of warm-up steps ``W`` (above) of a run laid out over ``total_steps``: 0 without a warm-up."""
    _check_total(total_steps)
    return _boundaries(schedule, total_steps)[0]


def anneal_start_step(schedule: ScheduleConfig, total_steps: int) -> int | None:
    """First step of the exponential anneal of an infinite schedule (``A`` above); ``None`` for other kinds.

    Equals ``total_steps`` when warmup + cooldown + constant fractions sum to 1 (no anneal).
    """
    _check_total(total_steps)
    if schedule.kind not in _INF_KINDS:
        return None
    return _boundaries(schedule, total_steps)[2]


def run_end_step(schedule: ScheduleConfig, total_steps: int) -> int:
    """Number of optimizer steps the run takes: the anneal start with ``stop_before_anneal`` on an infinite
    schedule, else ``total_steps``. The schedule itself is always laid out over ``total_steps``."""
    start = anneal_start_step(schedule, total_steps)
    if schedule.stop_before_anneal and start is not None:
        return start
    return total_steps


def schedule_table(schedule: ScheduleConfig, optim: OptimConfig, total_steps: int) -> np.ndarray:
    """LR of every step ``0 .. total_steps - 1``: float64 array of shape ``[total_steps]``."""
    return _lr_array(np.arange(total_steps, dtype=np.int64), schedule, optim, total_steps)


def lr_at(step: int, schedule: ScheduleConfig, optim: OptimConfig, total_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based) of a run laid out over ``total_steps`` steps; see the module doc.

    Raises:
        MoecptError: ``total_steps < 1``; ``optim.min_lr = 0`` with an infinite schedule (an exponential anneal
            cannot reach 0).
        ValueError: ``step < 0``.
    """
    if step < 0:
        raise ValueError(f"step={step} is negative; steps are 0-based")
    return float(_lr_array(np.asarray([step], dtype=np.int64), schedule, optim, total_steps)[0])


def _lr_array(steps: np.ndarray, schedule: ScheduleConfig, optim: OptimConfig, total_steps: int) -> np.ndarray:
    _check_total(total_steps)
    T = total_steps
    peak, lo, start = float(optim.lr), float(optim.min_lr), float(schedule.warmup_start_lr)
    s = np.minimum(steps, T - 1).astype(np.float64)
    W, C, A = _boundaries(schedule, T)
    kind = schedule.kind

    warm = start + (peak - start) * s / max(W, 1)
    if kind == ScheduleKind.CONSTANT:
        return np.where(s < W, warm, peak)

    if kind == ScheduleKind.COSINE:
        p = np.clip((s - W) / max(T - 1 - W, 1), 0.0, 1.0)
        body = lo + (peak - lo) * 0.5 * (1.0 + np.cos(np.pi * p))
        return np.where(s < W, warm, body)

    if kind == ScheduleKind.WSD:
        S_d = C
        p = np.clip((s - S_d) / max(T - 1 - S_d, 1), 0.0, 1.0)
        return np.where(s < W, warm, np.where(s < S_d, peak, peak + (lo - peak) * p))

    # infinite schedules
    c = const_lr(schedule, optim)
    if lo <= 0 and A < T - 1:
        raise MoecptError(
            f"optim.min_lr={lo} with schedule.kind={kind.value!r}: the exponential anneal c * (min / c)^x cannot "
            "reach 0; set a positive optim.min_lr"
        )
    x = np.clip((s - W) / max(C - W, 1), 0.0, 1.0)
    if kind == ScheduleKind.COSINE_INF:
        cool = c + (peak - c) * 0.5 * (1.0 + np.cos(np.pi * x))
    else:
        a = float(schedule.invsqrt_alpha)
        h1 = 1.0 / math.sqrt(1.0 + a) - 1.0
        cool = peak + (c - peak) * (1.0 / np.sqrt(1.0 + a * x) - 1.0) / h1
    n_anneal = T - 1 - A
    if n_anneal > 0:
        ratio = lo / c
        anneal = c * np.power(ratio, np.clip((s - A) / n_anneal, 0.0, 1.0))
    else:  # an anneal of at most one step: hold c (the fractions leave no room to decay)
        anneal = np.full_like(s, c)
    return np.where(s < W, warm, np.where(s < C, cool, np.where(s < A, c, anneal)))
