"""Step metrics that declare how they reduce across ranks (docs/design.md, rule D2).

Each metric a worker reports is a :class:`Metric`: a value and its :class:`ReduceType`, in the style of
OLMo-core's ``ReduceType``. :func:`reduce_metrics` all-reduces a worker's metrics in as few collectives as the ops
need: one SUM over every ``mean`` and ``sum`` metric (a mean is the sum over workers divided by their number), and
one MAX over every ``max`` metric and the negated ``min`` metrics (``min(x) = -max(-x)``); an op with no metric
costs nothing. The layout of the packed vectors comes from the metrics' names, never from positions a caller must
keep in step.

It lives in :mod:`moecpt.train` so that the trainer and the strategies of :mod:`moecpt.distributed` share it
(docs/design.md, rule A2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Mapping

import torch


class ReduceType(StrEnum):
    """How a metric combines across workers: the mean, sum, maximum or minimum of the workers' values."""

    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class Metric:
    """One step metric of one worker.

    Attributes:
        value: a float or a tensor of any shape (counts, per-layer sums); reduced elementwise in float64.
        reduce: how it combines across workers.
    """

    value: float | int | torch.Tensor
    reduce: ReduceType

    def flat(self) -> torch.Tensor:
        """The value as a 1-D float64 CPU tensor."""
        v = self.value
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu", torch.float64).reshape(-1)
        return torch.tensor([float(v)], dtype=torch.float64)


#: ``all_reduce(flats, op)``: one 1-D tensor per local worker -> the elementwise SUM or MAX over all workers
AllReduce = Callable[[list[torch.Tensor], ReduceType], torch.Tensor]

_GROUP = {ReduceType.MEAN: ReduceType.SUM, ReduceType.SUM: ReduceType.SUM,
          ReduceType.MAX: ReduceType.MAX, ReduceType.MIN: ReduceType.MAX}


def reduce_metrics(per_worker: list[Mapping[str, Metric]], all_reduce: AllReduce, num_workers: int,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Reduce each named metric over all workers of the job.

    Args:
        per_worker: the metrics of each worker this process runs (one for a rank, ``K`` for the simulator); every
            worker gives the same names, reduce types and shapes.
        all_reduce: the collective (see :data:`AllReduce`), called once per op that has metrics (SUM, MAX).
        num_workers: all workers of the job (the divisor of ``mean`` metrics).
        device: where the packed vectors travel (the process group's device).

    Returns:
        name -> reduced float64 CPU tensor of the metric's shape (flattened to 1-D; a scalar metric has one element).

    Raises:
        ValueError: workers disagree on the names, reduce types or sizes of their metrics.
    """
    first = per_worker[0]
    layout = {k: (m.reduce, m.flat().numel()) for k, m in first.items()}
    for metrics in per_worker[1:]:
        if {k: (m.reduce, m.flat().numel()) for k, m in metrics.items()} != layout:
            raise ValueError("workers report different step metrics (names, reduce types or sizes); every worker "
                             "must report the same ones")
    out: dict[str, torch.Tensor] = {}
    for op in (ReduceType.SUM, ReduceType.MAX):
        names = [k for k, (r, _) in layout.items() if _GROUP[r] == op]
        if not names:
            continue
        sign = {k: -1.0 if layout[k][0] == ReduceType.MIN else 1.0 for k in names}
        flats = [torch.cat([m[k].flat() * sign[k] for k in names]).to(device) for m in per_worker]
        total = all_reduce(flats, op).to("cpu", torch.float64)
        pos = 0
        for k in names:
            reduce, n = layout[k]
            v = total[pos:pos + n] * sign[k]
            out[k] = v / num_workers if reduce == ReduceType.MEAN else v
            pos += n
    return out
