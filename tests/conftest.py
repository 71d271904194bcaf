"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Many small kernels: one intra-op thread is fastest, and far faster on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """``(out, study, results)``: the bundled smoke study, run once per session (the slowest set-up there is);
    tests that change its folder work on a copy."""
    from moecpt.config import find_bundled_recipe
    from moecpt.study.config import load_study_recipe
    from moecpt.study.runner import run_study

    out = tmp_path_factory.mktemp("study") / "smoke"
    study = load_study_recipe(find_bundled_recipe("study/smoke"))
    results = run_study(study, out, jobs=2, log=lambda *_: None)
    return out, study, results


def _mount_tmpfs(path, options: str) -> bool:
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write into: a read-only tmpfs where this user may mount one (root), else a chmod 0555
    folder (which root would ignore, hence the mount); skipped when neither works."""
    import os

    d = tmp_path / "ro"
    if os.geteuid() == 0:
        if not _mount_tmpfs(d, "ro,size=1m"):
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        yield d
        _umount(d)
        return
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


@pytest.fixture
def small_fs(tmp_path):
    """``make(size)``: a tmpfs of ``size`` (e.g. ``"3m"``) to fill up; skipped where this user cannot mount one."""
    mounted = []

    def make(size: str):
        d = tmp_path / f"fs{len(mounted)}"
        if not _mount_tmpfs(d, f"size={size}"):
            pytest.skip("cannot mount a small tmpfs here (needs root); a full disk cannot be made")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        _umount(d)
