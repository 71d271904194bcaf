"""A learned outer optimizer (LAgg-A / LOpt-A, :mod:`moecpt.lopt`) on parameters cut along dim 0 over a process
group: FSDP2 inside islands (:mod:`moecpt.distributed.islands_fsdp`, every parameter cut over the island) and
expert parallelism inside islands (:mod:`moecpt.distributed.islands_ep`, the expert tensors cut over the EP group).

The learned step's features are whole-tensor statistics (:mod:`moecpt.lopt.features`): each channel is divided by
its RMS over the tensor, Adafactor's row / column accumulators are means over the tensor's two largest dims, and the
``delta-rms`` step scale is the RMS of the tensor's pseudo-gradient. A rank holding rows ``[a, b)`` of dim 0 cannot
compute them alone. Two ways to provide them:

(a) all-gather each tensor's inputs inside the group, **one tensor at a time**, run the unchanged learned step
    (:func:`moecpt.lopt.optimizers.lopt_step`) on the whole tensor identically on every rank of the group, and keep
    this rank's rows of the new parameter and of the accumulators;
(b) compute the statistics distributedly: all-reduce each channel's sum of squares, the row / column sums over a cut
    dim and the delta's sum of squares, between the passes of the feature code.

This module does (a), because it runs the very code that DDP inside islands runs (:class:`~moecpt.distributed.
islands.IslandSync` calls :class:`~moecpt.lopt.optimizers.LearnedOuterOptimizer` on whole tensors): given the same
inputs the results are equal bit for bit, the learned step's numerics are not touched (no reduction hook threaded
through the feature code, whose sums would then run in another order), and a new feature needs no distributed
counterpart. Its costs, against (b):

* **Traffic, per round, inside the group** (the fast link): one all-gather per cut tensor of its rows of ``θ``,
  ``Δ`` (``C`` channels: 1 for LOpt-A, ``K = M`` for LAgg-A) and the cut accumulators (momentum ×3, second moment,
  Adafactor ``diag`` ×3 or the cut one of ``row`` / ``col``): about ``(C + 5 … C + 8) · 4 N`` bytes gathered per
  round, where (b) would send a few floats per tensor. Counted as kind ``outer_gather`` on ``intra_island``. Once
  per round of ``H`` steps, against FSDP2's ``3 · 4 N`` per step.
* **Memory**: one whole tensor's ``θ``, ``Δ``, accumulators and (chunked, :data:`~moecpt.lopt.optimizers.
  MLP_CHUNK`) features at a time, the bound the learned step has anyway under DDP; the persistent state stays cut:
  each rank keeps its rows of the accumulators, ``1/S`` of them (the Adafactor vector reduced over dim 0, when dim
  0 is a factored dim, is whole on every rank: it is a reduction over the cut dim).
* **Compute**: each rank of the group runs the MLP on the whole tensor (``S`` times the work of (b), in the same
  wall time as DDP inside islands). For a model whose round time this dominates, (b) is the way on.

The state dict of a rank (:meth:`ShardedLearnedOuter.state_dict`) holds its rows; :meth:`~ShardedLearnedOuter.
full_state_dict` (a collective of the group) gives exactly what :class:`~moecpt.lopt.optimizers.
LearnedOuterOptimizer` saves for the whole model (``t``, ``num_tensors``, ``acc.{i}.{name}``), so a checkpoint holds
the same outer state whichever layout wrote it, and :meth:`~ShardedLearnedOuter.load_full_state_dict` cuts it again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moecpt.distributed.accounting import allgather_bytes
from moecpt.errors import MoecptError
from moecpt.lopt.features import factored_dims, init_accumulators
from moecpt.lopt.optimizers import LearnedOuterOptimizer, OuterOptimizer, lopt_step

#: the traffic kind of the per-tensor all-gathers
OUTER_GATHER = "outer_gather"

#: ``record(kind, bytes_sent, t0)``: the sync's accounting of one collective started at ``perf_counter() = t0``
Record = Callable[[str, int, float], None]


@dataclass(frozen=True)
class Dim0Cut:
    """How one parameter is cut along dim 0 over ``group``: the rank at group position ``index`` holds
    ``sizes[index]`` rows starting at ``sum(sizes[:index])`` of the whole ``[sum(sizes), *shape[1:]]`` tensor.

    Attributes:
        group: the process group whose ranks hold the pieces (their group ranks are the positions).
        sizes: rows per position (FSDP2's ``torch.chunk`` split may leave the last ones short or empty).
        index: this rank's position.
        shape: the whole tensor's shape.
    """

    group: Any
    sizes: tuple[int, ...]
    index: int
    shape: tuple[int, ...]

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.index])

    @property
    def rows(self) -> int:
        return self.sizes[self.index]

    @staticmethod
    def chunked(group: Any, ranks: int, index: int, shape: tuple[int, ...]) -> "Dim0Cut":
        """FSDP2's ``Shard(0)``, as ``torch.chunk`` cuts: ``ceil(d0 / ranks)`` rows each, the last ones fewer."""
        per = -(-shape[0] // ranks)
        return Dim0Cut(group, tuple(min(per, max(0, shape[0] - j * per)) for j in range(ranks)), index, shape)

    @staticmethod
    def even(group: Any, ranks: int, index: int, local_shape: tuple[int, ...]) -> "Dim0Cut":
        """``ranks`` equal pieces of ``local_shape[0]`` rows (the experts of an EP group)."""
        return Dim0Cut(group, (local_shape[0],) * ranks, index, (ranks * local_shape[0], *local_shape[1:]))


def cut_keys(shape: tuple[int, ...]) -> set[str]:
    """The accumulator names of a tensor of ``shape`` that are cut with its dim 0 (:func:`~moecpt.lopt.features.
    init_accumulators`): ``m``, ``v``, ``diag`` always; Adafactor's ``row`` (a mean over ``d0``) and ``col`` (over
    ``d1``) unless that reduced dim is dim 0 itself (then the vector is whole on every rank)."""
    keys = {"m", "v", "diag"}
    fd = factored_dims(shape)
    if fd is not None:
        d1, d0 = fd
        keys |= {name for name, reduced in (("row", d0), ("col", d1)) if reduced != 0}
    return keys


class ShardedLearnedOuter(OuterOptimizer):
    """``inner`` (a :class:`~moecpt.lopt.optimizers.LearnedOuterOptimizer`) stepping parameters of which this rank
    holds dim-0 pieces (module doc, choice (a)). Its :meth:`step` is a collective of every cut tensor's group.

    Args:
        inner: the learned optimizer (its meta-parameters and kind; a state it holds already, of the whole model,
            is loaded and cut at :meth:`bind`).
        cuts: one per parameter, in the order :meth:`step` gets them: a :class:`Dim0Cut`, or None for a tensor this
            rank holds whole (the non-expert parameters under EP).
        record: the sync's accounting of each all-gather (kind :data:`OUTER_GATHER`).

    Raises:
        MoecptError: (at :meth:`step`) shapes or a K that do not match, as :class:`LearnedOuterOptimizer`.
    """

    def __init__(self, inner: LearnedOuterOptimizer, cuts: list[Dim0Cut | None], record: Record):
        self.inner = inner
        self.spec = inner.spec
        self.cuts = cuts
        self.record = record
        self.needs_worker_deltas = inner.needs_worker_deltas
        self.num_workers = inner.num_workers
        self._t: Tensor | None = None  # [1] int64 round index, as LearnedOuterOptimizer's state["t"]
        self._acc: list[dict[str, Tensor]] = []  # this rank's batched [1, rows, ...] accumulators per tensor

    def __repr__(self) -> str:
        return f"ShardedLearnedOuter({self.spec.describe()}, {sum(c is not None for c in self.cuts)} cut tensors)"

    # ------------------------------------------------------------------------------------------------ set-up
    def bind(self, params: list[Tensor]) -> None:
        """Zero state for this rank's pieces ``params`` (then :meth:`load_full_state_dict` of whatever ``inner``
        already held).

        Raises:
            MoecptError: a piece whose shape is not its cut's.
        """
        if len(params) != len(self.cuts):
            raise MoecptError(f"ShardedLearnedOuter got {len(params)} parameters for {len(self.cuts)} cuts")
        for i, (p, cut) in enumerate(zip(params, self.cuts)):
            want = self._local_shape(cut, tuple(p.shape))
            if tuple(p.shape) != want:
                raise MoecptError(f"parameter {i} has shape {list(p.shape)} here, but its cut gives {list(want)}: "
                                  "the shards are not torch.chunk's / even pieces of dim 0")
        dev = params[0].device
        self._t = torch.zeros(1, dtype=torch.long, device=dev)
        self._acc = []
        if self.spec.adafactor:
            for p, cut in zip(params, self.cuts):
                whole = init_accumulators(torch.empty(1, *(cut.shape if cut else p.shape), device="meta"))
                self._acc.append({k: torch.zeros(self._piece_shape(k, v, cut), device=dev) for k, v in whole.items()})
        if self.inner.round > 0:  # a whole-model state loaded (or stepped) before the cut
            self.load_full_state_dict(self.inner.state_dict())

    @staticmethod
    def _local_shape(cut: Dim0Cut | None, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape if cut is None else (cut.rows, *cut.shape[1:])

    @staticmethod
    def _piece_shape(name: str, whole: Tensor, cut: Dim0Cut | None) -> tuple[int, ...]:
        """This rank's shape of a batched whole accumulator ``[1, d0, ...]``."""
        if cut is None or name not in cut_keys(cut.shape):
            return tuple(whole.shape)
        return (whole.shape[0], cut.rows, *whole.shape[2:])

    # ------------------------------------------------------------------------------------------------ gather
    def _gather_rows(self, cut: Dim0Cut, pieces: list[Tensor], account: bool = True) -> list[Tensor]:
        """The whole tensors of ``pieces`` (each ``[rows, ...]``, this rank's rows of dim 0): one all-gather of
        their columns packed side by side, zero-padded to the longest piece (gloo gathers equal sizes)."""
        width = [math.prod(t.shape[1:]) for t in pieces]
        rows, most = cut.rows, max(cut.sizes)
        packed = torch.cat([t.reshape(rows, w) for t, w in zip(pieces, width)], dim=1)
        packed = torch.nn.functional.pad(packed, (0, 0, 0, most - rows)).contiguous()
        t0 = time.perf_counter()
        out = [torch.empty_like(packed) for _ in cut.sizes]
        dist.all_gather(out, packed, group=cut.group)
        if account:
            self.record(OUTER_GATHER, allgather_bytes(packed.numel() * packed.element_size(), len(cut.sizes)), t0)
        whole = torch.cat([o[:n] for o, n in zip(out, cut.sizes)])
        return [w.reshape(cut.shape[0], *t.shape[1:]) for w, t in zip(whole.split(width, dim=1), pieces)]

    def _whole_inputs(self, i: int, p: Tensor, d: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
        """Parameter ``[1, *S]``, delta ``[1, *S]`` / ``[1, K, *S]`` and accumulators of tensor ``i``, whole."""
        cut = self.cuts[i]
        acc = self._acc[i] if self.spec.adafactor else None
        if cut is None:
            return p[None], d[None], acc
        keys = sorted(k for k in (acc or {}) if k in cut_keys(cut.shape))
        d_rows = d.movedim(0, -1) if self.needs_worker_deltas else d  # [K, rows, ...] -> [rows, ..., K]
        whole = self._gather_rows(cut, [p, d_rows, *[acc[k][0] for k in keys]])
        wp, wd = whole[0], whole[1].movedim(-1, 0) if self.needs_worker_deltas else whole[1]
        wacc = None if acc is None else {**acc, **{k: w[None] for k, w in zip(keys, whole[2:])}}
        return wp[None], wd[None], wacc

    # ------------------------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, params: list[Tensor], deltas: list[Tensor]) -> None:
        """Every tensor in turn: gather it whole (if cut), :func:`~moecpt.lopt.optimizers.lopt_step` on it, keep
        this rank's rows of the new parameter and accumulators. ``params`` / ``deltas``: this rank's pieces."""
        self._check(params, deltas)
        if self._t is None:
            self.bind(params)
        meta = self.inner.meta_tensors(params[0].device)
        for i, (p, d) in enumerate(zip(params, deltas)):
            wp, wd, wacc = self._whole_inputs(i, p.detach(), d.detach())
            (new,), st = lopt_step(self.spec, meta, [wp], [wd], {"t": self._t, "acc": [wacc] if wacc else []})
            cut = self.cuts[i]
            if cut is not None:
                new = new.narrow(1, cut.start, cut.rows)
            if self.spec.adafactor:
                keys = cut_keys(cut.shape) if cut is not None else set()
                self._acc[i] = {k: v.narrow(1, cut.start, cut.rows).clone() if k in keys else v
                                for k, v in st["acc"][0].items()}
            p.copy_(new[0].to(p.dtype))
        self._t = self._t + 1

    @property
    def round(self) -> int:
        return int(self._t[0]) if self._t is not None else self.inner.round

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """This rank's rows, in :class:`LearnedOuterOptimizer`'s key format (CPU)."""
        if self._t is None:
            raise MoecptError("ShardedLearnedOuter.state_dict before bind(params)")
        out = {"t": self._t[0].clone().cpu(), "num_tensors": torch.tensor(len(self._acc) if self.spec.adafactor
                                                                           else -1)}
        for i, acc in enumerate(self._acc):
            out |= {f"acc.{i}.{k}": v[0].clone().cpu() for k, v in acc.items()}
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (this rank's rows, of the same cut)."""
        self._load(state, lambda i, k, v: v)

    def cut_param(self, key: str) -> int | None:
        """The parameter whose dim-0 cut the state entry ``key`` (of :meth:`state_dict`) shares, or None for an
        entry every rank of the group holds whole (``t``, ``num_tensors``, an uncut tensor's accumulators, an
        Adafactor vector reduced over dim 0)."""
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "acc":
            return None
        cut = self.cuts[int(parts[1])]
        return int(parts[1]) if cut is not None and parts[2] in cut_keys(cut.shape) else None

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's state, as :class:`LearnedOuterOptimizer` saves it (CPU): a collective of every cut
        tensor's group (one all-gather per tensor; checkpoint traffic, not accounted, as the inner state's)."""
        out = self.state_dict()
        for i, (acc, cut) in enumerate(zip(self._acc, self.cuts)):
            keys = sorted(k for k in acc if cut is not None and k in cut_keys(cut.shape))
            if keys:
                for k, w in zip(keys, self._gather_rows(cut, [acc[k][0] for k in keys], account=False)):
                    out[f"acc.{i}.{k}"] = w.cpu()
        return out

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`full_state_dict` (or a :class:`LearnedOuterOptimizer`'s state of the whole model), keeping
        this rank's rows.

        Raises:
            MoecptError: not a learned optimizer's state, or one of another model or kind.
        """
        def piece(i: int, k: str, v: Tensor) -> Tensor:
            cut = self.cuts[i]
            if cut is None or k not in cut_keys(cut.shape):
                return v
            if v.shape[0] != cut.shape[0]:
                raise MoecptError(f"outer optimizer state acc.{i}.{k} has {v.shape[0]} rows, the parameter "
                                  f"{cut.shape[0]}; it was saved for another model")
            return v.narrow(0, cut.start, cut.rows)
        self._load(state, piece)

    def _load(self, state: dict[str, Tensor], piece: Callable[[int, str, Tensor], Tensor]) -> None:
        if self._t is None:
            raise MoecptError("ShardedLearnedOuter: load a state after bind(params)")
        if "t" not in state:
            raise MoecptError("not a learned outer optimizer state (no 't'); pass what state_dict() returned")
        want = {f"acc.{i}.{k}": (i, k, v) for i, a in enumerate(self._acc) for k, v in a.items()}
        saved = {k for k in state if k.startswith("acc.")}
        if saved != set(want):
            raise MoecptError(f"outer optimizer state does not match these parameters ({len(saved)} accumulator "
                              f"tensors saved, {len(want)} expected); it was saved for another model or kind")
        new = [dict(a) for a in self._acc]
        for key, (i, k, v) in want.items():
            x = piece(i, k, state[key])
            if tuple(x.shape) != tuple(v.shape[1:]):
                raise MoecptError(f"outer optimizer state {key} has shape {list(state[key].shape)}, expected "
                                  f"{list(v.shape[1:])} here; it was saved for another model")
            new[i][k] = x.to(v.device, torch.float32)[None].clone()
        self._acc = new
        self._t = torch.full_like(self._t, int(state["t"]))
