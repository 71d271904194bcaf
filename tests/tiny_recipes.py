"""A tiny training recipe shared by the trainer and CPT tests."""

from __future__ import annotations

import copy


def raw_recipe(preset: str = "smoke-switch", *, steps: int = 6, checkpoint_every: int = 3, **sections) -> dict:
    """A tiny recipe dict (seq 32, batch 8, one eval source, one eval batch); ``sections`` are merged in."""
    raw = {
        "name": "t",
        "model": {"preset": preset},
        "data": {"path": "demo", "mixture": {"english": 1.0}, "seq_len": 32, "eval_sources": ["english"]},
        "optim": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"kind": "cosine", "warmup_fraction": 0.25},
        "train": {"steps": steps, "batch_size": 8, "eval_every": 100, "eval_batches": 1,
                  "checkpoint_every": checkpoint_every, "device": "cpu"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {})
        raw[name] = {**raw[name], **copy.deepcopy(values)} if isinstance(values, dict) else values
    return raw
