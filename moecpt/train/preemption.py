"""Pre-emption: SIGTERM (what SLURM, Kubernetes and torchrun send before killing a job) and SIGUSR1 (SLURM's
``--signal=USR1@T`` warning) make the trainer save a checkpoint at the next step boundary and stop.

The handler only records the signal; the loop asks :meth:`PreemptionWatcher.poll` at step boundaries. In a
multi-process job every rank must save at the same step (the save is a collective), so ``poll`` all-reduces the
flag (max over ranks) — a one-element collective, done only at communication boundaries so that local SGD /
DiLoCo rounds stay the only traffic between them. A rank that got no signal stops with the others.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from moecpt.errors import MoecptError

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(MoecptError):
    """Training stopped on a pre-emption signal after saving a checkpoint; the same command resumes it.

    Attributes:
        exit_code: ``128 + signal number``, as a process killed by that signal would report.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    def __reduce__(self):  # crosses process boundaries (a study's stage workers) intact
        return type(self), (str(self), self.signum)


class PreemptionWatcher:
    """Records SIGTERM / SIGUSR1 while the ``with`` block runs; previous handlers are restored on exit.

    Outside the main thread (where Python cannot install handlers) it records nothing and :meth:`poll` only joins
    the other ranks' decision.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for s in PREEMPT_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def poll(self, distributed: bool, device: Any = None) -> int:
        """The signal to stop on (0 = keep going); in a distributed job the max over ranks (a collective: every
        rank must call it at the same step)."""
        if not distributed:
            return self.signum

        dev = device if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.signum], dtype=torch.int64, device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        # never written back to self.signum: a signal handled while the all-reduce ran would be overwritten by
        # the stale value sent; it is picked up at the next poll instead, by every rank alike
        return int(flag.item())


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, etc."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
