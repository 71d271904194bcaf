"""Host-memory allocator tuning for CPU training.

PyTorch has no caching allocator on CPU: every tensor is a ``malloc``/``free``. glibc serves large blocks with
``mmap`` and trims freed memory at the top of its heap back to the kernel, so a training step that frees and
re-allocates tens of MB of activations page-faults on fresh pages (the kernel zeroes each one) — up to
~15,000 faults per forward + backward of the benchmark MoE layer, whose buffer sizes change with the routing. PyTorch's
CPU performance guide recommends a caching ``malloc`` (jemalloc / tcmalloc via ``LD_PRELOAD``) for this;
:func:`retain_freed_memory` gets most of the effect from glibc itself, in-process: blocks up to 32 MiB (the
ceiling of glibc's own adaptive ``mmap`` threshold) come from the heap, up to 1 GiB of free heap top is kept
instead of trimmed, and the heap grows in 64 MiB steps. Blocks above 32 MiB are still ``mmap``-ed, so large
one-off buffers do not fragment the heap.

Effect: ``benchmarks/components.py`` (``moe_step_page_faults``) counts the page faults per MoE forward + backward
with and without it, and ``benchmarks/moe_layer.py`` with and without ``--no-malloc-tuning`` shows its share of the
layer's time (figures in ``benchmarks/README.md``). The trim threshold is 1 GiB because a smaller one (256 MiB, for
instance) still hands part of a step's working set back to the kernel, to be faulted in again, and leaves the MoE
layer measurably slower. Freeing a large one-off buffer leaves resident memory as it is without the tuning
(``tests/test_host_memory.py``). The cost: freed heap memory, up to the process's peak use of
blocks under 32 MiB, stays resident.

Opt out with ``MOECPT_MALLOC_TUNING=0`` (or ``false``/``off``/``no``). A no-op outside Linux/glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(mmap_threshold_bytes: int = 32 << 20, trim_threshold_bytes: int = 1 << 30,
                        top_pad_bytes: int = 64 << 20) -> bool:
    """Tell glibc ``malloc`` to keep freed memory for reuse: heap blocks up to ``mmap_threshold_bytes``, no trimming
    below ``trim_threshold_bytes`` of free heap top, heap growth in ``top_pad_bytes`` steps.

    Process-wide and idempotent; call it once before training on CPU.

    Args:
        mmap_threshold_bytes: blocks at least this large are ``mmap``-ed.
        trim_threshold_bytes: free memory at the heap top kept before trimming.
        top_pad_bytes: extra bytes requested whenever the heap grows (fewer, larger ``brk`` calls).

    Returns:
        True if the settings were applied; False where they cannot be (not Linux/glibc) or are switched off by
        ``MOECPT_MALLOC_TUNING=0``.
    """
    if os.environ.get("MOECPT_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "off", "no") or \
            not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int  # int param, int value
    values = {_M_MMAP_THRESHOLD: mmap_threshold_bytes, _M_TRIM_THRESHOLD: trim_threshold_bytes,
              _M_TOP_PAD: top_pad_bytes}
    if any(not 0 <= v < 2**31 for v in values.values()):
        raise ValueError(f"malloc settings must be in [0, 2**31): {values}")
    return all(mallopt(param, int(value)) == 1 for param, value in values.items())
