"""What people compare runs by: micro-batch-independent validation, per-step MFU / peak memory / tokens per source,
the resolved configuration, ``--dry-run``, and step metrics that declare their cross-rank reduction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moecpt.config import recipe_from_dict
from moecpt.train.callbacks import CallbackList
from moecpt.train.parallel import SingleSync, DistInfo
from moecpt.train.trainer import Trainer

from tiny_recipes import raw_recipe


def _val_loss(tmp_path, model, micro: int | None) -> float:
    raw = raw_recipe("smoke-granular", train={"eval_batches": 2, "micro_batch_size": micro})
    r = recipe_from_dict(raw)
    tr = Trainer(r, tmp_path / f"eval-{micro}", show_progress=False)
    try:
        state = SimpleNamespace(model=model, evals=tr._make_evals(), tokens=0, callbacks=CallbackList([]),
                                sync=SingleSync(r, DistInfo(), 1, 1, torch.device("cpu")))
        return tr._evaluate(state, 0)["english"]
    finally:
        tr.release()


def test_validation_loss_does_not_depend_on_micro_batching(tmp_path):
    from moecpt.model.transformer import build_model

    torch.manual_seed(0)
    tr = Trainer(recipe_from_dict(raw_recipe("smoke-granular")), tmp_path / "cfg", show_progress=False)
    tr.release()
    model = build_model(tr.model_cfg)
    losses = [_val_loss(tmp_path, model, m) for m in (1, 2, 4, None)]
    assert max(losses) - min(losses) <= 1e-6, losses
