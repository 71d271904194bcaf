"""Forgetting and adaptation from validation losses before and after continual pre-training.

Following Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language Models"
(arXiv 2403.08763, TMLR 2024), and its MoE follow-up Thérien et al. (arXiv 2503.05029, TMLR 2025):

- *forgetting* is the rise of an **old** (pre-training) distribution's held-out validation loss caused by CPT:
  ``loss_after - loss_before``; positive means the model forgot, negative means CPT also helped the old data;
- *adaptation* is the fall of a **new** (CPT) distribution's held-out validation loss:
  ``loss_before - loss_after``; positive means the model learned the new data.

Both are also reported relative to the loss before CPT (``delta / loss_before``, dimensionless). Losses are mean
per-token cross-entropy in nats (the language-modelling loss only: never "CE + aux"). All functions take plain
floats (or 0-d tensors / numpy scalars, converted with ``float``) and return floats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from moecpt.errors import MoecptError

__all__ = ["forgetting", "adaptation", "relative_forgetting", "relative_adaptation", "summarize_losses"]


def _loss(value: object, what: str) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MoecptError(f"{what} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(x):
        raise MoecptError(f"{what} is {x}; the run diverged or the evaluation failed, check its validation loss")
    if x < 0:
        raise MoecptError(f"{what} is {x} < 0; pass a cross-entropy loss in nats")
    return x


def forgetting(loss_before: float, loss_after: float) -> float:
    """Forgetting of an old distribution: ``loss_after - loss_before`` (nats), Ibrahim et al. 2024 (arXiv 2403.08763).

    Args:
        loss_before: validation loss on the old distribution's held-out set at the CPT start checkpoint.
        loss_after: the same loss after CPT.

    Returns:
        The rise of the loss; positive = forgotten, negative = backward transfer.

    Raises:
        MoecptError: a loss that is not a finite, non-negative number.
    """
    return _loss(loss_after, "loss_after") - _loss(loss_before, "loss_before")


def adaptation(loss_before: float, loss_after: float) -> float:
    """Adaptation to a new distribution: ``loss_before - loss_after`` (nats), the fall of its validation loss.

    The papers track adaptation as the new distribution's loss itself; the drop from the CPT start is the
    comparable number across runs from the same checkpoint (higher is better).

    Raises:
        MoecptError: a loss that is not a finite, non-negative number.
    """
    return _loss(loss_before, "loss_before") - _loss(loss_after, "loss_after")


def _relative(delta: float, before: float, what: str) -> float:
    if before == 0.0:
        raise MoecptError(f"{what}: loss_before is 0, relative change is undefined")
    return delta / before


def relative_forgetting(loss_before: float, loss_after: float) -> float:
    """``(loss_after - loss_before) / loss_before``: forgetting as a fraction of the old loss (dimensionless)."""
    return _relative(forgetting(loss_before, loss_after), float(loss_before), "relative_forgetting")


def relative_adaptation(loss_before: float, loss_after: float) -> float:
    """``(loss_before - loss_after) / loss_before``: adaptation as a fraction of the starting loss (dimensionless)."""
    return _relative(adaptation(loss_before, loss_after), float(loss_before), "relative_adaptation")


def summarize_losses(
    before: Mapping[str, float],
    after: Mapping[str, float],
    old_sources: Iterable[str],
    new_sources: Iterable[str],
) -> dict:
    """Forgetting per old source and adaptation per new source, absolute and relative.

    Args:
        before: validation loss per data source at the CPT start checkpoint.
        after: validation loss per data source after CPT.
        old_sources: pre-training sources (forgetting is measured on them), e.g. ``["fineweb"]``.
        new_sources: CPT sources (adaptation is measured on them), e.g. ``["stack"]``. A source may not be both.

    Returns:
        dict with
            ``"forgetting"``, ``"forgetting_rel"``: ``{old source: value}`` (:func:`forgetting`,
            :func:`relative_forgetting`);
            ``"adaptation"``, ``"adaptation_rel"``: ``{new source: value}``;
            ``"mean_forgetting"``, ``"mean_forgetting_rel"``, ``"mean_adaptation"``, ``"mean_adaptation_rel"``:
            unweighted means over the sources (``None`` when there are none);
            ``"loss_before"``, ``"loss_after"``: the losses of the sources used, as floats.

    Raises:
        MoecptError: a listed source missing from ``before`` or ``after``, a source listed as both old and new,
            no sources at all, or a bad loss value.
    """
    if isinstance(old_sources, str) or isinstance(new_sources, str):
        raise MoecptError("old_sources and new_sources must be lists of source names, not a single string")
    old = list(dict.fromkeys(old_sources))
    new = list(dict.fromkeys(new_sources))
    if not old and not new:
        raise MoecptError("summarize_losses needs at least one old or new source")
    both = sorted(set(old) & set(new))
    if both:
        raise MoecptError(f"source(s) {both} listed as both old and new; each source is one or the other")
    for name, table in (("before", before), ("after", after)):
        missing = [s for s in old + new if s not in table]
        if missing:
            raise MoecptError(f"no '{name}' validation loss for source(s) {missing}; evaluate them or drop them")

    def mean(values: dict[str, float]) -> float | None:
        return sum(values.values()) / len(values) if values else None

    f = {s: forgetting(before[s], after[s]) for s in old}
    f_rel = {s: relative_forgetting(before[s], after[s]) for s in old}
    a = {s: adaptation(before[s], after[s]) for s in new}
    a_rel = {s: relative_adaptation(before[s], after[s]) for s in new}
    return {
        "forgetting": f,
        "forgetting_rel": f_rel,
        "adaptation": a,
        "adaptation_rel": a_rel,
        "mean_forgetting": mean(f),
        "mean_forgetting_rel": mean(f_rel),
        "mean_adaptation": mean(a),
        "mean_adaptation_rel": mean(a_rel),
        "loss_before": {s: float(before[s]) for s in old + new},
        "loss_after": {s: float(after[s]) for s in old + new},
    }
