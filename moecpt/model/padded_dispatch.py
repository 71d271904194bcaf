"""Padded grouped dispatch of routed experts: the MoE path wherever ``torch._grouped_mm`` does not run (CPU, CUDA
before Hopper, fp32).

The ``T*K`` routed slots are laid out expert by expert in a padded row space: the experts are cut into a few runs of
neighbouring experts (:func:`plan_expert_groups`), every expert of a run gets the run's largest row count, so each
run is one ``bmm`` per projection over ``[experts, rows, features]``. A step issues a handful of large matmuls
instead of ~6 small ones per expert: on CPU each small threaded matmul pays an OpenMP fork/barrier, which is what
made per-expert loops slow (``benchmarks/moe_layer.py``). This is MegaBlocks' idea (Gale et al. 2023, "MegaBlocks:
Efficient Sparse Training with Mixture-of-Experts", Sec. 5) with dense padded blocks instead of block-sparse ones.

:class:`_PaddedExperts` fuses gather -> ``w_in`` -> GLU -> ``w_out`` -> gate-weighted combine in one autograd
node with a hand-written backward, so no ``[T*K, D]`` temporary is copied more than once and every index op is a
gather (``index_select``): each output row is written exactly once, so results repeat bit for bit (no scatter-add
whose summation order depends on threads), without ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecpt.config import FFNKind
from moecpt.model.glu import glu_backward, glu_forward

#: One run of neighbouring experts in the padded layout: experts ``[e0, e1)``, ``C`` rows each, starting at row ``r0``.
ExpertGroup = tuple[int, int, int, int]


def plan_expert_groups(counts: list[int], overhead_rows: int = 128, max_span: int = 64,
                       batch_quantum: int = 1) -> list[ExpertGroup]:
    """Cut experts ``0..E-1`` into runs, each zero-padded to its largest count, minimising padded rows + overhead.

    Exact dynamic programme over contiguous runs of at most ``max_span`` experts: a run ``[i, j)`` of ``n = j - i``
    experts costs ``slots(n) * max(counts[i:j]) + overhead_rows``, where ``overhead_rows`` prices the extra matmul
    calls of one more run in rows of work (an all-empty run costs nothing and is dropped). ``slots(n) = n`` for
    ``batch_quantum = 1``; otherwise ``n`` rounded up to a multiple of ``batch_quantum`` for ``n > 1``: the CPU
    ``bmm`` splits its batch across the intra-op threads (one single-threaded GEMM per expert), so with 2 threads a
    run of 3 experts takes as long as one of 4, while a single expert's GEMM uses all threads. One run = a single
    ``bmm`` over all experts, padded to the global max; ``E`` runs = no padding (a per-expert loop). Contiguous runs
    keep every weight slice a view (no copy, no gradient scatter).

    Args:
        counts: rows per expert (host ints).
        overhead_rows: cost of one more run, in rows.
        max_span: longest run considered (bounds the work at ``O(E * max_span)``).
        batch_quantum: threads that share one ``bmm`` batch (``torch.get_num_threads()`` on CPU, 1 elsewhere).

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
            n = j - i
            slots = n if (n == 1 or batch_quantum <= 1) else -(-n // batch_quantum) * batch_quantum
            v = best[i] + slots * m + (overhead_rows if m else 0)
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


@dataclass(frozen=True)
class PaddedPlan:
    """Where every routed slot sits in the padded layout of one forward pass.

    Attributes:
        groups: the runs of :func:`plan_expert_groups`.
        num_rows: ``P``, rows of the padded layout.
        token_P: ``[P]`` int64 source token of each row; any real token for padding (its gate is 0).
        slot_P: ``[P]`` int64 slot ``t * K + k`` of each row; ``T * K`` (gate 0) for padding.
        row_S: ``[T * K]`` int64 row of each slot; ``P`` (a zero row) for a slot dropped by the capacity factor.
    """

    groups: list[ExpertGroup]
    num_rows: int
    token_P: torch.Tensor
    slot_P: torch.Tensor
    row_S: torch.Tensor


def build_padded_plan(topk_idx_TK: torch.Tensor, order_N: torch.Tensor, counts_E: torch.Tensor,
                      overhead_rows: int, batch_quantum: int = 1) -> PaddedPlan:
    """Plan the padded layout for the kept slots ``order_N`` (sorted by expert, token order within an expert).

    Args:
        topk_idx_TK: ``[T, K]`` chosen experts.
        order_N: ``[N]`` int64 kept slot ids ``t * K + k``, stably sorted by expert (``N = T * K`` when dropless).
        counts_E: ``[E]`` int64 kept slots per expert.
        overhead_rows, batch_quantum: the cost model of :func:`plan_expert_groups`.

    Returns:
        the :class:`PaddedPlan` (one host sync: the per-expert counts).
    """
    T, K = topk_idx_TK.shape
    dev = topk_idx_TK.device
    groups = plan_expert_groups(counts_E.tolist(), overhead_rows, batch_quantum=batch_quantum)
    P = sum((e1 - e0) * C for e0, e1, C, _ in groups)
    base = [0] * counts_E.numel()
    for e0, e1, C, r0 in groups:
        for e in range(e0, e1):
            base[e] = r0 + (e - e0) * C
    base_E = torch.tensor(base, dtype=torch.long, device=dev)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_N = topk_idx_TK.reshape(-1)[order_N]
    # the p-th slot of expert e (token order) goes to row base[e] + p
    row_N = base_E[expert_N] + torch.arange(order_N.numel(), device=dev) - starts_E[expert_N]
    slot_P = torch.full((P,), T * K, dtype=torch.long, device=dev).index_copy_(0, row_N, order_N)
    row_S = torch.full((T * K,), P, dtype=torch.long, device=dev).index_copy_(0, order_N, row_N)
    # padding rows read any real token (the last): their gate is 0, so they reach neither outputs nor gradients
    token_P = (slot_P // K).clamp_(max=max(T - 1, 0))
    return PaddedPlan(groups=groups, num_rows=P, token_P=token_P, slot_P=slot_P, row_S=row_S)


def _bmm_runs(a_PI: torch.Tensor, w_EIO: torch.Tensor, groups: list[ExpertGroup], out_PO: torch.Tensor,
              transpose_w: bool = False) -> None:
    """``out[rows of run] = a[rows of run] @ w[e]`` (or ``@ w[e].T``) for every run, one ``bmm`` per run."""
    I = a_PI.shape[1]
    O = out_PO.shape[1]
    for e0, e1, C, r0 in groups:
        n, r1 = e1 - e0, r0 + (e1 - e0) * C
        w = w_EIO[e0:e1].transpose(1, 2) if transpose_w else w_EIO[e0:e1]
        torch.bmm(a_PI[r0:r1].view(n, C, I), w, out=out_PO[r0:r1].view(n, C, O))


def _bmm_runs_weight_grad(a_PI: torch.Tensor, g_PO: torch.Tensor, groups: list[ExpertGroup],
                          num_experts: int) -> torch.Tensor:
    """``dL/dw[e] = a[rows of e].T @ g[rows of e]`` as one ``[E, I, O]`` tensor; experts in no run get zeros."""
    I, O = a_PI.shape[1], g_PO.shape[1]
    gw_EIO = a_PI.new_empty(num_experts, I, O)
    e_done = 0
    for e0, e1, C, r0 in groups:
        if e0 > e_done:
            gw_EIO[e_done:e0].zero_()
        n, r1 = e1 - e0, r0 + (e1 - e0) * C
        torch.bmm(a_PI[r0:r1].view(n, C, I).transpose(1, 2), g_PO[r0:r1].view(n, C, O), out=gw_EIO[e0:e1])
        e_done = e1
    if e_done < num_experts:
        gw_EIO[e_done:].zero_()
    return gw_EIO


def _with_zero_row(x_ND: torch.Tensor) -> torch.Tensor:
    """``[N + 1, D]``: ``x`` and one zero row (the target of dropped-slot / padding-gate indices)."""
    out = x_ND.new_empty(x_ND.shape[0] + 1, *x_ND.shape[1:])
    out[:-1].copy_(x_ND)
    out[-1].zero_()
    return out


class _PaddedExperts(torch.autograd.Function):
    """``y_TD = sum_k gate_TK[t, k] * expert_{idx[t, k]}(x_TD[t])`` through the padded layout of a :class:`PaddedPlan`.

    Padding rows read a real token and carry gate 0: no output gathers them, and their output gradient is
    ``0 * g``, so (no bias anywhere) they add exactly zero to every weight gradient. All inputs share one dtype (the
    caller casts under autocast).
    """

    @staticmethod
    def forward(ctx, x_TD, gate_TK, w_in_EDH, w_out_EFD, plan: PaddedPlan, kind: FFNKind):
        T, D = x_TD.shape
        K = gate_TK.shape[1]
        P, groups = plan.num_rows, plan.groups
        xs_PD = x_TD.index_select(0, plan.token_P)
        F_ = w_out_EFD.shape[1]
        gate_PF, up_PF = x_TD.new_empty(P, F_), x_TD.new_empty(P, F_)  # contiguous halves (see moecpt.model.glu)
        _bmm_runs(xs_PD, w_in_EDH[:, :, :F_], groups, gate_PF)
        _bmm_runs(xs_PD, w_in_EDH[:, :, F_:], groups, up_PF)
        act_PF, a_PF = glu_forward(gate_PF, up_PF, kind)
        o_RD = x_TD.new_empty(P + 1, D)  # row P: the zero row of dropped slots
        o_RD[P].zero_()
        _bmm_runs(a_PF, w_out_EFD, groups, o_RD[:P])
        o_TKD = o_RD.index_select(0, plan.row_S).view(T, K, D)
        y_TD = (o_TKD * gate_TK.unsqueeze(2)).sum(dim=1)  # fixed summation order over k
        ctx.save_for_backward(xs_PD, gate_PF, up_PF, act_PF, a_PF, o_TKD, gate_TK, w_in_EDH, w_out_EFD)
        ctx.plan, ctx.kind = plan, kind
        return y_TD

    @staticmethod
    def backward(ctx, g_TD):
        xs_PD, gate_PF, up_PF, act_PF, a_PF, o_TKD, gate_TK, w_in_EDH, w_out_EFD = ctx.saved_tensors
        plan, groups, P = ctx.plan, ctx.plan.groups, ctx.plan.num_rows
        need_x, need_gate, need_w_in, need_w_out = ctx.needs_input_grad[:4]
        T, K, D = o_TKD.shape
        E = w_in_EDH.shape[0]
        g_TD = g_TD.contiguous()
        g_gate_TK = torch.linalg.vecdot(o_TKD, g_TD.unsqueeze(1)) if need_gate else None  # [T, K]
        # dL/do of row p = gate of its slot * dL/dy of its token (0 for padding rows)
        gate_P = _with_zero_row(gate_TK.reshape(-1, 1)).index_select(0, plan.slot_P)
        go_PD = g_TD.index_select(0, plan.token_P).mul_(gate_P)
        g_w_out = _bmm_runs_weight_grad(a_PF, go_PD, groups, E) if need_w_out else None
        ga_PF = a_PF.new_empty(a_PF.shape)
        _bmm_runs(go_PD, w_out_EFD, groups, ga_PF, transpose_w=True)
        gh_PH = glu_backward(gate_PF, up_PF, act_PF, ga_PF, ctx.kind)
        g_w_in = _bmm_runs_weight_grad(xs_PD, gh_PH, groups, E) if need_w_in else None
        g_x = None
        if need_x:
            gxs_RD = xs_PD.new_empty(P + 1, D)
            gxs_RD[P].zero_()
            _bmm_runs(gh_PH, w_in_EDH, groups, gxs_RD[:P], transpose_w=True)
            # the K rows of a token are gathered and summed in a fixed order
            g_x = gxs_RD.index_select(0, plan.row_S).view(T, K, D).sum(dim=1)
        return g_x, g_gate_TK, g_w_in, g_w_out, None, None


def padded_experts(x_TD: torch.Tensor, gate_TK: torch.Tensor, w_in_EDH: torch.Tensor, w_out_EFD: torch.Tensor,
                   plan: PaddedPlan, kind: FFNKind) -> torch.Tensor:
    """Routed-expert output through the padded layout (differentiable in all four tensors).

    Args:
        x_TD: ``[T, D]`` layer input; gate_TK: ``[T, K]`` gate values (0 or anything for dropped slots: their rows
            are zero); w_in_EDH: ``[E, D, 2F]``; w_out_EFD: ``[E, F, D]``; all in one dtype.
        plan: from :func:`build_padded_plan`; kind: GEGLU or SwiGLU.

    Returns:
        ``[T, D]`` ``sum_k gate[t, k] * expert_{idx[t, k]}(x[t])`` over the kept slots.
    """
    if plan.num_rows == 0:
        return x_TD.new_zeros(x_TD.shape) + 0 * gate_TK.sum()  # keep the graph: every slot dropped
    return _PaddedExperts.apply(x_TD, gate_TK, w_in_EDH, w_out_EFD, plan, kind)
