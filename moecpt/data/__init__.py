"""moecpt.data: readers, tokenizer, token shards, the prepared-folder reader, mixture sampling and the demo data.

Public names are imported lazily (``moecpt.cli`` imports this package, and numpy/torch must not slow the CLI).

* :class:`PreparedData` - open a prepared folder (or ``"demo"``);
* :class:`MixtureSampler`, :func:`val_batches` - training / held-out batches;
* :func:`prepare` - tokenize sources into a prepared folder (``moecpt data prepare``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PreparedData", "MixtureSampler", "val_batches", "prepare", "demo_path"]

_WHERE = {
    "PreparedData": "moecpt.data.prepared",
    "MixtureSampler": "moecpt.data.mixture",
    "val_batches": "moecpt.data.mixture",
    "prepare": "moecpt.data.shards",
    "demo_path": "moecpt.data.demo",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'moecpt.data' has no attribute {name!r}")
