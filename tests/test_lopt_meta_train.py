"""Meta-training: a tiny run resumes exactly; schedule; CLI and task-name errors."""

from __future__ import annotations

import json

import pytest
import torch

from moecpt.cli import main
from moecpt.errors import MoecptError
from moecpt.lopt.meta_train import MetaTrainConfig, meta_lr, meta_train
from moecpt.lopt.pretrained import load_weights
from moecpt.lopt.tasks import BENCH_TASKS, META_TRAIN_TASKS, get_task

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


TINY = dict(tasks=("wine-mlp32",), iterations=2, pairs=2, truncation=2, min_length=3, max_length=5,
            workers=2, local_steps=1, eval_every=1, eval_rounds=2, eval_seeds=1, save_every=1)


@pytest.mark.parametrize("kind", ["lagg-a", "lopt"])
def test_interrupted_meta_training_resumes_exactly(tmp_path, kind):
    cfg = MetaTrainConfig(kind=kind, **TINY)
    meta_train(cfg, tmp_path / "straight", progress=False)
    first = meta_train(cfg, tmp_path / "resumed", progress=False, max_seconds=0.0)  # stops after iteration 1
    assert first["iterations_done"] == 1
    done = meta_train(cfg, tmp_path / "resumed", progress=False)
    assert done["iterations_done"] == 2
    _, a, _ = load_weights(tmp_path / "straight" / f"{kind}.safetensors")
    _, b, _ = load_weights(tmp_path / "resumed" / f"{kind}.safetensors")
    assert torch.equal(a, b)
    hist = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert len(hist["meta_loss"]["wine-mlp32"]) == 2
    assert hist["progress"]["iterations_done"] == 2 and hist["progress"]["eta_seconds"] == 0.0
    assert hist["progress"]["seconds_per_iteration"] > 0
    assert (tmp_path / "resumed" / "curve.png").stat().st_size > 1000


def test_resume_with_other_settings_is_refused(tmp_path):
    meta_train(MetaTrainConfig(kind="lopt", **TINY), tmp_path, progress=False)
    with pytest.raises(MoecptError, match="other settings.*sigma"):
        meta_train(MetaTrainConfig(kind="lopt", **{**TINY, "sigma": 0.02}), tmp_path, progress=False)


def test_task_distribution_deals_pairs_out_and_old_fixed_runs_resume(tmp_path):
    assert not set(META_TRAIN_TASKS) & set(BENCH_TASKS)  # the benchmark's tasks stay held out
    widths = {get_task(n).hidden for n in META_TRAIN_TASKS if n.endswith(("mlp16", "mlp32", "mlp64", "mlp64x2"))}
    assert len(widths) >= 3 and any(n.endswith("-lm") for n in META_TRAIN_TASKS)
    assert MetaTrainConfig().step_scale == "delta-rms" and MetaTrainConfig().tasks == META_TRAIN_TASKS
    cfg = MetaTrainConfig(kind="lopt", **{**TINY, "tasks": ("wine-mlp32", "iris-mlp16"), "pairs": 3,
                                          "iterations": 1}, step_scale="fixed")
    assert cfg.task_pairs() == [2, 1]
    assert meta_train(cfg, tmp_path, progress=False)["iterations_done"] == 1
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["step_scale"]  # a run folder from before the option: it had the fixed step
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert meta_train(cfg, tmp_path, progress=False)["iterations_done"] == 1  # resumes (nothing left to do)
    cfg.iterations = 2
    with pytest.raises(MoecptError, match=r"other settings \(iterations\)"):  # still compared key by key
        meta_train(cfg, tmp_path, progress=False)
    with pytest.raises(MoecptError, match="--pairs 1 is below the number of tasks"):
        MetaTrainConfig(**{**TINY, "tasks": ("wine-mlp32", "iris-mlp16"), "pairs": 1}).validate()


def test_meta_lr_warmup_then_cosine():
    cfg = MetaTrainConfig(iterations=100, warmup_fraction=0.05)
    assert meta_lr(0, cfg) == pytest.approx(3e-3 / 5)
    assert meta_lr(4, cfg) == pytest.approx(3e-3)
    assert meta_lr(5, cfg) == pytest.approx(3e-3)
    assert meta_lr(99, cfg) == pytest.approx(1e-3, rel=1e-2)
    assert 1e-3 < meta_lr(50, cfg) < 3e-3


def test_unknown_task_is_a_one_line_error(capsys):
    with pytest.raises(MoecptError, match="unknown lopt task 'mnist'; use one of: digits-mlp32"):
        get_task("mnist")
    assert main(["lopt", "meta-train", "--task", "mnist", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moecpt: error: unknown lopt task 'mnist'") and "\n" not in err
    assert main(["lopt", "bench", "--tasks", "nope", "--json"]) == 2
    assert "unknown lopt task 'nope'" in capsys.readouterr().err


def test_batched_mlp_gradients_match_autograd():
    from moecpt.lopt.tasks import Task

    task = get_task("digits-mlp64x2")
    gen = torch.Generator().manual_seed(0)
    params = task.init_params(3, gen)
    batch = task.sample(3, gen)
    loss, grads = task.loss_and_grads(params, batch)
    loss_ref, grads_ref = Task.loss_and_grads(task, params, batch)
    assert torch.allclose(loss, loss_ref, atol=1e-6)
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, grads_ref))
