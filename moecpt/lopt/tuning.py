"""Hyperparameter grids that widen until their best point is inside them (``moecpt lopt bench``).

A grid is a product of named axes. Every axis is either

* ``log``: positive values on a geometric ladder (LRs); an edge value can always be extended by one more rung,
  the ratio of the two values at that end; or
* ``momentum``: decays in ``[0, 1)``; the upper end extends to ``1 − (1 − β) / 2`` (0.9 -> 0.95 -> 0.975), and
  ``β = 0`` is a closed end (no momentum at all: the choice is legitimate there, not an artefact of the grid).

:func:`widen` looks at the best point: every axis where it sits on an open end gets one more value beyond that
end. The caller evaluates the new points (only those), picks the best again, and repeats until the best point is
inside every open axis or a cap of widening rounds is reached, which it reports. This is the standard remedy for
"the tuned optimum is on the edge of the grid": a baseline tuned on a grid that is too narrow looks worse than it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class AxisKind(StrEnum):
    LOG = "log"
    MOMENTUM = "momentum"


@dataclass(frozen=True)
class Axis:
    """One hyperparameter's values, sorted ascending, and how it extends (see module doc)."""

    values: tuple[float, ...]
    kind: AxisKind = AxisKind.LOG

    def __post_init__(self) -> None:
        vals = tuple(sorted(float(v) for v in self.values))
        if not vals:
            raise ValueError("an axis needs at least one value")
        if self.kind == AxisKind.LOG and vals[0] <= 0:
            raise ValueError(f"a log axis needs positive values, got {vals}")
        if self.kind == AxisKind.MOMENTUM and not (vals[0] >= 0 and vals[-1] < 1):
            raise ValueError(f"a momentum axis needs values in [0, 1), got {vals}")
        object.__setattr__(self, "values", vals)

    def open_edges(self, value: float) -> list[str]:
        """``"low"`` / ``"high"`` for each open end of the axis that ``value`` sits on (both for a 1-point axis)."""
        out = []
        if value == self.values[0] and not (self.kind == AxisKind.MOMENTUM and value == 0.0):
            out.append("low")
        if value == self.values[-1]:
            out.append("high")
        return out

    def extended(self, edge: str) -> Axis:
        """This axis with one more value beyond ``edge`` (``"low"`` or ``"high"``)."""
        v = self.values
        if self.kind == AxisKind.MOMENTUM:
            new = v[0] / 2 if edge == "low" else 1 - (1 - v[-1]) / 2
        else:
            ratio = (v[-1] / v[-2] if edge == "high" else v[1] / v[0]) if len(v) > 1 else 2.0
            new = v[-1] * ratio if edge == "high" else v[0] / ratio
        return Axis(v + (float(f"{new:.6g}"),), self.kind)


Grid = dict[str, Axis]


def points(grid: Grid) -> list[dict[str, float]]:
    """Every point of the product grid, as ``{axis name: value}`` (axes in the grid's order)."""
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n].values for n in names))]


def widen(grid: Grid, best: dict[str, float]) -> tuple[Grid, list[str]]:
    """The grid extended beyond every open end ``best`` sits on -> ``(new grid, ["name:low", ...] widened)``.

    An empty list means ``best`` is inside the grid (or on a closed end only): tuning is done.
    """
    new, moved = dict(grid), []
    for name, axis in grid.items():
        for edge in axis.open_edges(best[name]):
            new[name] = new[name].extended(edge)
            moved.append(f"{name}:{edge}")
    return new, moved


def point_key(point: dict[str, float]) -> tuple:
    """A hashable, order-independent key of a grid point."""
    return tuple(sorted(point.items()))


def describe(grid: Grid) -> dict[str, list[float]]:
    """The grid as JSON: axis name -> its values."""
    return {n: list(a.values) for n, a in grid.items()}


def search(grid: Grid, score: Callable[[list[dict[str, float]], int], list[float]], cap: int) -> dict:
    """Minimise ``score`` over ``grid``, widening it until the best point is inside (or ``cap`` rounds are spent).

    Args:
        score: ``(new points, widening round) -> their scores`` (lower is better); called once per round with the
            points not scored yet, so a caller can run them as one batch.
        cap: widening rounds allowed (0: the starting grid only).

    Returns:
        ``{"best": point, "grid": final Grid, "val_loss": best score, "points": points scored, "widened":
        ["axis:edge", ...] over all rounds, "widening_rounds", "cap_hit": the best point is still on an open
        edge, "open_edges": those edges}``.
    """
    scores: dict[tuple, float] = {}
    widened: list[str] = []
    rounds = 0
    for rnd in range(cap + 1):
        todo = [p for p in points(grid) if point_key(p) not in scores]
        if todo:
            scores.update({point_key(p): float(v) for p, v in zip(todo, score(todo, rnd))})
        best = min(points(grid), key=lambda p: scores[point_key(p)])
        wider, moved = widen(grid, best)
        if not moved or rnd == cap:
            break
        widened += moved
        grid, rounds = wider, rounds + 1
    return {"best": best, "grid": grid, "val_loss": scores[point_key(best)], "points": len(scores),
            "widened": widened, "widening_rounds": rounds, "cap_hit": bool(moved), "open_edges": moved}
