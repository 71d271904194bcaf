"""Checks that fail in one line before a run folder is claimed: free disk for a checkpoint, memory for training.

The estimates are lower bounds on purpose (weights, gradients, AdamW moments, the logits and their gradient), so a
refusal means the run certainly cannot fit; a run that might not fit gets a warning line instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from moecpt.errors import MoecptError

#: bytes per parameter of a checkpoint: fp32 weights + the two fp32 AdamW moments
CHECKPOINT_BYTES_PER_PARAM = 4 + 8
#: bytes per parameter while training: fp32 weights, gradients and the two AdamW moments
TRAIN_BYTES_PER_PARAM = 4 + 4 + 8


def human_bytes(n: float) -> str:
    """``1.5 GiB``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _existing(path: Path) -> Path:
    p = path.expanduser().resolve(strict=False)
    while not p.exists():
        p = p.parent
    return p


def check_free_disk(path: str | Path, need_bytes: int, what: str) -> None:
    """Refuse when the file system of ``path`` has less free space than ``need_bytes``.

    Args:
        path: where the bytes go (need not exist yet; its nearest existing ancestor is measured).
        need_bytes: estimated size of what will be written.
        what: e.g. ``"one checkpoint of this model"``, for the message.

    Raises:
        MoecptError: too little free space (both sizes named).
    """
    free = shutil.disk_usage(_existing(Path(path))).free
    if free < need_bytes:
        raise MoecptError(
            f"{path}: {human_bytes(free)} free, but {what} needs about {human_bytes(need_bytes)}; free some disk "
            "space or choose an --out on a larger disk"
        )


def host_memory_bytes() -> tuple[int | None, int | None]:
    """``(total, available)`` physical memory of this machine in bytes (``None`` where unknown)."""
    total = avail = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, avail


def training_memory_bytes(total_params: int, micro_batch: int, seq_len: int, vocab_size: int,
                          workers: int = 1) -> int:
    """Lower bound of the training memory of one process: ``workers`` copies of weights, gradients and AdamW
    moments (16 bytes / parameter in fp32), plus one micro-batch's fp32 logits, log-softmax and logit gradient
    (``3 * micro_batch * seq_len * vocab_size * 4`` bytes). Activations of the blocks come on top."""
    return workers * TRAIN_BYTES_PER_PARAM * total_params + logit_bytes(micro_batch, seq_len, vocab_size)


def logit_bytes(micro_batch: int, seq_len: int, vocab_size: int) -> int:
    """Bytes of one micro-batch's fp32 logits, their log-softmax and the logit gradient, each ``[B, T, V]``."""
    return 3 * 4 * micro_batch * seq_len * vocab_size


def check_memory(need_bytes: int, device_type: str, what: str, device_index: int | None = None) -> None:
    """Refuse a run whose lower-bound memory exceeds what the device has; warn when it exceeds what is free.

    Args:
        need_bytes: see :func:`training_memory_bytes`.
        device_type: ``"cpu"`` (host memory) or ``"cuda"`` (that GPU's memory); other devices are not checked.
        what: e.g. ``"training this model"``.

    Raises:
        MoecptError: ``need_bytes`` exceeds the device's total memory.
    """
    if device_type == "cuda":
        free, total = torch.cuda.mem_get_info(device_index)
        where = "this GPU"
    elif device_type == "cpu":
        total, free = host_memory_bytes()
        where = "this machine"
    else:
        return
    if total is not None and need_bytes > total:
        raise MoecptError(
            f"{what} needs at least {human_bytes(need_bytes)} but {where} has {human_bytes(total)}; use a smaller "
            "model or micro-batch, more ranks (train.micro_batch_size, FSDP), or a bigger machine"
        )
    if free is not None and need_bytes > free:
        print(f"moecpt: warning: {what} needs at least {human_bytes(need_bytes)} and {where} has "
              f"{human_bytes(free)} free now; it may run out of memory", file=sys.stderr)
