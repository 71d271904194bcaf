"""Distributed training: data parallelism (DDP, FSDP2), expert parallelism, communication-efficient synchronisation
(local SGD, SlowMo, DiLoCo, learned outer optimizers), an in-process simulator, and communication accounting. See
``docs/distributed.md``.

Module map: ``launch`` (process group start-up / teardown, rank info, config check, failure diagnosis),
``runtime`` (:class:`Distributed`, the runtime ``Trainer(parallel=...)`` receives, and :func:`build_sync`),
``strategy`` (the strategies' base over the loop's interface in :mod:`moecpt.train.parallel`), ``ddp`` (DDP,
FSDP2), ``mesh`` (the islands x dp x ep layout), ``expert_parallel`` (the experts' all-to-all dispatch),
``ep_sync`` (EP x DP), ``local_sgd`` (outer loop, pseudo-gradient, outer optimizers, gather mode), ``islands`` (the
outer loop across islands, data parallel inside each), ``simulate`` (``--simulate-workers``), ``accounting`` (bytes,
rounds, times, emulated link).
"""

from moecpt.distributed.launch import DistInfo, rank_info, session
from moecpt.distributed.runtime import Distributed, build_sync
from moecpt.distributed.strategy import SyncStrategy, Worker

__all__ = ["DistInfo", "Distributed", "SyncStrategy", "Worker", "build_sync", "rank_info", "session"]
