"""Mixture-of-Experts feed-forward layer: routed GLU experts, optional shared experts, dispatch and combine.

Experts are gated linear units (GEGLU or SwiGLU, Shazeer 2020) stored stacked so that one grouped matmul can run
all of them: ``w_in_EDH [E, D, 2F]`` (gate and up halves) and ``w_out_EFD [E, F, D]``.

Dispatch paths (GUIDE.md routing rule 9):

* ``grouped`` (default): the ``T*K`` routed slots are sorted by expert, each expert's contiguous slice of tokens
  goes through its FFN, and the outputs are scattered back weighted by the gates. ``torch._grouped_mm`` runs all
  experts in one kernel on CUDA (Hopper or newer, bf16). Elsewhere the experts are cut into a few runs of
  neighbouring experts (:func:`plan_expert_groups`); each run's rows are zero-padded to its largest expert and go
  through one ``bmm`` per projection (:class:`_GroupedBmm`), so a step issues a handful of large matmuls instead of
  ~6 small ones per expert. On CPU that is what brings the MoE layer close to its FLOP-matched dense FFN
  (``benchmarks/moe_layer.py``): every small threaded matmul pays an OpenMP fork/barrier, which turns into
  milliseconds when the cores are shared.
* ``loop``: the simple reference, one masked gather per expert; tests check both agree in outputs and gradients.

Dropless by default (Thérien et al. 2025 train dropless). With ``capacity_factor`` set, each expert takes at most
``ceil(cf * T * K / E)`` slots in token order (Switch Transformer, Fedus et al. 2022, Sec. 2.2); dropped slots
contribute nothing (the residual stream carries the token) and their share is reported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moecpt.config import DispatchKind, FFNKind, ModelConfig
from moecpt.model.routing import Router, RouterOutput


def glu_activation(h_NH: torch.Tensor, kind: FFNKind) -> torch.Tensor:
    """``act(gate) * up`` for ``h = [gate | up]`` of shape ``[N, 2F]`` -> ``[N, F]``.

    GEGLU uses the tanh-approximate GELU (as Gemma / the paper's Llama-3-style GEGLU backbone); SwiGLU uses SiLU.
    """
    gate, up = h_NH.chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if kind == FFNKind.GEGLU else F.silu(gate)
    return act * up


class GLUFeedForward(nn.Module):
    """Dense GLU feed-forward ``D -> 2F -> F -> D`` (no biases). Used as the dense FFN and as the shared expert."""

    def __init__(self, d_model: int, width: int, kind: FFNKind):
        super().__init__()
        self.kind = kind
        self.w_in = nn.Linear(d_model, 2 * width, bias=False)  # [gate | up]
        self.w_out = nn.Linear(width, d_model, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.w_out(glu_activation(self.w_in(x_ND), self.kind))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``_grouped_mm`` rejects stride-0 grads)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D401
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _grouped_mm_usable(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    return major >= 9 and x.dtype == torch.bfloat16


#: One run of neighbouring experts in the padded layout: experts ``[e0, e1)``, ``C`` rows each, starting at row ``r0``.
ExpertGroup = tuple[int, int, int, int]


def plan_expert_groups(counts: list[int], overhead_rows: int = 128, max_span: int = 64) -> list[ExpertGroup]:
    """Cut experts ``0..E-1`` into runs, each zero-padded to its largest count, minimising padded rows + overhead.

    Exact dynamic programme over contiguous runs of at most ``max_span`` experts: a run ``[i, j)`` costs
    ``(j - i) * max(counts[i:j]) + overhead_rows``, where ``overhead_rows`` prices the extra matmul calls of one
    more run in rows of work (an all-empty run costs nothing and is dropped). One run = a single ``bmm`` over all
    experts, padded to the global max; ``E`` runs = no padding (a per-expert loop). Contiguous runs keep every
    weight slice a view (no copy, no gradient scatter).

    Args:
        counts: rows per expert (host ints).
        overhead_rows: cost of one more run, in rows.
        max_span: longest run considered (bounds the work at ``O(E * max_span)``).

    Returns:
        ``[(e0, e1, C, r0), ...]`` covering every non-empty expert; rows ``r0 .. r0 + (e1 - e0) * C`` of the padded
        layout belong to the run, expert ``e`` at rows ``r0 + (e - e0) * C ...``.
    """
    E = len(counts)
    best = [0] * (E + 1)
    cut = [0] * (E + 1)
    for j in range(1, E + 1):
        m, best_j, cut_j = 0, None, j - 1
        for i in range(j - 1, max(j - max_span, 0) - 1, -1):
            m = max(m, counts[i])
            v = best[i] + (j - i) * m + (overhead_rows if m else 0)
            if best_j is None or v < best_j:
                best_j, cut_j = v, i
        best[j], cut[j] = best_j, cut_j
    spans, j = [], E
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    groups, r0 = [], 0
    for e0, e1 in reversed(spans):
        C = max(counts[e0:e1])
        if C:
            groups.append((e0, e1, C, r0))
            r0 += (e1 - e0) * C
    return groups


class _GroupedBmm(torch.autograd.Function):
    """``y[rows of run g] = bmm(x[rows of run g].view(n, C, I), w[e0:e1])`` for every run, written in place.

    One output buffer, no ``cat``/``stack``; the weight gradient is written run by run into one ``[E, I, O]``
    tensor (experts in no run get zeros). Inputs must share one dtype (the caller handles autocast).
    """

    @staticmethod
    def forward(ctx, x_PI: torch.Tensor, w_EIO: torch.Tensor, groups: list[ExpertGroup]) -> torch.Tensor:
        ctx.save_for_backward(x_PI, w_EIO)
        ctx.groups = groups
        I, O = w_EIO.shape[1:]
        y_PO = x_PI.new_empty(x_PI.shape[0], O)
        for e0, e1, C, r0 in groups:
            r1 = r0 + (e1 - e0) * C
            torch.bmm(x_PI[r0:r1].view(e1 - e0, C, I), w_EIO[e0:e1], out=y_PO[r0:r1].view(e1 - e0, C, O))
        return y_PO

    @staticmethod
    def backward(ctx, g_PO: torch.Tensor):
        x_PI, w_EIO = ctx.saved_tensors
        I, O = w_EIO.shape[1:]
        g_PO = g_PO.contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        gx_PI = torch.empty_like(x_PI) if need_x else None
        gw_EIO = torch.empty_like(w_EIO) if need_w else None
        e_done = 0
        for e0, e1, C, r0 in ctx.groups:
            if need_w and e0 > e_done:  # experts in no run (no rows) get zero gradient
                gw_EIO[e_done:e0].zero_()
            e_done = e1
            r1, n = r0 + (e1 - e0) * C, e1 - e0
            g = g_PO[r0:r1].view(n, C, O)
            if need_x:
                torch.bmm(g, w_EIO[e0:e1].transpose(1, 2), out=gx_PI[r0:r1].view(n, C, I))
            if need_w:
                torch.bmm(x_PI[r0:r1].view(n, C, I).transpose(1, 2), g, out=gw_EIO[e0:e1])
        if need_w and e_done < w_EIO.shape[0]:
            gw_EIO[e_done:].zero_()
        return gx_PI, gw_EIO, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class RoutedExperts(nn.Module):
    """``E`` GLU experts of width ``F`` with stacked weights.

    Args:
        num_experts: ``E``; d_model: ``D``; width: ``F``; kind: GEGLU or SwiGLU.
    """

    def __init__(self, num_experts: int, d_model: int, width: int, kind: FFNKind):
        super().__init__()
        self.num_experts, self.d_model, self.width, self.kind = num_experts, d_model, width, kind
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, 2 * width))  # [E, D, 2F]
        self.w_out = nn.Parameter(torch.empty(num_experts, width, d_model))  # [E, F, D]

    def forward_sorted(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on its contiguous slice of ``x_ND`` (rows sorted by expert, ``counts_E[e]`` rows each).

        Args:
            x_ND: ``[N, D]`` rows sorted by expert; ``N = counts_E.sum()``.
            counts_E: ``[E]`` int64 rows per expert.

        Returns:
            ``[N, D]`` expert outputs in the same order.
        """
        w_in, w_out = self.w_in.to(x_ND.dtype), self.w_out.to(x_ND.dtype)
        if _grouped_mm_usable(x_ND):
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
            h = torch._grouped_mm(x_ND, w_in, offs=offs)
            h = _ContiguousGrad.apply(glu_activation(h, self.kind))
            return _ContiguousGrad.apply(torch._grouped_mm(h, w_out, offs=offs))
        counts = counts_E.tolist()  # one host sync
        groups, r0 = [], 0
        for e, n in enumerate(counts):  # one run per expert: no padding
            if n:
                groups.append((e, e + 1, n, r0))
                r0 += n
        return self.forward_grouped_rows(x_ND, groups)

    def forward_grouped_rows(self, x_PD: torch.Tensor, groups: list[ExpertGroup]) -> torch.Tensor:
        """Run the experts on the padded layout of ``groups`` (see :func:`plan_expert_groups`).

        Padding rows must be zero: they then give zero outputs (the GLU has no bias) and add nothing to the
        weight gradients. Under autocast the matmuls run in the autocast dtype.

        Args:
            x_PD: ``[P, D]`` rows, ``P = sum((e1 - e0) * C)``.
            groups: runs ``(e0, e1, C, r0)``.

        Returns:
            ``[P, D]`` expert outputs in the same layout.
        """
        dtype = _compute_dtype(x_PD)
        with torch.autocast(device_type=x_PD.device.type, enabled=False):
            h_PH = _GroupedBmm.apply(x_PD.to(dtype), self.w_in.to(dtype), groups)
            return _GroupedBmm.apply(glu_activation(h_PH, self.kind), self.w_out.to(dtype), groups)

    def forward_expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x_ND [N, D]`` (reference path)."""
        return glu_activation(x_ND @ self.w_in[e].to(x_ND.dtype), self.kind) @ self.w_out[e].to(x_ND.dtype)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Switch capacity: ``ceil(cf * T * K / E)`` slots per expert (Fedus et al. 2022, eq. 3)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


class MoELayer(nn.Module):
    """MoE FFN: router + routed experts (+ shared experts). Forward ``x_TD -> (y_TD, RouterOutput)``.

    Args:
        cfg: model config with ``cfg.moe`` set. Routed experts have width ``cfg.resolved_expert_width``; shared
            experts form one always-on GLU FFN of width ``num_shared_experts * expert_width`` (GUIDE rule 8).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.capacity_factor = moe.capacity_factor
        self.dispatch = moe.dispatch
        #: grouped dispatch without ``_grouped_mm``: price of one more expert run, in rows (plan_expert_groups)
        self.group_overhead_rows = 128
        width = cfg.resolved_expert_width
        self.router = Router(cfg.d_model, moe.num_experts, moe.top_k, moe.router)
        self.experts = RoutedExperts(moe.num_experts, cfg.d_model, width, cfg.ffn_kind)
        shared_width = moe.shared_expert_width or moe.num_shared_experts * width
        self.shared = GLUFeedForward(cfg.d_model, shared_width, cfg.ffn_kind) if shared_width else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if (self.shared and moe.shared_expert_gate) else None

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        r = self.router(x_TD)
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
        sorted_expert_N = flat_expert_N[order_N]
        counts_E = torch.bincount(flat_expert_N, minlength=self.num_experts)
        keep_TK = None
        if self.capacity_factor is not None:
            keep_sorted_N = self._capacity_keep_sorted(sorted_expert_N, counts_E, T)
            keep_TK = torch.zeros(T * K, dtype=torch.bool, device=x_TD.device)
            keep_TK[order_N] = keep_sorted_N
            keep_TK = keep_TK.view(T, K)
            order_N = order_N[keep_sorted_N]
            counts_E = torch.bincount(flat_expert_N[order_N], minlength=self.num_experts)
        if not _grouped_mm_usable(x_TD):
            return self._combine_padded(x_TD, r, order_N, counts_E), keep_TK
        token_N = order_N // K
        h_ND = self.experts.forward_sorted(x_TD[token_N], counts_E)
        gate_N = r.topk_weight_TK.reshape(-1)[order_N].to(h_ND.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_N, (h_ND * gate_N[:, None]).to(x_TD.dtype))
        return y_TD, keep_TK

    def _combine_padded(self, x_TD, r: RouterOutput, order_N, counts_E) -> torch.Tensor:
        """Grouped dispatch through the padded run layout of :func:`plan_expert_groups`.

        Slot ``order_N[j]`` (expert ``e``, ``p``-th of its group in token order) goes to row ``base[e] + p``. Free
        rows point at slot ``T*K``, i.e. token ``T``: a zero row appended to ``x`` with gate 0, whose output lands in
        a row that is cut off. One gather, the grouped matmuls, one weighted ``index_add_``.
        """
        T, K = r.topk_idx_TK.shape
        D, dev = x_TD.shape[1], x_TD.device
        counts = counts_E.tolist()  # the one host sync of this path
        groups = plan_expert_groups(counts, self.group_overhead_rows)
        P = sum((e1 - e0) * C for e0, e1, C, _ in groups)
        if P == 0:
            return torch.zeros_like(x_TD)
        base = [0] * self.num_experts
        for e0, e1, C, r0 in groups:
            for e in range(e0, e1):
                base[e] = r0 + (e - e0) * C
        base_E = torch.tensor(base, dtype=torch.long, device=dev)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_N = r.topk_idx_TK.reshape(-1)[order_N]
        row_N = base_E[expert_N] + torch.arange(order_N.numel(), device=dev) - starts_E[expert_N]
        slot_P = torch.full((P,), T * K, dtype=torch.long, device=dev).index_copy_(0, row_N, order_N)
        token_P = slot_P // K
        # Gather through the [T*K] slot copy of x, not x[token_P]: indexing with repeated indices would make the
        # backward a scatter-add whose summation order depends on threads (runs would not repeat bit for bit);
        # here every real row is written once and the K copies of a token are summed by expand's backward.
        x_slots_ND = x_TD[:, None, :].expand(T, K, D).reshape(T * K, D)
        h_PD = self.experts.forward_grouped_rows(F.pad(x_slots_ND, (0, 0, 0, 1))[slot_P], groups)
        gate_P = F.pad(r.topk_weight_TK.reshape(-1), (0, 1))[slot_P].to(h_PD.dtype)
        # accumulate the K expert outputs of a token in x's dtype (fp32 under autocast)
        y_TD = x_TD.new_zeros(T + 1, D).index_add_(0, token_P, (h_PD * gate_P[:, None]).to(x_TD.dtype))
        return y_TD[:T]

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
