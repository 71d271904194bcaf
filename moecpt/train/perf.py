"""Model FLOPs utilisation (MFU) and peak memory: the throughput figures runs are compared by.

MFU (Chowdhery et al. 2022, PaLM, App. B) = achieved model FLOPs per second / the devices' peak FLOPs per second.
The model FLOPs are the exact count of :func:`moecpt.model.flops.model_stats` (``train_flops_per_token``): 3 x the
forward's ``2 x`` *active* matmul parameters (the routed experts a token uses, not all of them) plus the attention
``4 L T H Dh`` per token of PaLM's formula; no recomputation is counted, so MFU is not HFU.

The peak:

* CUDA: the vendor's dense (no sparsity) BF16 tensor-core figure for the devices of :data:`CUDA_BF16_PEAK_TFLOPS`
  (NVIDIA datasheets); for another device, or a run that does not compute in bf16, none is known and ``mfu`` is
  ``null`` rather than a made-up number.
* CPU: no datasheet applies, so the peak is *measured* once per process (and thread count and dtype) by a short
  square-matmul benchmark (:func:`measured_matmul_flops`). CPU MFU is therefore relative to what a large matmul
  reaches on this machine with this process's threads, not to a theoretical peak.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (the caching allocator's reserve is not counted) and the
process's peak resident set size (``resource.getrusage``) on CPU; it is reduced with MAX across ranks
(:mod:`moecpt.train.reduce`).
"""

from __future__ import annotations

import functools
import sys
import time

import torch

from moecpt.train.reduce import Metric, ReduceType

#: dense BF16 tensor-core peak (TFLOP/s) by device-name fragment, most specific first: half the "with sparsity"
#: figures of the NVIDIA H100 datasheet (SXM 1,979, NVL 1,671, PCIe 1,513), the NVIDIA H200 datasheet (SXM 1,979,
#: NVL 1,671) and the dense figure of the NVIDIA A100 datasheet (312, SXM and PCIe)
CUDA_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835.5),
    ("H100 PCIE", 756.5),
    ("H100", 989.5),
    ("H200 NVL", 835.5),
    ("H200", 989.5),
    ("A100", 312.0),
)

_BENCH_N = 1024  # a 1024^3 matmul: 2.1 GFLOP, long enough to time, short enough to run at every start


def cuda_peak_flops(device_name: str) -> float | None:
    """The dense BF16 peak of a CUDA device named like ``torch.cuda.get_device_name()`` (FLOP/s), or None."""
    name = device_name.upper()
    return next((tf * 1e12 for frag, tf in CUDA_BF16_PEAK_TFLOPS if frag in name), None)


@functools.cache
def measured_matmul_flops(dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of the best of five ``[1024, 1024] @ [1024, 1024]`` CPU matmuls in ``dtype`` (after one warm-up),
    with ``threads`` torch threads (the caller's current setting; it is the cache key, so a changed setting is
    measured anew). Memoised: the figure is a property of this machine, measured once per process."""
    a = torch.randn(_BENCH_N, _BENCH_N, generator=torch.Generator().manual_seed(0)).to(dtype)
    b = a.t().contiguous()
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * _BENCH_N**3 / best


def device_peak_flops(device: torch.device, bf16: bool) -> float | None:
    """Peak FLOP/s of one device for a run computing in bf16 (``bf16``) or fp32; None where none is known."""
    if device.type == "cuda":
        return cuda_peak_flops(torch.cuda.get_device_name(device)) if bf16 else None
    if device.type == "cpu":
        return measured_matmul_flops(torch.bfloat16 if bf16 else torch.float32, torch.get_num_threads())
    return None


def mfu(train_flops_per_token: float, tokens_per_s: float | None, peak_flops: float | None,
        devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1] (above 1 only if the peak is wrong): ``train_flops_per_token *
    tokens_per_s / (peak_flops * devices)``, with ``tokens_per_s`` the whole job's; None without a peak."""
    if peak_flops is None or tokens_per_s is None or peak_flops <= 0:
        return None
    return train_flops_per_token * tokens_per_s / (peak_flops * devices)


def peak_memory_bytes(device: torch.device) -> int | None:
    """The process's peak memory so far: CUDA ``max_memory_allocated`` of ``device``, or on CPU the peak RSS
    (``ru_maxrss``: KiB on Linux, bytes on macOS); None where neither applies (other devices, no ``resource``)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def step_memory_metrics(device: torch.device) -> dict[str, Metric]:
    """``{"peak_memory_bytes": Metric(bytes, MAX)}`` for the step's record (the largest rank's), or ``{}``."""
    peak = peak_memory_bytes(device)
    return {} if peak is None else {"peak_memory_bytes": Metric(peak, ReduceType.MAX)}
