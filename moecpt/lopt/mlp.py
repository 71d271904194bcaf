"""The per-parameter MLP of the learned optimizers and the layout of its meta-parameters.

Joseph et al., arXiv 2312.02204, Sec. 3 (after ``small_fc_lopt``, Metz et al. arXiv 2203.11860): every element of
every parameter tensor goes through the same MLP ``F -> 32 -> 32 -> 2`` (ReLU) giving a direction ``d`` and a
magnitude ``m``; the outer update is ``θ ← θ − d · exp(0.001 · m) · 0.001`` (``step_scale = "fixed"``, the
paper's). The Adafactor variants also meta-learn the 7 accumulator decays (offsets on ``log(1 − β) / 10``, see
:func:`moecpt.lopt.features.decays_from_offsets`).

``step_scale = "delta-rms"`` (moecpt's scale-aware form, docs/lopt.md): per tensor and round, the pseudo-gradients
are divided by ``s``, the RMS of the mean pseudo-gradient, before they reach the accumulators and features, and
the step is multiplied by ``s · DELTA_RMS_MULT``: ``θ ← θ − s · 0.1 · sqrt(1 + 1e-5) · d · exp(0.001 m)``. Every
input is then invariant to the deltas' scale, so scaling all deltas by ``c`` scales the step by exactly ``c``
(a decaying local LR shrinks the outer step with it), and the ``sgd-like`` initialisation is local SGD,
``θ ← θ + mean Δ``, exactly for LOpt(-A) (and for LAgg(-A) when the workers' deltas have equal RMS).

Meta-parameters are one flat float32 vector (what evolution strategies perturb); :meth:`LOptSpec.unflatten` views
it, or a batch ``[B, N]`` of them, as named tensors ``w0 [B, F, 32]``, ``b0 [B, 32]``, ``w1 [B, 32, 32]``,
``b1 [B, 32]``, ``w2 [B, 32, 2]``, ``b2 [B, 2]`` and (Adafactor kinds) ``decays [B, 7]``. Sizes: LOpt-A 2,409,
LAgg-A with K = 8 2,633 (the paper's "about 2.5k").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

from moecpt.errors import MoecptError
from moecpt.lopt.features import NORM_EPS, NUM_DECAYS, num_features


class LOptKind(StrEnum):
    """What a learned optimizer sees (Joseph et al., arXiv 2312.02204, Sec. 3)."""

    LAGG_A = "lagg-a"  # the K worker deltas, Adafactor features
    LOPT_A = "lopt-a"  # the mean delta, Adafactor features
    LAGG = "lagg"  # the K worker deltas, parameter and time features only
    LOPT = "lopt"  # the mean delta, parameter and time features only


class StepScale(StrEnum):
    """How the MLP's output becomes a parameter step (:func:`step_from_outputs`)."""

    FIXED = "fixed"  # the paper's: 0.001 · d · exp(0.001 m), whatever the deltas' size
    DELTA_RMS = "delta-rms"  # the same in units of the per-tensor RMS of the mean pseudo-gradient


class MetaInit(StrEnum):
    """Initial meta-parameters (:func:`init_meta_params`)."""

    SGD_LIKE = "sgd-like"  # starts as a normalised local-SGD step
    PAPER = "paper"  # learned_optimization's initialisation


KINDS = tuple(k.value for k in LOptKind)
STEP_MULT = 0.001
EXP_MULT = 0.001
SGD_SCALE = 10.0  # the sgd-like init's direction weight: d = SGD_SCALE · (normalised mean pseudo-gradient)
#: delta-rms: with d = SGD_SCALE · g / sqrt(NORM_EPS + 1) (the unit-RMS channel after normalisation), the step
#: STEP_MULT · DELTA_RMS_MULT · s · d is exactly s · g, the raw mean pseudo-gradient (local SGD)
DELTA_RMS_MULT = math.sqrt(1.0 + NORM_EPS) / (STEP_MULT * SGD_SCALE)
RMS_FLOOR = 1e-30  # s below this (an all-zero delta) counts as this: the features are 0 and so is the step


@dataclass(frozen=True)
class LOptSpec:
    """What a learned outer optimizer is: its kind, the number of workers it aggregates, its MLP width.

    Args:
        kind: ``"lagg-a"`` (sees the K worker deltas, Adafactor features), ``"lopt-a"`` (sees the mean delta,
            Adafactor features), ``"lagg"`` / ``"lopt"`` (deltas, parameter and time features only).
        workers: K, the number of worker deltas an aggregator (``lagg*``) sees; must be None or 1 for ``lopt*``.
        hidden: width of the two hidden layers (32 in the paper).
        step_scale: ``"fixed"`` (the paper's step, the default so that weight files without the key keep their
            meaning) or ``"delta-rms"`` (scale-aware; see the module doc).

    Raises:
        MoecptError: unknown kind or step scale, or an aggregator without ``workers >= 1``.
    """

    kind: LOptKind
    workers: int | None = None
    hidden: int = 32
    step_scale: StepScale = StepScale.FIXED

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MoecptError(f"unknown learned optimizer kind {self.kind!r}; use one of {', '.join(KINDS)}")
        object.__setattr__(self, "kind", LOptKind(self.kind))
        if self.step_scale not in tuple(StepScale):
            raise MoecptError(f"unknown step scale {self.step_scale!r}; use one of: {', '.join(StepScale)}")
        object.__setattr__(self, "step_scale", StepScale(self.step_scale))
        if self.aggregator and (self.workers is None or self.workers < 1):
            raise MoecptError(f"{self.kind} needs the number of workers K (>= 1), e.g. workers=8")
        if not self.aggregator and self.workers not in (None, 1):
            object.__setattr__(self, "workers", None)

    @property
    def aggregator(self) -> bool:
        """True for LAgg(-A): the MLP sees each worker's delta (the runtime must gather them)."""
        return self.kind.startswith("lagg")

    @property
    def adafactor(self) -> bool:
        """True for the ``-a`` kinds (momentum, second-moment and Adafactor features, meta-learned decays)."""
        return self.kind.endswith("-a")

    @property
    def delta_channels(self) -> int:
        return int(self.workers) if self.aggregator else 1

    @property
    def input_width(self) -> int:
        """39 for LOpt-A, K + 38 for LAgg-A, 13 for LOpt, K + 12 for LAgg."""
        return num_features(self.delta_channels, self.adafactor)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of each meta-parameter tensor, in flattening order."""
        f, h = self.input_width, self.hidden
        out = {"w0": (f, h), "b0": (h,), "w1": (h, h), "b1": (h,), "w2": (h, 2), "b2": (2,)}
        if self.adafactor:
            out["decays"] = (NUM_DECAYS,)
        return out

    @property
    def num_meta_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``[N]`` or ``[B, N]`` flat meta-parameters -> named views with a leading ``B`` dim (B = 1 for ``[N]``).

        Raises:
            ValueError: the last dim is not :attr:`num_meta_params`.
        """
        if flat.dim() == 1:
            flat = flat[None]
        if flat.shape[-1] != self.num_meta_params:
            raise ValueError(f"{self.kind}: expected {self.num_meta_params} meta-parameters, got {flat.shape[-1]}")
        out, i = {}, 0
        for name, shape in self.shapes().items():
            n = math.prod(shape)
            out[name] = flat[:, i : i + n].reshape(flat.shape[0], *shape)
            i += n
        return out

    def flatten(self, named: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten` for unbatched tensors: name -> tensor of :meth:`shapes` -> ``[N]``."""
        return torch.cat([named[k].reshape(-1).to(torch.float32) for k in self.shapes()])

    def describe(self) -> str:
        k = f", K={self.workers}" if self.aggregator else ""
        return (f"{self.kind}{k} ({self.input_width} inputs, {self.num_meta_params} meta-parameters, "
                f"{self.step_scale} step)")


def init_meta_params(spec: LOptSpec, generator: torch.Generator, init: str = "sgd-like",
                     sgd_scale: float = SGD_SCALE) -> Tensor:
    """Initial flat meta-parameters ``[N]`` (float32).

    * ``"paper"``: weights ~ truncated normal(0, 1/sqrt(fan_in)) cut at 2 std, biases and decay offsets 0
      (learned_optimization's initialisation).
    * ``"sgd-like"`` (default): the same, then two units of each hidden layer are set to carry ``+x`` and ``−x``,
      ``x`` the (normalised) mean of the delta channels, to the direction output with weight ``sgd_scale``, and the
      rest of the output layer is scaled by 0.1. The initial optimizer then takes a step of about
      ``0.001 · sgd_scale`` times the normalised mean delta (a per-tensor normalised local-SGD step): a sensible
      starting point, so that our CPU budget of a few hundred meta-iterations (the paper uses 5k-10k) is spent
      on improving it rather than on discovering descent. The MLP architecture is unchanged. With
      ``spec.step_scale = "delta-rms"`` the rest of the output layer is zeroed instead (the magnitude output is
      then 0), so that with the default ``sgd_scale`` the initial step is local SGD's exactly.
    """
    if init not in tuple(MetaInit):
        raise MoecptError(f"unknown meta-parameter init {init!r}; use 'paper' or 'sgd-like'")
    named: dict[str, Tensor] = {}
    for name, shape in spec.shapes().items():
        if name.startswith("w"):
            w = torch.empty(shape)
            std = 1.0 / math.sqrt(shape[0])
            torch.nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std, generator=generator)
            named[name] = w
        else:
            named[name] = torch.zeros(shape)
    if init == MetaInit.SGD_LIKE:
        c = spec.delta_channels
        w0, w1, w2 = named["w0"], named["w1"], named["w2"]
        w0[:, :2] = 0.0
        w0[:c, 0] = 1.0 / c
        w0[:c, 1] = -1.0 / c
        w1[:, :2] = 0.0
        w1[0, 0] = 1.0
        w1[1, 1] = 1.0
        w2.mul_(0.0 if spec.step_scale == StepScale.DELTA_RMS else 0.1)
        w2[:2, :] = 0.0
        w2[0, 0] = sgd_scale
        w2[1, 0] = -sgd_scale
    return spec.flatten(named)


def mlp_forward(meta: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """Run the MLP on features ``x`` ``[B, N, F]`` with per-copy weights (``w0 [B, F, h]`` ...).

    Returns:
        ``(direction, magnitude)``, each ``[B, N]``.
    """
    h = torch.relu(torch.baddbmm(meta["b0"][:, None, :], x, meta["w0"]))
    h = torch.relu(torch.baddbmm(meta["b1"][:, None, :], h, meta["w1"]))
    out = torch.baddbmm(meta["b2"][:, None, :], h, meta["w2"])
    return out[..., 0], out[..., 1]


def step_from_outputs(direction: Tensor, magnitude: Tensor, scale: Tensor | None = None) -> Tensor:
    """``d · exp(0.001 · m) · 0.001`` (the step subtracted from the parameter), ``[B, N]``.

    Args:
        scale: ``[B]`` per-copy ``s`` of the delta-rms step (the step is multiplied by ``s · DELTA_RMS_MULT``);
            None for the fixed step.
    """
    step = direction * torch.exp(EXP_MULT * magnitude) * STEP_MULT
    return step if scale is None else step * (scale * DELTA_RMS_MULT)[:, None]
