"""Sharded (DCP) checkpoints of hierarchical DiLoCo: islands whose ranks hold slices of the model (FSDP2 inside
islands, :mod:`moecpt.distributed.islands_fsdp`; expert parallelism inside islands,
:mod:`moecpt.distributed.islands_ep`) write their slices, and no rank gathers the model.

Checkpoints fall on round boundaries, where every island holds the same ``θ`` and the same outer state. So each
rank hands DCP (:func:`moecpt.train.checkpoint_dcp.save_sharded_checkpoint`) its slices of the weights and of the
outer state as DTensors of the global tensors under keys every island shares, and DCP's planner writes each chunk
once (the ranks at the same place of every island offer the same chunk: it keeps one). The inner optimizer states
differ between islands: island 0's is the ordinary optimizer state (a CPT parent reads it as a plain AdamW state),
island ``i``'s lies under ``optim.moecpt_sync.inner.i``, written by island ``i``'s ranks.

Rank 0's marker in ``optimizer_rest.pt`` holds the layout and *skeletons* of the outer and inner states, whose
tensors refer to their DCP keys (:func:`moecpt.train.dcp_io.split_tensors`): ``Checkpoint.optimizer_state()``
(and ``moecpt checkpoint consolidate``) fills them in and gives exactly the state the single-file layout writes.

A resume reads into this rank's slices whatever layout wrote them: another number of ranks per island (FSDP2) or of
data-parallel ranks (EP) reshards; the number of islands (and the EP degree) must match. The set-up makes zero
placeholders of the outer state in this rank's shapes (:meth:`ShardedIslandCheckpoints.begin_sharded_resume`), the
DCP load fills them in place through :meth:`~ShardedIslandCheckpoints.dcp_global_view`, and
:meth:`~ShardedIslandCheckpoints.after_sharded_load` hands them to the outer optimizer and restarts ``θ_outer``
from the loaded weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from moecpt.distributed.ddp import _rank0_rng
from moecpt.distributed.strategy import SYNC_KEY, Worker
from moecpt.errors import MoecptError
from moecpt.train.dcp_io import DCP_REF, fill_tensors, has_refs, index_keyed, ref_dtype, split_tensors

#: where the strategy's tensors lie in the DCP ``optim`` part
OUTER_AT = (SYNC_KEY, "outer")


def is_sharded_state(state: dict | None) -> bool:
    """Whether a checkpointed strategy state is a DCP marker (its tensors lie in the DCP folder)."""
    return state is not None and has_refs(state)


class ShardedIslandCheckpoints:
    """The DCP layout of an island strategy whose ranks hold slices (module doc). A mixin of
    :class:`~moecpt.distributed.islands.IslandSync` subclasses (it uses their ``local_params`` and
    ``layout_marker``), which give the hooks :meth:`_outer_view` (how a local outer-state tensor lies in the global
    one), :meth:`_outer_local_shape` (its inverse, for a resume) and :meth:`_state_view` (the same for the weights
    and the inner optimizer state)."""

    dcp_capable = True  # every island writes its slices
    shards_state = True  # "auto" writes DCP: no rank gathers the model
    simulable = False  # the slices live on real ranks: --simulate-workers is refused

    # attributes of IslandSync the mixin reads
    M: int
    num_workers: int
    island: int
    outer: Any
    global_params: list[Tensor]
    local_params: Any  # (worker) -> this rank's parameter tensors, as the outer step covers them
    layout_marker: Any  # () -> the checkpointed layout keys (IslandSync.layout_marker)
    device: torch.device
    _dcp_outer: tuple[dict, dict] | None = None  # this rank's outer state, and the same as DCP sees it

    def check_resume(self, state: dict | None) -> None:
        """As the island strategy's own; a DCP checkpoint resumes at another number of ranks per island (each
        island reshards on load), so its number of workers is not compared (the islands, the EP degree and
        ``island_sync`` still are)."""
        if is_sharded_state(state):
            state = {**state, "workers": self.num_workers}
        super().check_resume(state)  # type: ignore[misc]

    # ------------------------------------------------------------------------------------------------ hooks
    def _outer_view(self, path: tuple[str, ...], v: Tensor) -> Tensor:
        """DCP's view of this rank's outer-state tensor ``v`` at ``path`` (its keys in the outer state dict, as
        ``str``): a DTensor over the global tensor when ``v`` is a slice, else ``v``."""
        raise NotImplementedError

    def _outer_local_shape(self, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        """This rank's shape of the outer-state tensor at ``path`` whose global shape is ``shape``."""
        raise NotImplementedError

    def _state_view(self, model_state: dict, optim_tensors: dict) -> tuple[dict, dict]:
        """DCP's view of this rank's weights and inner optimizer tensors (as they are where they already are
        DTensors: FSDP2)."""
        return model_state, optim_tensors

    # ------------------------------------------------------------------------------------------------ views
    def _wrap_outer(self, outer: dict) -> dict:
        def wrap(path: tuple[str, ...], v: Any) -> Any:
            if isinstance(v, dict):
                return {k: wrap((*path, str(k)), x) for k, x in v.items()}
            if isinstance(v, Tensor) and v.dim() > 0:
                return self._outer_view(path, v)
            return v
        return wrap((), outer)

    def _placeholder(self, ref: dict) -> Tensor:
        path = tuple(ref[DCP_REF][len(OUTER_AT):])
        return torch.zeros(self._outer_local_shape(path, tuple(ref["shape"])), dtype=ref_dtype(ref),
                           device=self.device)

    # ------------------------------------------------------------------------------------------------ resume
    def begin_sharded_resume(self, state: dict) -> None:
        """Set-up of a resume from a DCP checkpoint (``state``: its marker), after :meth:`bind` of the outer
        optimizer: zeros in this rank's shapes for every outer-state tensor, filled in place by the load."""
        local = fill_tensors(state["outer"], self._placeholder) if state.get("outer") is not None else {}
        self._dcp_outer = (local, self._wrap_outer(local))

    def after_sharded_load(self, workers: list[Worker]) -> None:
        """Take up the loaded outer state and restart ``θ_outer`` from the loaded weights (the set-up copied the
        weights before the load)."""
        if self._dcp_outer is not None and self._dcp_outer[0]:
            self.outer.load_state_dict(self._dcp_outer[0])
        self._dcp_outer = None
        with torch.no_grad():
            # local_params after the load's get_state_dict, whose FSDP2 pre-hook left the module's parameters sharded
            for g, p in zip(self.global_params, self.local_params(workers[0])):
                g.copy_(p)

    # ------------------------------------------------------------------------------------------------ save
    def sharded_checkpoint_state(self, workers: list[Worker]
                                 ) -> tuple[nn.Module, torch.optim.Optimizer, dict | None, dict | None]:
        """This rank's model and inner optimizer (its slices), and on rank 0 the RNG record and the strategy
        marker: the layout, and skeletons of the outer state and of every other island's inner state whose tensors
        :meth:`dcp_global_view` puts into the DCP folder. A collective."""
        w = workers[0]
        rng = _rank0_rng(self)
        local = self.outer.state_dict()
        self._dcp_outer = (local, self._wrap_outer(local))
        # the model's state dict first: FSDP2 reshards the root's parameters in its pre-hook (an evaluation's forward
        # leaves them gathered), so that the optimizer's parameters are the module's again
        mine = get_state_dict(w.model, w.optimizer)[1]  # this rank's inner state, FQN-keyed: the structure
        if not self.info.is_main:
            return w.model, w.optimizer, None, None
        inner = {str(i): index_keyed(split_tensors(mine, (SYNC_KEY, "inner", str(i)))[0]) for i in range(1, self.M)}
        marker = {**self.layout_marker(), "outer": split_tensors(self._dcp_outer[1], OUTER_AT)[0],
                  "inner": inner}
        return w.model, w.optimizer, rng, {SYNC_KEY: marker}

    def dcp_global_view(self, model_state: dict, optim_tensors: dict) -> tuple[dict, dict]:
        """The weights as :meth:`_state_view` gives them (every island holds the same at a round boundary: DCP
        writes each chunk once), island 0's inner state as the ordinary optimizer state, island ``i``'s under
        ``moecpt_sync.inner.i``, the outer state under ``moecpt_sync.outer`` (the same on every island). For a save
        and for a load alike (a load fills the tensors in place)."""
        if self._dcp_outer is None:
            raise MoecptError(f"{type(self).__name__}.dcp_global_view outside a sharded save or load")
        model_state, optim_tensors = self._state_view(model_state, optim_tensors)
        part: dict[str, Any] = {"outer": split_tensors(self._dcp_outer[1], ())[1] or {}}
        if self.island > 0:
            part["inner"] = {str(self.island): optim_tensors}
            optim_tensors = {}
        return model_state, {**optim_tensors, SYNC_KEY: part}
