"""Does a recipe combine a fixed-step learned outer optimizer with a decaying LR schedule? (a one-line warning)

The paper's learned step (Joseph et al., arXiv 2312.02204, Sec. 3) is ``0.001 · d · exp(0.001 m)`` on inputs that
are all RMS-normalised per tensor, so its size does not follow the workers' deltas: when the recipe's schedule
decays the inner LR, the deltas shrink but the outer step does not, and the model keeps being kicked at the end of
training (docs/lopt.md, "Scale-aware step", measures it). Weight files with ``step_scale = "delta-rms"`` scale
their step with the deltas and are not affected.

The runtime calls :func:`fixed_step_schedule_warning` once, when it builds the outer optimizer
(:class:`moecpt.distributed.local_sgd.LocalSGDSync`, on the main rank), and issues the returned line as a warning.
"""

from __future__ import annotations

from pathlib import Path

from moecpt.config import Recipe
from moecpt.lopt.mlp import StepScale
from moecpt.lopt.pretrained import PRETRAINED, load_weights, pretrained_path
from moecpt.train.schedules import run_end_step, schedule_table, warmup_end_step

#: the inner LR at the end of the run below this fraction of its peak counts as a decaying schedule
DECAY_RATIO = 0.5


def _learned_step_scale(name: str) -> StepScale | None:
    """The step scale of a learned outer optimizer name (shipped name or weight file), None for other names."""
    if name in PRETRAINED:
        path = pretrained_path(name)
    elif name.endswith(".safetensors"):
        path = Path(name)
    else:
        return None
    spec, _, _ = load_weights(path)
    return spec.step_scale


def fixed_step_schedule_warning(recipe: Recipe) -> str | None:
    """A one-line warning if ``recipe`` runs a fixed-step learned outer optimizer under a decaying LR schedule.

    "Decaying": the schedule's LR at the run's last step (``moecpt.train.schedules``, the same table the trainer
    uses) is below :data:`DECAY_RATIO` of its highest value after the warm-up.

    Returns:
        The warning (no newline), or None: no learned outer optimizer, a ``delta-rms`` one, or no decay.

    Raises:
        MoecptError: the outer optimizer names a weight file that is missing or damaged (the same error the
            runtime raises when it loads it).
    """
    name, _, _ = recipe.distributed.outer()
    if _learned_step_scale(name) != StepScale.FIXED:
        return None
    total = recipe.train.steps
    lrs = schedule_table(recipe.schedule, recipe.optim, total)[: run_end_step(recipe.schedule, total)]
    peak = float(lrs[min(warmup_end_step(recipe.schedule, total), len(lrs) - 1):].max())
    last = float(lrs[-1])
    if peak <= 0 or last >= DECAY_RATIO * peak:
        return None
    return (f"distributed.outer_optimizer={name!r} takes the paper's fixed-size learned step, but the "
            f"{recipe.schedule.kind.value} schedule decays the inner LR to {last / peak:.0%} of its peak by the last "
            "step: the outer step will not shrink with the workers' deltas and keeps moving the model late in "
            "training; meta-train a scale-aware one (`moecpt lopt meta-train --step-scale delta-rms`) or use "
            "schedule.kind = 'constant' or outer_optimizer = 'nesterov'")
