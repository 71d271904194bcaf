"""glibc malloc tuning for CPU training: applied where it can be, opt-out honoured, training unaffected."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str, env_extra: dict[str, str]) -> str:
    import os

    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_retain_freed_memory_applies_and_honours_opt_out():
    code = "from moecpt.train.host_memory import retain_freed_memory as r; print(r(), r())"
    assert _run(code, {}).split() == ["True", "True"]  # idempotent
    assert _run(code, {"MOECPT_MALLOC_TUNING": "0"}).split() == ["False", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_activation_memory_is_reused_without_page_faults():
    """The point of the tuning: re-allocating a freed 40 MB buffer touches no new pages (no kernel zeroing)."""
    code = """
import resource, torch
from moecpt.train.host_memory import retain_freed_memory
import sys
if sys.argv[-1] == "tuned":
    retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(10_000_000)
before = faults()
for _ in range(5):
    torch.ones(10_000_000)
print(faults() - before)
"""
    untuned = int(subprocess.run([sys.executable, "-c", code, "plain"], capture_output=True, text=True,
                                 check=True).stdout)
    tuned = int(subprocess.run([sys.executable, "-c", code, "tuned"], capture_output=True, text=True,
                               check=True).stdout)
    assert untuned > 5_000  # glibc mmaps and unmaps each 40 MB buffer: ~10k faults per allocation
    assert tuned < untuned / 20
