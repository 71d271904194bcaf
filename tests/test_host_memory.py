"""glibc malloc tuning for CPU training: applied where it can be, opt-out honoured, bad values refused, and no
heap fragmentation from large one-off buffers. (Its speed effect is measured by benchmarks/moe_layer.py with and
without --no-malloc-tuning; page-fault counts depend too much on the heap's history for a unit test.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def _run(code: str, *args: str, env_extra: dict[str, str] | None = None) -> str:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          check=True).stdout


def test_retain_freed_memory_applies_and_honours_opt_out():
    code = "from moecpt.train.host_memory import retain_freed_memory as r; print(r(), r())"
    assert _run(code).split() == ["True", "True"]  # idempotent
    assert _run(code, env_extra={"MOECPT_MALLOC_TUNING": "0"}).split() == ["False", "False"]


def test_bad_settings_are_refused():
    from moecpt.train.host_memory import retain_freed_memory

    with pytest.raises(ValueError, match="malloc settings"):
        retain_freed_memory(trim_threshold_bytes=1 << 40)  # would be truncated to 0 by a C int


def test_large_one_off_buffers_do_not_fragment_the_heap():
    """Blocks above 32 MiB stay mmap-ed: freeing a 120 MB tensor twelve times leaves resident memory as without
    the tuning (disabling mmap altogether grew it by ~800 MB)."""
    code = """
import sys, torch
from moecpt.train.host_memory import retain_freed_memory
if sys.argv[-1] == "tuned":
    retain_freed_memory()
for _ in range(12):
    t = torch.ones(30_000_000)
    del t
print(int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20)
"""
    plain, tuned = int(_run(code, "plain")), int(_run(code, "tuned"))
    assert tuned < plain + 100, (plain, tuned)
