"""Learned outer optimizers for communication-efficient (local SGD) training: LAgg-A, LOpt-A, LAgg, LOpt.

Joseph, Thérien, Moudgil, Knyazev, Belilovsky, "Meta-learning Optimizers for Communication-Efficient Learning",
arXiv 2312.02204 (TMLR 2025). See ``docs/lopt.md``.

* :func:`load_pretrained` (``"lagg-a"``: K = 8, ``"lopt-a"``: any K) -> a ready :class:`OuterOptimizer`.
* :class:`OuterOptimizer`: the interface a distributed runtime calls once per communication round with the
  workers' deltas ``Δ_k = θ_k − θ`` (:mod:`moecpt.lopt.optimizers` documents the protocol); hand-designed ones
  in :mod:`moecpt.lopt.baselines` (local SGD, SlowMo, DiLoCo).
* Meta-training: :func:`moecpt.lopt.meta_train.meta_train` / ``moecpt lopt meta-train``; benchmark:
  ``moecpt lopt bench``.

Module map: ``features`` (inputs), ``mlp`` (the per-parameter MLP and meta-parameter layout), ``optimizers``
(update rule, interface), ``baselines``, ``tasks`` (offline tasks), ``pes`` (gradient estimator),
``meta_train``, ``bench``, ``pretrained`` (weight files), ``cli``.
"""

from __future__ import annotations

from moecpt.lopt.baselines import DiLoCo, LocalSGD, SlowMo
from moecpt.lopt.mlp import LOptSpec
from moecpt.lopt.optimizers import LearnedOuterOptimizer, OuterOptimizer
from moecpt.lopt.pretrained import load_optimizer, load_pretrained

__all__ = [
    "DiLoCo",
    "LOptSpec",
    "LearnedOuterOptimizer",
    "LocalSGD",
    "OuterOptimizer",
    "SlowMo",
    "load_optimizer",
    "load_pretrained",
]
