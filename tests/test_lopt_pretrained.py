"""Shipped weights: they load as ready outer optimizers, beat local SGD on a held-out task, and bad files or names
give one-line errors naming what to use instead."""

from __future__ import annotations

import pytest
import torch

from moecpt.errors import MoecptError
from moecpt.lopt import load_optimizer, load_pretrained
from moecpt.lopt.meta_train import run_outer
from moecpt.lopt.pretrained import pretrained_path, save_weights
from moecpt.lopt.tasks import get_task


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def test_shipped_weights_load():
    lagg = load_pretrained("lagg-a")
    assert lagg.spec.kind == "lagg-a" and lagg.num_workers == 8 and lagg.needs_worker_deltas
    assert lagg.spec.input_width == 46 and lagg.meta_params.numel() == 2633
    lopt = load_pretrained("lopt-a", workers=16)  # LOpt-A works with any K
    assert lopt.spec.input_width == 39 and not lopt.needs_worker_deltas and lopt.num_workers is None
    for name in ("lagg-a", "lopt-a"):
        assert pretrained_path(name).stat().st_size < 64_000


def test_shipped_lagg_a_beats_local_sgd_on_held_out_task():
    # code-lm (tiny transformer on the code corpus) is never used for meta-training; same local LR, same seeds.
    task = get_task("code-lm")
    lagg = load_pretrained("lagg-a")
    _, base = run_outer(task, None, None, 15, 2, 8, 4, torch.Generator().manual_seed(0))
    _, learned = run_outer(task, lagg.spec, lagg.meta_params, 15, 2, 8, 4, torch.Generator().manual_seed(0))
    assert float(learned.mean()) < float(base.mean()) - 0.05, (learned, base)


def test_lagg_with_other_k_is_refused_at_load():
    with pytest.raises(MoecptError, match=r"K=8 workers, not K=4; use 'lopt-a'") as e:
        load_pretrained("lagg-a", workers=4)
    assert "\n" not in str(e.value)


def test_unknown_name_lists_shipped_ones():
    with pytest.raises(MoecptError, match="no shipped learned optimizer 'lagg'; use one of: lagg-a, lopt-a"):
        load_pretrained("lagg")


def test_missing_and_corrupted_files(tmp_path):
    with pytest.raises(MoecptError, match="not found.*lagg-a, lopt-a"):
        load_optimizer(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MoecptError, match="not a readable safetensors file") as e:
        load_optimizer(bad)
    assert "\n" not in str(e.value)
    good = pretrained_path("lopt-a").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(MoecptError, match="not a readable safetensors file"):
        load_optimizer(tmp_path / "trunc.safetensors")


def test_wrong_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w0": torch.zeros(3)}, str(tmp_path / "x.safetensors"),
              metadata={"format": "moecpt-lopt", "kind": "lopt-a", "hidden": "32"})
    with pytest.raises(MoecptError, match="does not hold the tensors"):
        load_optimizer(tmp_path / "x.safetensors")
    save_file({"w0": torch.zeros(3)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(MoecptError, match="not a moecpt learned-optimizer file"):
        load_optimizer(tmp_path / "y.safetensors")


def test_save_and_load_roundtrip(tmp_path):
    lagg = load_pretrained("lagg-a")
    save_weights(tmp_path / "w.safetensors", lagg.spec, lagg.meta_params, {"note": "copy"})
    again = load_optimizer(tmp_path / "w.safetensors", workers=8)
    assert torch.equal(again.meta_params, lagg.meta_params)
