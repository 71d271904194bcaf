"""Mixture-of-Experts feed-forward layer: routed GLU experts, optional shared experts, dispatch and combine.

Experts are gated linear units (GEGLU or SwiGLU, Shazeer 2020) stored stacked so that one grouped matmul can run
all of them: ``w_in_EDW [E, D, 2F]`` (gate and up halves) and ``w_out_EFD [E, F, D]``.

Dispatch paths (docs/design.md, rule R9):

* ``grouped`` (default): the ``T*K`` routed slots are sorted by expert and each expert's contiguous slice of tokens
  goes through its FFN, in one fused autograd node for gather, experts and combine
  (:mod:`moecpt.model.expert_dispatch`): ``torch._grouped_mm`` runs all experts in one call where it works (CPU;
  CUDA Hopper, sm90, in bf16), elsewhere a few padded ``bmm`` runs.
* ``loop``: the simple reference, one masked gather per expert; tests check both agree in outputs and gradients.

Dropless by default (Thérien et al. 2025 train dropless). With ``capacity_factor`` set, each expert takes at most
``ceil(cf * T * K / E)`` slots in token order (Switch Transformer, Fedus et al. 2022, Sec. 2.2); dropped slots
contribute nothing (the residual stream carries the token) and their share is reported.

The routed experts are a replaceable module (:meth:`MoELayer.replace_experts`): anything with ``num_experts`` and
:meth:`RoutedExperts.forward_grouped`'s signature computes the gate-weighted expert outputs of the layer's routed
slots. Routing, capacity and the shared experts stay here, so a replacement changes *where* experts compute, never
*what* is computed: expert parallelism (:mod:`moecpt.distributed.expert_parallel`) plugs in this way, and the
layer's hot path has no branch on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.config import DispatchKind, FFNKind, ModelConfig
from moecpt.model.glu import glu_activation, glu_combine
from moecpt.model.expert_dispatch import (  # noqa: F401  (plan_expert_groups: re-exported)
    build_dispatch_plan,
    grouped_experts,
    grouped_mm_usable,
    plan_expert_groups,
)
from moecpt.model.routing import Router, RouterOutput


class GLUFeedForward(nn.Module):
    """Dense GLU feed-forward ``D -> 2F -> F -> D`` (no biases). Used as the dense FFN and as the shared expert."""

    def __init__(self, d_model: int, width: int, kind: FFNKind):
        super().__init__()
        self.kind = kind
        self.w_in = nn.Linear(d_model, 2 * width, bias=False)  # [gate | up]
        self.w_out = nn.Linear(width, d_model, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        # gate and up as two matmuls on the weight's contiguous row halves: the activation then runs on contiguous
        # tensors (see moecpt.model.glu); same values as chunking one [N, 2F] product
        w_gate, w_up = self.w_in.weight.chunk(2, dim=0)
        return self.w_out(glu_combine(F.linear(x_ND, w_gate), F.linear(x_ND, w_up), self.kind))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class RoutedExperts(nn.Module):
    """``E`` GLU experts of width ``F`` with stacked weights.

    Args:
        num_experts: ``E``; d_model: ``D``; width: ``F``; kind: an :class:`FFNKind`.
        bias: biases on both projections, ``b_in [E, 2F]`` (``[gate | up]``) and ``b_out [E, D]`` (GPT-OSS).

    Biases and the clamped SwiGLU run in the fused grouped kernel of :mod:`moecpt.model.expert_dispatch` as
    well as on the per-expert reference path (:meth:`forward_expert`).
    """

    def __init__(self, num_experts: int, d_model: int, width: int, kind: FFNKind, bias: bool = False):
        super().__init__()
        self.num_experts, self.d_model, self.width, self.kind = num_experts, d_model, width, kind
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, 2 * width))  # [E, D, 2F]
        self.w_out = nn.Parameter(torch.empty(num_experts, width, d_model))  # [E, F, D]
        self.b_in = nn.Parameter(torch.zeros(num_experts, 2 * width)) if bias else None  # [E, 2F]
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None  # [E, D]

    def forward_grouped(self, x_TD: torch.Tensor, gate_TK: torch.Tensor, topk_idx_TK: torch.Tensor,
                        order_N: torch.Tensor, counts_E: torch.Tensor, overhead_rows: int,
                        use_grouped_mm: bool | None = None) -> torch.Tensor:
        """Gate-weighted expert outputs through the grouped dispatch of :mod:`moecpt.model.expert_dispatch`.

        Under autocast the matmuls run in the autocast dtype; the result comes back in ``x_TD``'s dtype.

        Args:
            x_TD: ``[T, D]``; gate_TK: ``[T, K]`` gate values; topk_idx_TK: ``[T, K]`` chosen experts;
            order_N: ``[N]`` kept slots ``t * K + k`` stably sorted by expert; counts_E: ``[E]`` kept slots per
            expert; overhead_rows: the padded layout's price of one more run, in rows; use_grouped_mm: the
            layout (None: ``torch._grouped_mm`` wherever :func:`grouped_mm_usable` says it runs).

        Returns:
            ``[T, D]``.
        """
        dtype = _compute_dtype(x_TD)
        dev = x_TD.device
        if use_grouped_mm is None:
            use_grouped_mm = grouped_mm_usable(self.d_model, self.width, dtype, dev)
        plan = build_dispatch_plan(
            topk_idx_TK, order_N, counts_E, overhead_rows=overhead_rows, grouped_mm=use_grouped_mm,
            batch_quantum=torch.get_num_threads() if dev.type == "cpu" else 1)
        with torch.autocast(device_type=dev.type, enabled=False):
            b_in = None if self.b_in is None else self.b_in.to(dtype)
            b_out = None if self.b_out is None else self.b_out.to(dtype)
            y_TD = grouped_experts(x_TD.to(dtype), gate_TK.to(dtype), self.w_in.to(dtype), self.w_out.to(dtype),
                                   plan, self.kind, b_in, b_out)
        return y_TD.to(x_TD.dtype)

    def forward_expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x_ND [N, D]`` (reference path; the one for biased / clamped experts)."""
        h_NW = x_ND @ self.w_in[e].to(x_ND.dtype)
        if self.b_in is not None:
            h_NW = h_NW + self.b_in[e].to(x_ND.dtype)
        y_ND = glu_activation(h_NW, self.kind) @ self.w_out[e].to(x_ND.dtype)
        return y_ND if self.b_out is None else y_ND + self.b_out[e].to(x_ND.dtype)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Switch capacity: ``ceil(cf * T * K / E)`` slots per expert (Fedus et al. 2022, eq. 3)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


class MoELayer(nn.Module):
    """MoE FFN: router + routed experts (+ shared experts). Forward ``x_TD -> (y_TD, RouterOutput)``.

    Args:
        cfg: model config with ``cfg.moe`` set. Routed experts have width ``cfg.resolved_expert_width``; shared
            experts form one always-on GLU FFN of width ``num_shared_experts * expert_width`` (docs/design.md, rule R8).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.capacity_factor = moe.capacity_factor
        self.dispatch = moe.dispatch
        width = cfg.resolved_expert_width
        #: grouped dispatch without ``_grouped_mm``: price of one more expert run, in rows (plan_expert_groups).
        #: One run costs ~7 matmul calls of Python and dispatch, a fixed cost priced here at 2**20 * 12 FLOPs; one row
        #: costs ~D * F * 12 FLOPs (forward + backward of the GLU): the break-even row count falls as experts get wider.
        self.group_overhead_rows = max(1, round(2**20 / (cfg.d_model * width)))
        #: grouped dispatch layout: None = ``torch._grouped_mm`` wherever it runs, False = padded ``bmm`` runs
        self.use_grouped_mm: bool | None = None
        self.router = Router(cfg.d_model, moe.num_experts, moe.top_k, moe.router)
        self.experts = RoutedExperts(moe.num_experts, cfg.d_model, width, cfg.ffn_kind, bias=moe.expert_bias)
        shared_width = moe.shared_expert_width or moe.num_shared_experts * width
        self.shared = GLUFeedForward(cfg.d_model, shared_width, cfg.ffn_kind) if shared_width else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if (self.shared and moe.shared_expert_gate) else None

    def replace_experts(self, experts: nn.Module) -> nn.Module:
        """Swap the routed-experts module for ``experts`` (the same ``num_experts`` and the signature of
        :meth:`RoutedExperts.forward_grouped`; grouped dispatch only: the ``loop`` reference path calls
        ``forward_expert`` of every expert).
        Its parameters keep the names ``experts.w_in`` / ``experts.w_out``. Returns the module it replaced.

        Raises:
            ValueError: a different expert count, or a layer on the ``loop`` dispatch.
        """
        if getattr(experts, "num_experts", None) != self.num_experts:
            raise ValueError(f"replacement experts hold {getattr(experts, 'num_experts', None)} experts; the layer "
                             f"routes to {self.num_experts}")
        if self.dispatch == DispatchKind.LOOP:
            raise ValueError("the loop dispatch runs RoutedExperts.forward_expert itself; use dispatch = 'grouped'")
        old, self.experts = self.experts, experts
        return old

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """``x_TD [T, D]`` (sequences of ``seq_len`` tokens flattened; None = one sequence) -> ``(y_TD, record)``."""
        if x_TD.dim() != 2:
            raise ValueError(f"MoELayer expects tokens as [T, D], got shape {tuple(x_TD.shape)}; "
                             "flatten batch and time first")
        r = self.router(x_TD, seq_len)
        T, K = r.topk_idx_TK.shape
        if self.dispatch == DispatchKind.LOOP:
            y_TD, keep_TK = self._forward_loop(x_TD, r)
        else:
            y_TD, keep_TK = self._forward_grouped(x_TD, r)
        if keep_TK is not None:
            r.topk_weight_TK = r.topk_weight_TK * keep_TK
            r.dropped_fraction = 1.0 - keep_TK.float().mean()
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        return y_TD, r

    def _capacity_keep_sorted(self, sorted_expert_N: torch.Tensor, counts_E: torch.Tensor, T: int) -> torch.Tensor:
        # slot position inside its expert's (token-ordered) group; keep the first `capacity`
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        pos_N = torch.arange(sorted_expert_N.numel(), device=sorted_expert_N.device) - starts_E[sorted_expert_N]
        return pos_N < capacity(T, self.top_k, self.num_experts, self.capacity_factor)

    def _forward_grouped(self, x_TD: torch.Tensor, r: RouterOutput):
        T, K = r.topk_idx_TK.shape
        flat_expert_N = r.topk_idx_TK.reshape(-1)  # slot n = t * K + k
        order_N = torch.argsort(flat_expert_N, stable=True)  # stable: token order inside each expert
        counts_E = r.tokens_per_expert_E
        keep_TK = None
        if self.capacity_factor is not None:
            keep_sorted_N = self._capacity_keep_sorted(flat_expert_N[order_N], counts_E, T)
            keep_TK = torch.zeros(T * K, dtype=torch.bool, device=x_TD.device)
            keep_TK[order_N] = keep_sorted_N
            keep_TK = keep_TK.view(T, K)
            order_N = order_N[keep_sorted_N]
            counts_E = torch.bincount(flat_expert_N[order_N], minlength=self.num_experts)
        y_TD = self.experts.forward_grouped(x_TD, r.topk_weight_TK, r.topk_idx_TK, order_N, counts_E,
                                            self.group_overhead_rows, self.use_grouped_mm)
        return y_TD, keep_TK

    def _forward_loop(self, x_TD: torch.Tensor, r: RouterOutput):
        T, K = r.topk_idx_TK.shape
        y_TD = torch.zeros_like(x_TD)
        keep_TK = torch.ones(T, K, dtype=torch.bool, device=x_TD.device) if self.capacity_factor else None
        cap = capacity(T, K, self.num_experts, self.capacity_factor) if self.capacity_factor else None
        for e in range(self.num_experts):
            tok, slot = torch.nonzero(r.topk_idx_TK == e, as_tuple=True)  # row-major: token order
            if cap is not None and tok.numel() > cap:
                keep_TK[tok[cap:], slot[cap:]] = False
                tok, slot = tok[:cap], slot[:cap]
            if tok.numel() == 0:
                continue
            h = self.experts.forward_expert(e, x_TD[tok])
            y_TD = y_TD.index_add(0, tok, (h * r.topk_weight_TK[tok, slot].to(h.dtype)[:, None]).to(y_TD.dtype))
        return y_TD, keep_TK
