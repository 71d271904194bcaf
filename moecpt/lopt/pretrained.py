"""Learned-optimizer weight files and the weights shipped inside the package.

A weight file is a safetensors file holding the meta-parameters as named float32 tensors (``w0``, ``b0``, ``w1``,
``b1``, ``w2``, ``b2`` and, for the Adafactor kinds, ``decays``; see :class:`moecpt.lopt.mlp.LOptSpec`) and string
metadata: ``format = moecpt-lopt``, ``version``, ``kind``, ``workers`` (K, aggregators only), ``hidden``,
``step_scale`` (``fixed`` or ``delta-rms``; files written before it existed have none and are ``fixed``, which is
what they were trained with) and free-form provenance (task, meta-iterations, command). A few KB each.

Shipped (``moecpt/lopt/weights/``): ``lagg-a`` (LAgg-A, K = 8) and ``lopt-a`` (LOpt-A), meta-trained on CPU with
the commands recorded in ``docs/lopt.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from moecpt.errors import MoecptError
from moecpt.lopt.mlp import LOptSpec, StepScale
from moecpt.lopt.optimizers import LearnedOuterOptimizer
from moecpt.storage.atomic import write_bytes_atomic

FORMAT = "moecpt-lopt"
VERSION = "1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PRETRAINED: dict[str, str] = {"lagg-a": "lagg-a.safetensors", "lopt-a": "lopt-a.safetensors"}


def weights_bytes(spec: LOptSpec, phi: Tensor, info: dict[str, object] | None = None) -> bytes:
    """The safetensors bytes of flat meta-parameters ``phi`` ``[N]`` (write them with an atomic writer)."""
    named = {k: v[0].contiguous().clone() for k, v in spec.unflatten(phi.detach().float().cpu()).items()}
    meta = {"format": FORMAT, "version": VERSION, "kind": spec.kind, "hidden": str(spec.hidden),
            "step_scale": spec.step_scale}
    if spec.aggregator:
        meta["workers"] = str(spec.workers)
    for k, v in (info or {}).items():
        meta.setdefault(str(k), str(v))
    return save(named, metadata=meta)


def save_weights(path: str | Path, spec: LOptSpec, phi: Tensor, info: dict[str, object] | None = None) -> None:
    """Atomically write a weight file (see module doc)."""
    write_bytes_atomic(path, weights_bytes(spec, phi, info))


def load_weights(path: str | Path) -> tuple[LOptSpec, Tensor, dict[str, str]]:
    """Read a weight file -> ``(spec, flat meta-parameters [N], metadata)``.

    Raises:
        MoecptError: missing file, not a safetensors file (truncated, corrupted), not a moecpt-lopt file, or
            tensors whose names / shapes do not match the kind it declares.
    """
    p = Path(path)
    if not p.is_file():
        raise MoecptError(f"learned-optimizer weights {p} not found; name an existing .safetensors file (one "
                          f"`moecpt lopt meta-train` wrote) or a shipped optimizer: {', '.join(PRETRAINED)}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            named = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise MoecptError(f"{p} is not a readable safetensors file ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'damaged'}); re-download or re-run "
                          "`moecpt lopt meta-train`, or use a shipped name (lagg-a, lopt-a)") from None
    if meta.get("format") != FORMAT:
        raise MoecptError(f"{p} is not a moecpt learned-optimizer file (format {meta.get('format')!r}); "
                          "write one with `moecpt lopt meta-train`")
    try:
        spec = LOptSpec(meta["kind"], int(meta["workers"]) if "workers" in meta else None, int(meta["hidden"]),
                        meta.get("step_scale", StepScale.FIXED))
    except (KeyError, ValueError):
        raise MoecptError(f"{p} has incomplete metadata (kind / workers / hidden); re-run meta-training") from None
    shapes = spec.shapes()
    if set(named) != set(shapes) or any(tuple(named[k].shape) != s for k, s in shapes.items()):
        raise MoecptError(f"{p} does not hold the tensors of a {spec.describe()}; the file is damaged or was "
                          "edited: re-run `moecpt lopt meta-train` or use a shipped name (lagg-a, lopt-a)")
    phi = spec.flatten(named)
    if not bool(torch.isfinite(phi).all()):
        raise MoecptError(f"{p} holds non-finite meta-parameters; use a shipped name (lagg-a, lopt-a) or retrain")
    return spec, phi, meta


def load_optimizer(path: str | Path, workers: int | None = None) -> LearnedOuterOptimizer:
    """A ready outer optimizer from a weight file; ``workers`` (if given) is checked against a LAgg's K.

    Raises:
        MoecptError: see :func:`load_weights`; or a LAgg file whose K differs from ``workers``.
    """
    spec, phi, _ = load_weights(path)
    if workers is not None and spec.aggregator and spec.workers != workers:
        raise MoecptError(
            f"{Path(path).name} is a {spec.kind} meta-trained for K={spec.workers} workers, not K={workers}; use "
            f"'lopt-a' (works with any K) or meta-train one with `moecpt lopt meta-train --kind {spec.kind} "
            f"--workers {workers}`"
        )
    return LearnedOuterOptimizer(spec, phi)


def pretrained_path(name: str) -> Path:
    """Path of a shipped weight file.

    Raises:
        MoecptError: unknown name (lists the shipped ones).
    """
    if name not in PRETRAINED:
        raise MoecptError(f"no shipped learned optimizer {name!r}; use one of: {', '.join(PRETRAINED)} "
                          "(or load_optimizer(PATH) for your own weight file)")
    return WEIGHTS_DIR / PRETRAINED[name]


def load_pretrained(name: str, workers: int | None = None) -> LearnedOuterOptimizer:
    """A ready outer optimizer with shipped weights: ``"lagg-a"`` (K = 8) or ``"lopt-a"`` (any K).

    A path to a weight file is accepted too. Pass ``workers`` (your K) to fail early, with a one-line
    :class:`MoecptError`, if it does not match a LAgg-A's K (it would otherwise fail at the first step).

    Raises:
        MoecptError: unknown name, missing or damaged weight file, K mismatch.
    """
    path = Path(name) if name.endswith(".safetensors") else pretrained_path(name)
    return load_optimizer(path, workers)
