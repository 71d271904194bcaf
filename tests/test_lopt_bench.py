"""The benchmark's fair tuning (grids that widen off their edges, a validation split, DiLoCo with AdamW workers)
and the decaying-schedule harness where the paper's fixed learned step keeps kicking and the delta-rms one does not."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moecpt.errors import MoecptError
from moecpt.lopt import LearnedOuterOptimizer, LOptSpec, load_pretrained
from moecpt.lopt.bench import BenchConfig, run_bench, run_method
from moecpt.lopt.tasks import get_task
from moecpt.lopt.tuning import Axis, AxisKind, search

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def test_search_widens_off_open_edges_until_inside_and_reports_the_cap():
    calls = []

    def score(pts, rnd):
        calls.append(len(pts))
        return [(math.log2(p["lr"]) - 2) ** 2 + (p["beta"] - 0.95) ** 2 for p in pts]

    grid = {"lr": Axis((0.25, 0.5, 1.0)), "beta": Axis((0.0, 0.5, 0.9), AxisKind.MOMENTUM)}
    done = search(grid, score, cap=3)
    assert done["best"] == {"lr": 4.0, "beta": 0.95} and not done["cap_hit"]
    assert done["grid"]["lr"].values == (0.25, 0.5, 1.0, 2.0, 4.0, 8.0) and 0.975 in done["grid"]["beta"].values
    assert done["points"] == sum(calls) == 6 * 5  # every point scored once, new points only
    short = search(grid, score, cap=1)
    assert short["cap_hit"] and "lr:high" in short["open_edges"] and short["best"]["lr"] == 2.0
    # beta = 0 is a closed end: a best point there is not widened below it
    at_zero = search({"beta": Axis((0.0, 0.5, 0.9), AxisKind.MOMENTUM)}, lambda pts, r: [p["beta"] for p in pts], 3)
    assert at_zero["best"] == {"beta": 0.0} and at_zero["widening_rounds"] == 0 and not at_zero["cap_hit"]


def test_tuning_task_sets_a_validation_split_aside():
    for name in ("cancer-mlp32", "code-lm"):
        task = get_task(name)
        tt = task.tuning_task()
        if name == "code-lm":
            assert len(tt.train_ids) < len(task.train_ids)
            assert torch.equal(tt.train_ids, task.train_ids[: len(tt.train_ids)])
        else:
            fit = {tuple(r) for r in tt.x.tolist()}
            assert len(tt.y) + len(tt.y_val) == len(task.y) and not fit & {tuple(r) for r in tt.x_val.tolist()}
        assert torch.equal(tt.eval_batch("heldout")[0], task.eval_batch("heldout")[0])
        with pytest.raises(ValueError, match="tuning_task"):
            task.eval_batch("val")


def test_bench_tunes_every_method_on_validation_and_reports_grids(tmp_path):
    cfg = BenchConfig.make(quick=True, tasks="wine-mlp32", local_steps="2", rounds=4, seeds=2,
                           methods="lopt-a,local-sgd,slowmo,diloco-adamw,diloco-sgd")
    rows, _ = run_bench(cfg, out=tmp_path, progress=False)
    by = {r["method"]: r for r in rows}
    for r in rows:
        tu = r["tuning"]
        inner = "inner_lr" if r["method"] == "diloco-adamw" else "lr_mult"
        assert inner in r["hyperparams"] and r["seeds"] == 2
        for name, value in r["hyperparams"].items():  # inside its grid, or the row says the cap was hit
            vals = tu["grid"][name]
            on_edge = (value == vals[-1]) or (value == vals[0] and not (value == 0 and name in ("beta", "momentum")))
            assert not on_edge or (tu["cap_hit"] and any(e.startswith(name) for e in tu["open_edges"])), r
    assert 0.0 in by["slowmo"]["tuning"]["grid"]["beta"] and 1.0 in by["slowmo"]["tuning"]["grid"]["slow_lr"]
    assert by["diloco-adamw"]["label"] == "DiLoCo (AdamW workers)"
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["config"]["tuning_criterion"].startswith("validation") and saved["rows"][0]["tuning"]["grid"]
    md = (tmp_path / "bench.md").read_text()
    assert "DiLoCo (SGD workers)" in md and "grid searched" in md
    with pytest.raises(MoecptError, match="diloco-adamw, as published, or diloco-sgd"):
        BenchConfig.make(methods="diloco")


def test_decaying_inner_lr_fixed_step_keeps_kicking_delta_rms_follows():
    # The same shipped LOpt-A MLP with the paper's fixed step and with the delta-rms step, under a cosine decay of
    # the workers' LR to 1e-3 of its peak over 40 rounds (digits-mlp32, K = 8, H = 4).
    task = get_task("digits-mlp32")
    fixed = load_pretrained("lopt-a")
    scaled = LearnedOuterOptimizer(LOptSpec("lopt-a", step_scale="delta-rms"), fixed.meta_params)
    ratios = {}
    for name, opt in (("fixed", fixed), ("delta-rms", scaled)):
        res = run_method(task, "lopt-a", [{"lr_mult": 1.0}], [0], 4, 8, 40, {"lopt-a": opt},
                         torch.Generator().manual_seed(0), "cosine")
        r = res["step_rms"][:, 0] / res["delta_rms"][:, 0]
        ratios[name] = (float(r[:4].mean()), float(r[-4:].mean()))
    (f0, f1), (s0, s1) = ratios["fixed"], ratios["delta-rms"]
    assert f1 > 100 * f0, ratios  # measured: 1.4 -> 979: the step stays ~6e-3 while the deltas fall to ~6e-6
    assert s1 < 1.5 * s0, ratios  # measured: 1.5 -> 1.5: the step follows the deltas down
