"""Outer optimizers for local SGD: the interface the distributed runtime calls, and the learned ones.

The distributed runtime (local SGD / DiLoCo style) calls an :class:`OuterOptimizer` once per communication round::

    # every worker k starts the round from the global θ, runs H local steps, sends Δ_k = θ_k − θ
    if outer.needs_worker_deltas:      # LAgg(-A): gather the K deltas (K times the traffic of an all-reduce)
        deltas = [torch.stack([delta_k[i] for k in range(K)]) for i in range(n_tensors)]   # each [K, *S]
    else:                              # LOpt(-A), local SGD, SlowMo, DiLoCo: one all-reduce of the mean delta
        deltas = [mean_k delta_k[i] for i in range(n_tensors)]                                # each [*S]
    outer.step(params, deltas)         # updates the global params in place (under torch.no_grad)
    torch.save(outer.state_dict(), f) / outer.load_state_dict(torch.load(f, weights_only=True))

``params`` is the list of global parameter tensors, always in the same order (their shapes are fixed at the first
step; the state is per position). Parameters may be on any device and of any float dtype; the learned optimizers
compute in float32 and write back in the parameter's dtype. The state dict holds plain tensors only (round index
and accumulators), so it round-trips through ``torch.load(weights_only=True)``.

Memory: LOpt-A / LAgg-A keep 10 float32 accumulators per parameter element (momentum x3, second moment, 3
Adafactor diagonals for tensors under 2-D; factored row / column vectors otherwise) and, while processing one
tensor, about ``2 · F`` float32 feature values per element (``F`` = 39 or K + 38); the MLP runs on chunks of
2^18 elements. Tensors are processed one at a time, so the peak is set by the largest tensor.

:func:`lopt_step` is the batched functional core (``[B, *S]`` parameters, ``B`` independent copies with their
own meta-parameters) shared by the runtime wrapper, meta-training and the benchmark.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from moecpt.errors import MoecptError
from moecpt.lopt.features import (
    build_features,
    decays_from_offsets,
    init_accumulators,
    iter_features,
    update_accumulators,
)
from moecpt.lopt.mlp import RMS_FLOOR, LOptSpec, StepScale, mlp_forward, step_from_outputs

MLP_CHUNK = 1 << 16  # elements per feature block and MLP call: bounds a large tensor's transient memory


class OuterOptimizer(ABC):
    """Turns the workers' deltas of one communication round into the global update.

    Attributes:
        needs_worker_deltas: True if :meth:`step` wants every worker's delta (``[K, *S]`` per tensor, a gather);
            False if it wants their mean (``[*S]`` per tensor, an all-reduce).
        num_workers: the K the optimizer is tied to (LAgg-A), or None if any K works.
    """

    needs_worker_deltas: bool = False
    num_workers: int | None = None

    @abstractmethod
    def step(self, params: list[Tensor], deltas: list[Tensor]) -> None:
        """Apply one round's update to ``params`` in place.

        Args:
            params: global parameters ``θ``, each ``[*S_i]``.
            deltas: ``Δ = θ_k − θ``: their mean ``[*S_i]`` or, if :attr:`needs_worker_deltas`, all of them
                stacked ``[K, *S_i]``.

        Raises:
            MoecptError: wrong number of tensors, shapes that do not match, or a K other than :attr:`num_workers`.
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (round index, accumulators) to checkpoint; loadable with ``weights_only=True``."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (before or after the first :meth:`step`)."""

    def _check(self, params: list[Tensor], deltas: list[Tensor]) -> None:
        if len(params) != len(deltas):
            raise MoecptError(f"outer step got {len(params)} parameter tensors but {len(deltas)} deltas; "
                              "pass one delta per parameter, in the same order")
        for i, (p, d) in enumerate(zip(params, deltas)):
            if self.needs_worker_deltas:
                want = f"[K={self.num_workers}, {', '.join(map(str, p.shape))}]"
                if d.dim() != p.dim() + 1 or tuple(d.shape[1:]) != tuple(p.shape):
                    raise MoecptError(f"{type(self).__name__} needs every worker's delta: tensor {i} should be "
                                      f"{want}, got {list(d.shape)}")
                if self.num_workers is not None and d.shape[0] != self.num_workers:
                    raise MoecptError(
                        f"this LAgg checkpoint was meta-trained for K={self.num_workers} workers but got deltas "
                        f"from K={d.shape[0]}; use 'lopt-a' (works with any K) or meta-train a LAgg-A with "
                        f"`moecpt lopt meta-train --kind lagg-a --workers {d.shape[0]}`"
                    )
            elif tuple(d.shape) != tuple(p.shape):
                raise MoecptError(f"{type(self).__name__} takes the mean delta: tensor {i} should be "
                                  f"{list(p.shape)}, got {list(d.shape)} (average the workers' deltas first)")


# ----------------------------------------------------------------------------------------------- batched core
def init_lopt_state(spec: LOptSpec, params: list[Tensor]) -> dict:
    """State of :func:`lopt_step` for batched params ``[B, *S]``: ``{"t": [B] int64, "acc": [dict per tensor]}``."""
    B = params[0].shape[0]
    acc = [init_accumulators(p) for p in params] if spec.adafactor else []
    return {"t": torch.zeros(B, dtype=torch.long, device=params[0].device), "acc": acc}


def lopt_step(
    spec: LOptSpec, meta: dict[str, Tensor], params: list[Tensor], deltas: list[Tensor], state: dict
) -> tuple[list[Tensor], dict]:
    """One learned outer update of ``B`` independent copies (functional; nothing is modified in place).

    Args:
        spec: the optimizer.
        meta: :meth:`LOptSpec.unflatten` of ``[B, N]`` (or ``[1, N]``, broadcast to every copy).
        params: ``[B, *S_i]`` global parameters.
        deltas: ``Δ = θ_k − θ``: ``[B, *S_i]`` mean (LOpt kinds) or ``[B, K, *S_i]`` per worker (LAgg kinds).
        state: from :func:`init_lopt_state` (or a previous call).

    Returns:
        ``(new_params, new_state)``; ``new_params[i] = params[i] − d · exp(0.001 m) · 0.001`` (float32), times
        ``s · DELTA_RMS_MULT`` with ``spec.step_scale = "delta-rms"`` (``s`` ``[B]`` the RMS of tensor ``i``'s mean
        pseudo-gradient, which also divides the deltas before the accumulators and features see them; one extra
        delta-sized float32 buffer per tensor).
    """
    B = params[0].shape[0]
    meta = {k: (v.expand(B, *v.shape[1:]) if v.shape[0] == 1 and B > 1 else v) for k, v in meta.items()}
    decays = decays_from_offsets(meta["decays"]) if spec.adafactor else None
    t = state["t"]
    new_params, new_acc = [], []
    for i, (p, d) in enumerate(zip(params, deltas)):
        p = p.to(torch.float32)
        d = d.to(torch.float32)
        small = p[0].numel() <= MLP_CHUNK
        # pseudo-gradients g = -Δ; on a large tensor the K worker channels stay a view of Δ, negated per block
        g = -(d.mean(dim=1) if spec.aggregator else d)
        scale = None
        if spec.step_scale == StepScale.DELTA_RMS:  # the optimizer sees unit-RMS deltas, steps in units of s
            scale = g.reshape(B, -1).square().mean(dim=1).sqrt().clamp_min(RMS_FLOOR)  # [B]
            d = d / scale.reshape(B, *([1] * (d.dim() - 1)))
            g = g / scale.reshape(B, *([1] * (g.dim() - 1)))
        if small:
            chans = (-d).movedim(1, -1) if spec.aggregator else g[..., None]
        else:
            chans = d.movedim(1, -1) if spec.aggregator else d[..., None]
        acc, fac_g = (update_accumulators(state["acc"][i], g, decays, with_fac_g=small) if spec.adafactor
                      else (None, None))
        if acc is not None:
            new_acc.append(acc)
        if small:
            step = step_from_outputs(*mlp_forward(meta, build_features(chans, p, t, acc, fac_g)), scale)
        else:  # features and MLP activations a block of rows at a time: bounded memory on large tensors
            step = torch.cat([step_from_outputs(*mlp_forward(meta, x), scale)
                              for x in iter_features(chans, p, t, g, acc, MLP_CHUNK, negate_deltas=True)], dim=1)
        new_params.append(p - step.reshape(p.shape))
    return new_params, {"t": t + 1, "acc": new_acc}


# --------------------------------------------------------------------------------------------- runtime wrapper
class LearnedOuterOptimizer(OuterOptimizer):
    """LAgg-A / LOpt-A / LAgg / LOpt as the outer optimizer of a distributed runtime (``B = 1`` of :func:`lopt_step`).

    Args:
        spec: the optimizer's kind and K.
        meta_params: flat ``[N]`` meta-parameters (from :func:`moecpt.lopt.load_pretrained` or meta-training).
    """

    def __init__(self, spec: LOptSpec, meta_params: Tensor):
        self.spec = spec
        self.meta_params = meta_params.detach().to(torch.float32).reshape(-1).clone()
        spec.unflatten(self.meta_params)  # validates the size
        self.needs_worker_deltas = spec.aggregator
        self.num_workers = spec.workers if spec.aggregator else None
        self._state: dict | None = None
        self._pending: dict[str, Tensor] | None = None
        self._meta_cache: tuple[torch.device, dict[str, Tensor]] | None = None

    def __repr__(self) -> str:
        return f"LearnedOuterOptimizer({self.spec.describe()})"

    def meta_tensors(self, device: torch.device) -> dict[str, Tensor]:
        """The meta-parameters unflattened into the MLP's named tensors (:meth:`LOptSpec.unflatten`) on
        ``device``, cached per device: what :func:`lopt_step` takes, for callers that run the step themselves
        (:class:`moecpt.distributed.lopt_shards.ShardedLearnedOuter`, on whole tensors gathered from shards)."""
        if self._meta_cache is None or self._meta_cache[0] != device:
            self._meta_cache = (device, self.spec.unflatten(self.meta_params.to(device)))
        return self._meta_cache[1]

    @torch.no_grad()
    def step(self, params: list[Tensor], deltas: list[Tensor]) -> None:
        self._check(params, deltas)
        batched_p = [p.detach()[None] for p in params]
        batched_d = [d.detach()[None] for d in deltas]
        if self._state is None:
            self._state = init_lopt_state(self.spec, batched_p)
            if self._pending is not None:
                self._restore(self._pending, batched_p)
                self._pending = None
        meta = self.meta_tensors(params[0].device)
        new_p, self._state = lopt_step(self.spec, meta, batched_p, batched_d, self._state)
        for p, q in zip(params, new_p):
            p.copy_(q[0].to(p.dtype))

    @property
    def round(self) -> int:
        """Rounds taken so far (the ``t`` of the time features)."""
        if self._state is not None:
            return int(self._state["t"][0])
        return int(self._pending["t"]) if self._pending is not None else 0

    def state_dict(self) -> dict[str, Tensor]:
        if self._state is None:
            return dict(self._pending) if self._pending is not None else {"t": torch.tensor(0, dtype=torch.long)}
        out = {"t": self._state["t"][0].clone().cpu(),
               "num_tensors": torch.tensor(len(self._state["acc"]) if self.spec.adafactor else -1)}
        for i, acc in enumerate(self._state["acc"]):
            for name, v in acc.items():
                out[f"acc.{i}.{name}"] = v[0].clone().cpu()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "t" not in state:
            raise MoecptError("not a learned outer optimizer state (no 't'); pass what state_dict() returned")
        if self._state is None:  # shapes are known only at the first step: restore then
            self._pending = {k: v.clone() for k, v in state.items()}
            return
        self._restore(state, [torch.empty(0)] * len(self._state["acc"]))

    def _restore(self, state: dict[str, Tensor], batched_params: list[Tensor]) -> None:
        assert self._state is not None
        dev = self._state["t"].device
        acc_keys = [k for k in state if k.startswith("acc.")]
        want = {f"acc.{i}.{n}": v for i, a in enumerate(self._state["acc"]) for n, v in a.items()}
        if set(acc_keys) != set(want):
            raise MoecptError(f"outer optimizer state does not match these parameters ({len(acc_keys)} accumulator "
                              f"tensors saved, {len(want)} expected); it was saved for another model or kind")
        for k, v in want.items():
            if tuple(state[k].shape) != tuple(v.shape[1:]):
                raise MoecptError(f"outer optimizer state {k} has shape {list(state[k].shape)}, expected "
                                  f"{list(v.shape[1:])}; it was saved for another model")
        self._state["t"] = torch.full_like(self._state["t"], int(state["t"]))
        for k in want:
            _, i, n = k.split(".")
            self._state["acc"][int(i)][n] = state[k].to(dev, torch.float32)[None].clone()
