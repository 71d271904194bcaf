"""Grouped dispatch of routed experts: gather -> ``w_in`` -> GLU -> ``w_out`` -> gate-weighted combine in one
autograd node (:class:`_GroupedExperts`), over one of two row layouts.

The ``T*K`` routed slots are laid out expert by expert (stable: token order within an expert). The matmuls then
run per expert on contiguous rows:

* ``grouped_mm`` layout (:func:`grouped_mm_usable`): no padding; ``torch._grouped_mm`` runs every expert in one
  call (CPU in fp32/bf16/fp16 where this torch has the kernel; CUDA on Hopper, sm90, in bf16), with the weight
  gradient as one more grouped call. No host sync.
* ``padded`` layout (anywhere else, e.g. other GPUs, older torch): the experts are cut into a few runs of
  neighbouring experts (:func:`plan_expert_groups`); every expert of a run gets the run's largest row count (the
  extra rows carry gate 0), so a run is one ``bmm`` per projection over ``[experts, rows, features]``. This is
  MegaBlocks' idea (Gale et al. 2023, "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", Sec. 5)
  with dense padded blocks.

Either way a step issues a handful of large matmul calls instead of ~6 small ones per expert (on CPU each small
threaded matmul pays an OpenMP fork/barrier; ``benchmarks/moe_layer.py``). The backward is written out so that no
``[T*K, D]`` temporary is copied more than once and every index op is a gather (``index_select``): each output row
is written exactly once, so results repeat bit for bit (no scatter-add whose summation order depends on threads),
without ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from moecpt.config import FFNKind
from moecpt.model.glu import glu_backward, glu_forward

#: One run of neighbouring experts in the padded layout: experts ``[e0, e1)``, ``C`` rows each, starting at row ``r0``.
ExpertGroup = tuple[int, int, int, int]


def plan_expert_groups(counts: list[int], overhead_rows: int = 128, max_span: int = 64,
                       batch_quantum: int = 1) -> list[ExpertGroup]:
    """Cut experts ``0..E-1`` into runs, each padded to its largest count, minimising padded rows + overhead.

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
class DispatchPlan:
    """Where every routed slot sits in the row layout of one forward pass.

    Attributes:
        num_rows: ``P``, rows of the layout (``N`` kept slots, plus padding in the padded layout).
        token_P: ``[P]`` int64 source token of each row; any real token for a padding row (its gate is 0).
        slot_P: ``[P]`` int64 slot ``t * K + k`` of each row; ``T * K`` (gate 0) for padding.
        row_S: ``[T * K]`` int64 row of each slot; ``P`` (a zero row) for a slot dropped by the capacity factor.
        dropped: whether any slot was dropped (then the row-indexed results get that zero row appended).
        offs_E: ``[E]`` int32 cumulative row counts for ``torch._grouped_mm`` (grouped layout), else None.
        groups: the padded runs of :func:`plan_expert_groups` (padded layout), else empty.
    """

    num_rows: int
    token_P: torch.Tensor
    slot_P: torch.Tensor
    row_S: torch.Tensor
    dropped: bool
    offs_E: torch.Tensor | None = None
    groups: list[ExpertGroup] = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this torch has a CPU ``_grouped_mm`` kernel for ``dtype`` (torch 2.8 has the op but no CPU kernel)."""
    try:
        a, w = torch.ones(4, 8, dtype=dtype), torch.ones(2, 8, 8, dtype=dtype)
        out = torch._grouped_mm(a, w, offs=torch.tensor([2, 4], dtype=torch.int32))
        return bool(out.shape == (4, 8) and out[0, 0].item() == 8)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_usable(d_model: int, width: int, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``torch._grouped_mm`` can run the experts of width ``F`` on ``d_model``-wide rows here.

    It needs this torch to have it; on CPU a kernel for ``dtype`` (fp32, bf16, fp16; probed once per dtype); on CUDA
    an NVIDIA Hopper GPU (sm90) and bf16 (other architectures and ROCm have had wrong weight gradients for empty
    groups or a host-syncing fallback); and every row stride of the ``[*, D]``, ``[*, F]`` and ``[*, 2F]`` operands
    (and the offset of the ``up`` half of ``w_in``) a multiple of 16 bytes.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        if torch.version.hip or torch.cuda.get_device_capability(device)[0] != 9 or dtype != torch.bfloat16:
            return False
    elif device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    elif not _grouped_mm_runs_on_cpu(dtype):
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return (d_model * size) % 16 == 0 and (width * size) % 16 == 0


def build_dispatch_plan(topk_idx_TK: torch.Tensor, order_N: torch.Tensor, counts_E: torch.Tensor, *,
                        grouped_mm: bool, overhead_rows: int = 128, batch_quantum: int = 1) -> DispatchPlan:
    """Plan the row layout for the kept slots ``order_N`` (sorted by expert, token order within an expert).

    Args:
        topk_idx_TK: ``[T, K]`` chosen experts.
        order_N: ``[N]`` int64 kept slot ids ``t * K + k``, stably sorted by expert (``N = T * K`` when dropless).
        counts_E: ``[E]`` int64 kept slots per expert.
        grouped_mm: the unpadded layout for ``torch._grouped_mm`` (no host sync) instead of padded ``bmm`` runs.
        overhead_rows, batch_quantum: the cost model of :func:`plan_expert_groups` (padded layout only; one host
            sync for the per-expert counts).

    Returns:
        the :class:`DispatchPlan`.
    """
    T, K = topk_idx_TK.shape
    N, dev = order_N.numel(), topk_idx_TK.device
    dropped = N < T * K
    if grouped_mm:
        row_N = torch.arange(N, device=dev)  # sorted order is the row order
        row_S = torch.full((T * K,), N, dtype=torch.long, device=dev).index_copy_(0, order_N, row_N)
        return DispatchPlan(num_rows=N, token_P=order_N // K, slot_P=order_N, row_S=row_S, dropped=dropped,
                            offs_E=torch.cumsum(counts_E, 0).to(torch.int32))
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
    row_N = base_E[expert_N] + torch.arange(N, device=dev) - starts_E[expert_N]
    slot_P = torch.full((P,), T * K, dtype=torch.long, device=dev).index_copy_(0, row_N, order_N)
    row_S = torch.full((T * K,), P, dtype=torch.long, device=dev).index_copy_(0, order_N, row_N)
    # padding rows read any real token (the last): their gate is 0, so they reach neither outputs nor gradients
    token_P = (slot_P // K).clamp_(max=max(T - 1, 0))
    return DispatchPlan(num_rows=P, token_P=token_P, slot_P=slot_P, row_S=row_S, dropped=dropped, groups=groups)


def _bmm_runs(a_PI: torch.Tensor, w_EIO: torch.Tensor, groups: list[ExpertGroup], out_PO: torch.Tensor) -> None:
    """``out[rows of run] = a[rows of run] @ w[e]`` for every run of the padded layout, one ``bmm`` per run."""
    I, O = a_PI.shape[1], out_PO.shape[1]  # noqa: E741
    for e0, e1, C, r0 in groups:
        n, r1 = e1 - e0, r0 + (e1 - e0) * C
        torch.bmm(a_PI[r0:r1].view(n, C, I), w_EIO[e0:e1], out=out_PO[r0:r1].view(n, C, O))


def _bmm_runs_weight_grad(a_PI: torch.Tensor, g_PO: torch.Tensor, groups: list[ExpertGroup],
                          num_experts: int) -> torch.Tensor:
    """``dL/dw[e] = a[rows of e].T @ g[rows of e]`` as one ``[E, I, O]`` tensor; experts in no run get zeros."""
    I, O = a_PI.shape[1], g_PO.shape[1]  # noqa: E741
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


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the K expert outputs of a token are summed in: fp32 for 16-bit tensors, else their own."""
    return torch.float32 if t.element_size() < 4 else t.dtype


def _with_zero_row(x_ND: torch.Tensor) -> torch.Tensor:
    """``[N + 1, D]``: ``x`` and one zero row (the target of dropped-slot / padding-gate indices)."""
    out = x_ND.new_empty(x_ND.shape[0] + 1, *x_ND.shape[1:])
    out[:-1].copy_(x_ND)
    out[-1].zero_()
    return out


def _experts_mm(a_PI: torch.Tensor, w_EIO: torch.Tensor, plan: DispatchPlan, *, transpose_w: bool = False,
                zero_row: bool = False) -> torch.Tensor:
    """``out[rows of e] = a[rows of e] @ w[e]`` (or ``@ w[e].T``) for every expert: ``[P (+1), O]``."""
    w = w_EIO.transpose(1, 2) if transpose_w else w_EIO
    if plan.offs_E is not None:
        out = torch._grouped_mm(a_PI, w, offs=plan.offs_E)
        return _with_zero_row(out) if zero_row else out
    P = plan.num_rows
    out = a_PI.new_empty(P + int(zero_row), w.shape[2])
    if zero_row:
        out[P].zero_()
    _bmm_runs(a_PI, w, plan.groups, out[:P])
    return out


def _experts_weight_grad(a_PI: torch.Tensor, g_PO: torch.Tensor, plan: DispatchPlan, num_experts: int):
    """``dL/dw[e] = a[rows of e].T @ g[rows of e]``: ``[E, I, O]``, zeros for experts without rows."""
    if plan.offs_E is not None:
        gw_EIO = torch._grouped_mm(a_PI.t(), g_PO, offs=plan.offs_E)
        if gw_EIO.is_cuda:  # do not trust the kernel to write zeros for empty groups; no host sync
            empty_E = torch.diff(plan.offs_E, prepend=plan.offs_E.new_zeros(1)) == 0
            gw_EIO = gw_EIO.masked_fill(empty_E[:, None, None], 0)
        return gw_EIO
    return _bmm_runs_weight_grad(a_PI, g_PO, plan.groups, num_experts)


def _row_experts(plan: DispatchPlan, num_experts: int, device) -> torch.Tensor:
    """``[P]`` int64 expert of every row (a padding row: its run's expert; its gate is 0)."""
    if plan.offs_E is not None:
        counts = torch.diff(plan.offs_E.long(), prepend=plan.offs_E.new_zeros(1).long())
        return torch.repeat_interleave(torch.arange(num_experts, device=device), counts, output_size=plan.num_rows)
    ids = [e for e0, e1, C, _ in plan.groups for e in range(e0, e1) for _ in range(C)]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _experts_bias_grad(g_PO: torch.Tensor, plan: DispatchPlan, num_experts: int) -> torch.Tensor:
    """``dL/db[e] = sum of g over the rows of e``: ``[E, O]``, as the weight gradient of an all-ones input (the
    same grouped / padded matmuls: a fixed summation order, no scatter-add). The ones are 8 columns wide (16-byte
    rows for ``_grouped_mm``); column 0 is the result."""
    ones_P8 = g_PO.new_ones(g_PO.shape[0], 8)
    return _experts_weight_grad(ones_P8, g_PO, plan, num_experts)[:, 0]


class _GroupedExperts(torch.autograd.Function):
    """``y_TD = sum_k gate_TK[t, k] * expert_{idx[t, k]}(x_TD[t])`` through the row layout of a :class:`DispatchPlan`.

    Padding rows (padded layout) read a real token and carry gate 0: no output gathers them, and their output
    gradient is ``0 * g``, so (no bias anywhere) they add exactly zero to every weight gradient while the step's
    values are finite (a non-finite step is skipped or stopped by the trainer). All inputs share one dtype (the
    caller casts under autocast); the K expert outputs of a token are summed in fp32 when that dtype is 16-bit.
    """

    @staticmethod
    def forward(ctx, x_TD, gate_TK, w_in_EDW, w_out_EFD, plan: DispatchPlan, kind: FFNKind, b_in_EW=None,
                b_out_ED=None):
        T, D = x_TD.shape
        K = gate_TK.shape[1]
        E, F_ = w_out_EFD.shape[:2]
        xs_PD = x_TD.index_select(0, plan.token_P)
        # gate and up as two contiguous [P, F] products (see moecpt.model.glu)
        gate_PF = _experts_mm(xs_PD, w_in_EDW[:, :, :F_], plan)
        up_PF = _experts_mm(xs_PD, w_in_EDW[:, :, F_:], plan)
        expert_P = _row_experts(plan, E, x_TD.device) if (b_in_EW is not None or b_out_ED is not None) else None
        if b_in_EW is not None:  # GPT-OSS's expert biases: each row gets its expert's (a gather)
            gate_PF += b_in_EW[:, :F_].index_select(0, expert_P)
            up_PF += b_in_EW[:, F_:].index_select(0, expert_P)
        act_PF, a_PF = glu_forward(gate_PF, up_PF, kind)
        o_QD = _experts_mm(a_PF, w_out_EFD, plan, zero_row=plan.dropped)
        if b_out_ED is not None:
            o_QD[:plan.num_rows] += b_out_ED.index_select(0, expert_P)
        o_TKD = o_QD.index_select(0, plan.row_S).view(T, K, D)
        acc = _sum_dtype(o_TKD)
        y_TD = (o_TKD.to(acc) * gate_TK.to(acc).unsqueeze(2)).sum(dim=1)  # fixed summation order over k
        ctx.save_for_backward(xs_PD, gate_PF, up_PF, act_PF, a_PF, o_TKD, gate_TK, w_in_EDW, w_out_EFD)
        ctx.plan, ctx.kind, ctx.biases = plan, kind, (b_in_EW is not None, b_out_ED is not None)
        return y_TD

    @staticmethod
    def backward(ctx, g_TD):
        xs_PD, gate_PF, up_PF, act_PF, a_PF, o_TKD, gate_TK, w_in_EDW, w_out_EFD = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_gate, need_w_in, need_w_out = ctx.needs_input_grad[:4]
        T, K, D = o_TKD.shape
        E = w_in_EDW.shape[0]
        g_gate_TK = None
        if need_gate:  # [T, K], in the accumulation dtype of the forward's sum
            g_gate_TK = torch.linalg.vecdot(o_TKD.to(g_TD.dtype), g_TD.unsqueeze(1)).to(gate_TK.dtype)
        g_TD = g_TD.to(o_TKD.dtype).contiguous()
        # dL/do of row p = gate of its slot * dL/dy of its token (0 for padding rows)
        gate_P1 = _with_zero_row(gate_TK.reshape(-1, 1)).index_select(0, plan.slot_P)
        go_PD = g_TD.index_select(0, plan.token_P).mul_(gate_P1)
        g_w_out = _experts_weight_grad(a_PF, go_PD, plan, E) if need_w_out else None
        g_b_out = _experts_bias_grad(go_PD, plan, E) if ctx.biases[1] and ctx.needs_input_grad[7] else None
        ga_PF = _experts_mm(go_PD, w_out_EFD, plan, transpose_w=True)
        gh_PW = glu_backward(gate_PF, up_PF, act_PF, ga_PF, ctx.kind)
        g_w_in = _experts_weight_grad(xs_PD, gh_PW, plan, E) if need_w_in else None
        g_b_in = _experts_bias_grad(gh_PW, plan, E) if ctx.biases[0] and ctx.needs_input_grad[6] else None
        g_x = None
        if need_x:
            gxs_QD = _experts_mm(gh_PW, w_in_EDW, plan, transpose_w=True, zero_row=plan.dropped)
            # the K rows of a token are gathered and summed in a fixed order
            g_x = gxs_QD.index_select(0, plan.row_S).view(T, K, D).sum(dim=1)
        return g_x, g_gate_TK, g_w_in, g_w_out, None, None, g_b_in, g_b_out


def grouped_experts(x_TD: torch.Tensor, gate_TK: torch.Tensor, w_in_EDW: torch.Tensor, w_out_EFD: torch.Tensor,
                    plan: DispatchPlan, kind: FFNKind, b_in_EW: torch.Tensor | None = None,
                    b_out_ED: torch.Tensor | None = None) -> torch.Tensor:
    """Routed-expert output through the row layout of ``plan`` (differentiable in all four tensors).

    Args:
        x_TD: ``[T, D]`` layer input; gate_TK: ``[T, K]`` gate values (anything for dropped slots: their rows are
            zero); w_in_EDW: ``[E, D, 2F]`` (``[gate | up]``); w_out_EFD: ``[E, F, D]``; all in one dtype.
        plan: from :func:`build_dispatch_plan`; kind: an :class:`FFNKind` (the clamped SwiGLU included).
        b_in_EW, b_out_ED: optional expert biases ``[E, 2F]`` / ``[E, D]`` (GPT-OSS), in the same dtype.

    Returns:
        ``[T, D]`` ``sum_k gate[t, k] * expert_{idx[t, k]}(x[t])`` over the kept slots (fp32 for 16-bit inputs).
    """
    if plan.num_rows == 0:  # no rows at all (an empty batch): zeros, keeping the graph
        acc = _sum_dtype(x_TD)
        return x_TD.new_zeros(x_TD.shape, dtype=acc) + 0 * gate_TK.sum().to(acc)
    return _GroupedExperts.apply(x_TD, gate_TK, w_in_EDW, w_out_EFD, plan, kind, b_in_EW, b_out_ED)
