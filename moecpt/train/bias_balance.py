"""The auxiliary-loss-free bias update (DeepSeek-V3; Wang et al. 2024, arXiv 2408.15664) as an optimizer hook.

A bias-balanced router (:attr:`moecpt.model.routing.Router.is_bias_balanced`) counts its routed slots during the
step's training forwards; once the optimizer has stepped, every such router moves its selection bias by
``gamma * sign(mean_load - load_i)`` (:meth:`~moecpt.model.routing.Router.update_bias`, docs/design.md, rule R6).
Registering that as ``torch.optim.Optimizer.register_step_post_hook`` (as torchtitan does for its MoE bias) ties
the update to the optimizer step itself: a skipped non-finite step, which never calls ``step()``, updates no bias,
and no training loop can forget the call.
"""

from __future__ import annotations

from typing import Any

import torch

from moecpt.model.transformer import Transformer


def update_router_biases(model: Transformer, loads: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Bias update of every router of ``model``.

    Args:
        model: the worker's model.
        loads: ``[E]`` routed-slot counts of the step per bias-balanced router, in layer order, summed over the
            workers (every-step data parallelism all-reduces them); None: each router's own ``step_load``
            (one process, or a local-SGD worker between rounds).

    Returns:
        ``{"bias_mean_layers": [...], "bias_mean_mean": x, ...}`` for the step's record; ``{}`` without bias routers.
    """
    stats: dict[str, list[float]] = {}
    biased = [rt for rt in model.routers() if rt.is_bias_balanced]
    load_of = {id(rt): load for rt, load in zip(biased, loads or [])}
    for router in model.routers():
        for k, v in router.update_bias(load_of.get(id(router))).items():
            stats.setdefault(k, []).append(v)
    return {f"{k}_layers": v for k, v in stats.items()} | {f"{k}_mean": sum(v) / len(v) for k, v in stats.items()}


class BiasUpdateHook:
    """``optimizer.step()`` post-hook running :func:`update_router_biases` for one worker.

    The trainer sets :attr:`loads` (the reduced counts of this step, or None) before stepping and reads
    :attr:`stats` after; both are reset each step.
    """

    def __init__(self, model: Transformer):
        self.model = model
        self.loads: list[torch.Tensor] | None = None
        self.stats: dict[str, Any] = {}

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.stats = update_router_biases(self.model, self.loads)
        self.loads = None

    @classmethod
    def attach(cls, model: Transformer, optimizer: torch.optim.Optimizer) -> "BiasUpdateHook | None":
        """Register a hook on ``optimizer`` if ``model`` has a bias-balanced router; None otherwise."""
        if not any(rt.is_bias_balanced for rt in model.routers()):
            return None
        hook = cls(model)
        optimizer.register_step_post_hook(hook)
        return hook
