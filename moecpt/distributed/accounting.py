"""Communication accounting: bytes, collectives, rounds, compute and communication time; an emulated slow link.

Byte counts are per worker and follow the ring algorithms (the convention of NCCL's "bus bandwidth"): for ``W``
workers and a payload of ``n`` bytes per worker,

* all-reduce: each worker sends ``2 (W - 1) / W * n`` bytes and receives as many (reduce-scatter + all-gather);
* all-gather: each worker sends ``(W - 1) * n`` and receives as many (it forwards every other worker's part).

The backend's actual algorithm may differ slightly (gloo picks ring / halving-doubling variants), but these are the
volumes a link must carry, and they are exact functions of the model size, so tests can check them. With ``W = 1``
nothing is sent. Start-up traffic (the configuration check, the initial broadcast of the weights) and checkpoint
gathers are not counted: the accountant counts training traffic only.

Kinds: ``grads`` (DDP gradient buckets), ``sync`` (local-SGD-family rounds), ``stats`` (the small per-step
all-reduce of losses and router loads in every-step modes), ``fsdp`` (FSDP2's all-gathers and reduce-scatters,
*estimated*, as FSDP2 exposes no hook). Hierarchical runs (``distributed.islands > 1``) add ``island_gather`` (the
all-gather that re-assembles the outer step's shards inside an island) and give every kind a *link*: ``grads``,
``stats``, ``island_gather``, (FSDP2 inside islands) ``fsdp`` and (EP inside islands) ``all_to_all``,
``expert_grads`` and ``expert_gather`` travel on the fast ``intra_island`` link, ``sync``
on the slow ``inter_island`` one; each link's cumulative bytes appear as ``bytes_<link>`` in metrics and the summary.

:class:`LinkEmulator` turns a fast local link into a slow one: after every collective the calling worker sleeps
``latency + bytes_sent * 8 / bandwidth``. ``comm_time_s`` includes that sleep. With links, only the collectives
of the ``slow`` link (the inter-island one) are delayed: the emulated link stands for the slow wire between sites.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moecpt.train.reduce import ReduceType


def allreduce_bytes(nbytes: int, workers: int) -> int:
    """Bytes one worker sends (and, as many, receives) in a ring all-reduce of ``nbytes``."""
    return 0 if workers <= 1 else (2 * (workers - 1) * nbytes) // workers


def allgather_bytes(nbytes: int, workers: int) -> int:
    """Bytes one worker sends (and receives) in a ring all-gather of ``nbytes`` per worker."""
    return 0 if workers <= 1 else (workers - 1) * nbytes


def fsdp_step_bytes(param_bytes: int, shards: int) -> int:
    """FSDP2's estimated bytes sent by one rank per optimizer step, ``3 (S−1)/S · param_bytes``: the all-gathers of
    the forward and the backward and the reduce-scatter of the gradients, each a ring over the ``S = shards`` ranks
    of the mesh (FSDP2 exposes no communication hook to count them). The root's parameters are in fact not
    re-gathered in the backward and micro-batches re-gather, so the actual volume differs a little.

    Args:
        param_bytes: the fp32 bytes of the whole (unsharded) model's parameters, ``4 N``.
        shards: the ranks the parameters are sharded over (the world for :class:`moecpt.distributed.ddp.FSDPSync`,
            an island for :class:`moecpt.distributed.islands_fsdp.IslandFSDPSync`); also ``moecpt plan``'s figure.
    """
    return 3 * (shards - 1) * param_bytes // shards


@dataclass(frozen=True)
class LinkEmulator:
    """A link of ``bandwidth_gbit`` Gbit/s and ``latency_ms`` per collective (``None`` bandwidth: infinite)."""

    bandwidth_gbit: float | None = None
    latency_ms: float = 0.0

    @property
    def active(self) -> bool:
        return self.bandwidth_gbit is not None or self.latency_ms > 0

    def seconds(self, nbytes_sent: int) -> float:
        transfer = 0.0 if self.bandwidth_gbit is None else nbytes_sent * 8 / (self.bandwidth_gbit * 1e9)
        return self.latency_ms / 1e3 + transfer

    def delay(self, nbytes_sent: int) -> None:
        if self.active:
            time.sleep(self.seconds(nbytes_sent))


_COUNTERS = ("bytes_sent", "bytes_received", "collectives", "time_s")


class CommAccountant:
    """Cumulative traffic of this worker, by kind; thread-safe (DDP hooks report from the backend's thread).

    The trainer adds ``rounds`` (one per gradient sync or per local-SGD round) and the step times; everything is
    checkpointed (:meth:`state_dict`) so a resumed run continues the totals.

    Args:
        workers: all workers of the job (per-token figures use this worker's share of the tokens).
        link: the emulated link (default: none).
        links: kind -> link name (e.g. ``{"sync": "inter_island", "grads": "intra_island"}``); None: one link.
        slow: the link name the emulator delays (None: every collective).
    """

    def __init__(self, workers: int, link: LinkEmulator | None = None, links: dict[str, str] | None = None,
                 slow: str | None = None):
        self.workers = workers
        self.link = link or LinkEmulator()
        self.links = dict(links or {})
        self.slow = slow
        self._lock = threading.Lock()
        self.kinds: dict[str, dict[str, float]] = {}
        self.rounds = 0
        self.wall_time_s = 0.0
        self.compute_time_s = 0.0

    def record(self, kind: str, sent: int, received: int, seconds: float) -> None:
        with self._lock:
            k = self.kinds.setdefault(kind, dict.fromkeys(_COUNTERS, 0))
            k["bytes_sent"] += int(sent)
            k["bytes_received"] += int(received)
            k["collectives"] += 1
            k["time_s"] += float(seconds)

    def delay(self, kind: str, nbytes_sent: int) -> None:
        """The emulated link's sleep after a collective of ``kind`` (only the ``slow`` link's, when there is one)."""
        if self.slow is None or self.links.get(kind) == self.slow:
            self.link.delay(nbytes_sent)

    def link_bytes(self) -> dict[str, int]:
        """``bytes_<link>``: bytes sent + received on each link (empty without links)."""
        out = {f"bytes_{name}": 0 for name in sorted(set(self.links.values()))}
        with self._lock:
            for kind, k in self.kinds.items():
                if kind in self.links:
                    out[f"bytes_{self.links[kind]}"] += int(k["bytes_sent"] + k["bytes_received"])
        return out

    def _total(self, key: str) -> float:
        with self._lock:
            return sum(k[key] for k in self.kinds.values())

    @property
    def bytes_sent(self) -> int:
        return int(self._total("bytes_sent"))

    @property
    def bytes_received(self) -> int:
        return int(self._total("bytes_received"))

    @property
    def comm_time_s(self) -> float:
        return self._total("time_s")

    def add_step(self, wall_s: float, comm_s: float) -> None:
        """One training step took ``wall_s``, of which ``comm_s`` was spent blocked in collectives."""
        self.wall_time_s += wall_s
        self.compute_time_s += max(0.0, wall_s - comm_s)

    def record_fields(self) -> dict[str, Any]:
        """Cumulative fields for every ``metrics.jsonl`` train record."""
        return {"comm_bytes": self.bytes_sent + self.bytes_received, "comm_rounds": self.rounds,
                "comm_time_s": round(self.comm_time_s, 6), "compute_time_s": round(self.compute_time_s, 6),
                **self.link_bytes()}

    def summary(self, tokens: int) -> dict[str, Any]:
        """End-of-run summary; ``tokens`` = training tokens of all workers together. Per-token figures use this
        worker's share (``tokens / workers``), so they compare directly across world sizes and strategies."""
        per_worker_tokens = tokens / max(1, self.workers)
        total = self.bytes_sent + self.bytes_received
        with self._lock:
            kinds = {k: dict(v) for k, v in self.kinds.items()}
        links = self.link_bytes()
        per_round = {f"{k}_per_round": v / self.rounds if self.rounds else 0.0 for k, v in links.items()}
        return {
            "workers": self.workers,
            "rounds": self.rounds,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "comm_bytes": total,
            "bytes_per_round": total / self.rounds if self.rounds else 0.0,
            "bytes_per_token": total / per_worker_tokens if per_worker_tokens else 0.0,
            "comm_time_s": self.comm_time_s,
            "compute_time_s": self.compute_time_s,
            "wall_time_s": self.wall_time_s,
            "link": {"bandwidth_gbit": self.link.bandwidth_gbit, "latency_ms": self.link.latency_ms},
            "by_kind": kinds,
            **links,
            **per_round,
        }

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"kinds": {k: dict(v) for k, v in self.kinds.items()}, "rounds": self.rounds,
                    "wall_time_s": self.wall_time_s, "compute_time_s": self.compute_time_s}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        with self._lock:
            self.kinds = {k: dict(v) for k, v in state.get("kinds", {}).items()}
            self.rounds = int(state.get("rounds", 0))
            self.wall_time_s = float(state.get("wall_time_s", 0.0))
            self.compute_time_s = float(state.get("compute_time_s", 0.0))


class Comm:
    """Collectives over all workers, with accounting and link emulation.

    Every method takes ``flats``: one 1-D tensor per worker *this process runs* (one for a rank of a real job,
    ``K`` for the in-process simulator, :class:`moecpt.distributed.simulate.SimComm`), and returns the result
    every worker gets.
    """

    def __init__(self, accountant: CommAccountant):
        self.acct = accountant
        self.workers = accountant.workers

    def all_reduce_sum(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        raise NotImplementedError

    def all_reduce_max(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        """The elementwise maximum over all workers' tensors."""
        raise NotImplementedError

    def all_reduce(self, flats: list[torch.Tensor], kind: str, op: ReduceType) -> torch.Tensor:
        """:meth:`all_reduce_sum` or :meth:`all_reduce_max` by ``op`` (SUM or MAX: the two collectives of
        :func:`moecpt.train.reduce.reduce_metrics`)."""
        if op == ReduceType.MAX:
            return self.all_reduce_max(flats, kind)
        if op == ReduceType.SUM:
            return self.all_reduce_sum(flats, kind)
        raise ValueError(f"all_reduce op {op!r}; reduce_metrics sends SUM or MAX only")

    def all_gather(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        """``[W, N]``: every worker's tensor, in worker order."""
        raise NotImplementedError

    def _account(self, kind: str, sent: int, t0: float) -> None:
        self.acct.delay(kind, sent)
        self.acct.record(kind, sent, sent, time.perf_counter() - t0)


class ProcessComm(Comm):
    """One worker per process: torch.distributed collectives on the default process group."""

    def all_reduce_sum(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        return self._all_reduce(flats, kind, dist.ReduceOp.SUM)

    def all_reduce_max(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        return self._all_reduce(flats, kind, dist.ReduceOp.MAX)

    def _all_reduce(self, flats: list[torch.Tensor], kind: str, op) -> torch.Tensor:
        (t,) = flats
        t0 = time.perf_counter()
        dist.all_reduce(t, op=op)
        self._account(kind, allreduce_bytes(t.numel() * t.element_size(), self.workers), t0)
        return t

    def all_gather(self, flats: list[torch.Tensor], kind: str) -> torch.Tensor:
        (t,) = flats
        t0 = time.perf_counter()
        out = [torch.empty_like(t) for _ in range(self.workers)]
        dist.all_gather(out, t)
        self._account(kind, allgather_bytes(t.numel() * t.element_size(), self.workers), t0)
        return torch.stack(out)
