"""The sync strategies' common base: :class:`SyncStrategy`, the single-process interface of the training loop
(:class:`moecpt.train.parallel.SingleSync`) with communication accounting.

The trainer (``moecpt.train.trainer``) runs a list of :class:`Worker` objects: one per process normally, ``K`` when
``--simulate-workers K`` runs ``K`` workers in one process; the order of its calls is documented on
:class:`~moecpt.train.parallel.SingleSync`. The trainer receives the strategy from its runtime
(:meth:`moecpt.distributed.runtime.Distributed.build_sync`), never by importing this package (docs/design.md,
rule A2).

Strategies: :class:`SyncStrategy` (one process, no communication), ``ddp.DDPSync`` / ``ddp.FSDPSync``,
``ep_sync.ExpertParallelSync`` (EP x DP), ``simulate.SimulatedDDPSync``, ``local_sgd.LocalSGDSync`` (local SGD,
SlowMo, DiLoCo, learned outer optimizers), ``islands.IslandSync`` / ``islands_fsdp.IslandFSDPSync`` /
``islands_ep.IslandEPSync`` (the local-SGD family across islands, DDP, FSDP2 or EP x DP inside each);
:func:`moecpt.distributed.runtime.build_sync` picks one.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moecpt.config import Recipe
from moecpt.distributed.accounting import CommAccountant, LinkEmulator
from moecpt.train.parallel import (  # noqa: F401  (re-exported: the strategies' shared names)
    LOCAL_SYNCS,
    SYNC_KEY,
    DistInfo,
    OptimizerFactory,
    SingleSync,
    Worker,
    build_worker_optimizer,
)


class SyncStrategy(SingleSync):
    """One worker in one process, with communication accounting (bytes, rounds, step and communication time,
    an emulated link): the base of the strategies of this package. Its set-up, step and checkpoint hooks are
    :class:`~moecpt.train.parallel.SingleSync`'s; what it reports appears only where ``reports`` is True.

    ``links`` (kind -> link name) and ``slow_link`` (the link the emulator delays) split the accounting by link
    (:class:`~moecpt.distributed.accounting.CommAccountant`); None: one link for everything."""

    links: dict[str, str] | None = None
    slow_link: str | None = None

    def __init__(self, recipe: Recipe, info: DistInfo, num_workers: int = 1, local_workers: int = 1,
                 device: torch.device | None = None):
        super().__init__(recipe, info, num_workers, local_workers, device)
        d = recipe.distributed
        self.acct = CommAccountant(num_workers, LinkEmulator(d.emulate_bandwidth_gbit, d.emulate_latency_ms),
                                   links=self.links, slow=self.slow_link)
        self.comm = None
        self._step_t0 = 0.0
        self._step_comm0 = 0.0

    def begin_step(self) -> None:
        self._step_t0 = time.perf_counter()
        self._step_comm0 = self.acct.comm_time_s

    def after_optimizer_step(self, workers: list[Worker], step: int, boundary: bool) -> None:
        """After every worker's optimizer step (or skip) of 1-based ``step``. ``boundary``: the trainer evaluates,
        checkpoints or stops after this step, so the workers must agree now."""
        self._end_step()

    def _end_step(self) -> None:
        self.acct.add_step(time.perf_counter() - self._step_t0, self.acct.comm_time_s - self._step_comm0)

    def meta(self) -> dict[str, Any]:
        """Extra checkpoint meta (empty unless ``reports``: a single process's checkpoints stay as before)."""
        if not self.reports:
            return {}
        return {"sync": self.kind, "workers": self.num_workers, "comm": self.acct.state_dict()}

    def load_meta(self, meta: dict[str, Any]) -> None:
        self.acct.load_state_dict(meta.get("comm"))

    def record_fields(self) -> dict[str, Any]:
        """Cumulative communication fields for each train record of ``metrics.jsonl``."""
        return self.acct.record_fields() if self.reports else {}

    def summary(self, tokens: int) -> dict[str, Any] | None:
        if not self.reports:
            return None
        return {"sync": self.kind, **self.acct.summary(tokens)}
