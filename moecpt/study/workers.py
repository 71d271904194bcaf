"""What every worker process of the study shares: its start-up (dying with the study) and its thread count."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["worker_init", "threads_per_job"]


def worker_init() -> None:
    """Make a worker die with the study process (Linux): an orphan would keep writing a run that a restarted
    study resumes. Checkpoints are atomic, so a kill at any moment loses at most the steps since the last one."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of ``jobs`` workers side by side: the CPU cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))
