"""Expert parallelism's token exchange: the routed experts of an MoE layer split over the ``N`` ranks of an EP group,
tokens sent to the rank that holds their expert by ``all_to_all_single`` with variable splits and sent back.

:class:`ExpertParallelExperts` replaces a layer's :class:`~moecpt.model.moe.RoutedExperts`
(:meth:`~moecpt.model.moe.MoELayer.replace_experts`) and keeps experts ``[g * E/N, (g + 1) * E/N)`` of every layer
on EP rank ``g`` (GShard, Lepikhin et al. 2020, arXiv 2006.16668, Sec. 2.2; Switch Transformer, Fedus et al. 2022,
Sec. 2.2). One forward per layer:

1. **counts**: an all-to-all of the per-expert slot counts ``[E]`` tells every rank how many rows it receives for each
   local expert from each peer (one host sync: the variable splits must be known on the host, as in torchtitan and
   Megatron-Core's ``MoEAlltoAllTokenDispatcher``);
2. **dispatch**: the kept slots, sorted by expert (hence by destination rank), go out as ``[rows, D]``;
3. **experts**: the received rows run through the local experts in the fused grouped dispatch of
   :mod:`moecpt.model.expert_dispatch` (one slot per row, gate 1);
4. **combine**: the reverse all-to-all brings each slot's expert output home, where it is gate-weighted and summed
   over the ``K`` slots of its token in the same order and dtype as the single-process path.

Routing, capacity dropping, aux / z losses and the shared expert run on the token's own rank before and after, as in
DDP, so EP changes *where* experts compute and never *what* is computed. Both all-to-alls are one autograd node
(:class:`_AllToAll`) whose backward is the reverse exchange. Everything stays on the tokens' device (gloo on CPU,
NCCL on CUDA); only the split sizes travel to the host.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moecpt.model.expert_dispatch import build_dispatch_plan, grouped_experts, grouped_mm_usable

#: ``record(bytes_sent, bytes_received, seconds)`` for one exchange (the strategy's accountant and emulated link)
Recorder = Callable[[int, int, float], None]


def _exchange(out: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, me: int,
              record: Recorder) -> torch.Tensor:
    """``all_to_all_single`` of rows of ``x`` (``in_splits[r]`` rows to peer ``r``) into ``out``; counts the rows that
    leave / reach this rank (its own block stays local) in bytes."""
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    row = math.prod(x.shape[1:]) * x.element_size()
    record((sum(in_splits) - in_splits[me]) * row, (sum(out_splits) - out_splits[me]) * row, time.perf_counter() - t0)
    return out


def _not_counted(sent: int, received: int, seconds: float) -> None:
    """The recorder of evaluation forwards: their exchanges are not training traffic."""


class _AllToAll(torch.autograd.Function):
    """``x [sum(in_splits), D] -> [sum(out_splits), D]`` over ``group``; backward: the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, me: int, record: Recorder):
        ctx.args = (out_splits, in_splits, group, me, record)
        return _exchange(x.new_empty(sum(out_splits), *x.shape[1:]), x, out_splits, in_splits, group, me, record)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits, group, me, record = ctx.args
        gx = _exchange(g.new_empty(sum(in_splits), *g.shape[1:]), g, in_splits, out_splits, group, me, record)
        return gx, None, None, None, None, None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a DTensor's local tensor (differentiable; a view: writing it writes ``t``). Under EP × FSDP2
    (:mod:`moecpt.distributed.ep_fsdp`) the expert weights are DTensors of one rank, so that a fused optimizer step
    takes them in one list with FSDP2's parameters; everywhere else they are plain tensors."""
    return t.to_local() if isinstance(t, DTensor) else t


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class ExpertParallelExperts(nn.Module):
    """This rank's ``E / N`` experts of one MoE layer, and the all-to-all that feeds them (module docstring).

    Parameters keep :class:`~moecpt.model.moe.RoutedExperts`' names and layout for the local experts only:
    ``w_in [E/N, D, 2F]``, ``w_out [E/N, F, D]``. Gradients that reach them are the sums over the EP group's
    tokens (the reverse all-to-all brings every peer's); the strategy averages them over the expert-DP group.

    Args:
        full: the layer's :class:`~moecpt.model.moe.RoutedExperts` (all ``E`` experts; its slice is copied).
        group: the EP process group; size: its ``N`` ranks; index: this rank's place in it.
        record: called after every exchange of a training forward / backward with bytes sent, received, seconds.

    Raises:
        ValueError: ``N`` does not divide ``E`` (the recipe check refuses that first, in one line).
    """

    def __init__(self, full: nn.Module, group, size: int, index: int, record: Recorder):
        super().__init__()
        E = full.num_experts
        if E % size:
            raise ValueError(f"{E} experts do not split over {size} ranks")
        self.num_experts, self.ep, self.index = E, size, index
        self.local_experts = E // size
        self.d_model, self.width, self.kind = full.d_model, full.width, full.kind
        lo, hi = index * self.local_experts, (index + 1) * self.local_experts
        self.w_in = nn.Parameter(full.w_in.detach()[lo:hi].clone())  # [E/N, D, 2F]
        self.w_out = nn.Parameter(full.w_out.detach()[lo:hi].clone())  # [E/N, F, D]
        self.group, self.record = group, record

    def forward_grouped(self, x_TD: torch.Tensor, gate_TK: torch.Tensor, topk_idx_TK: torch.Tensor,
                        order_N: torch.Tensor, counts_E: torch.Tensor, overhead_rows: int,
                        use_grouped_mm: bool | None = None) -> torch.Tensor:
        """:meth:`moecpt.model.moe.RoutedExperts.forward_grouped` with the experts on the EP group's ranks.

        Args:
            x_TD: ``[T, D]`` this rank's tokens; gate_TK: ``[T, K]``; topk_idx_TK: ``[T, K]`` global expert ids;
            order_N: ``[N]`` kept slots ``t * K + k`` sorted by expert; counts_E: ``[E]`` kept slots per expert;
            overhead_rows, use_grouped_mm: the local experts' layout (as for ``RoutedExperts``).

        Returns:
            ``[T, D]`` in ``x_TD``'s dtype: ``sum_k gate[t, k] * expert_{idx[t, k]}(x[t])`` over the kept slots.
        """
        dtype, dev = _compute_dtype(x_TD), x_TD.device
        record = self.record if self.training else _not_counted  # training traffic only (as every other kind)
        T, K = topk_idx_TK.shape
        N, El = self.ep, self.local_experts
        # 1. counts: recv_NL[r, j] = slots peer r sends for local expert j
        recv_NL = torch.empty(N * El, dtype=counts_E.dtype, device=dev)
        _exchange(recv_NL, counts_E.contiguous(), [El] * N, [El] * N, self.group, self.index, record)
        recv_NL = recv_NL.view(N, El)
        host = torch.cat([counts_E.view(N, El).sum(1), recv_NL.sum(1)]).tolist()  # the one host sync
        send_splits, recv_splits = host[:N], host[N:]
        # 2. dispatch: rows sorted by expert are sorted by destination rank
        xs_ND = x_TD.to(dtype).index_select(0, order_N // K)
        xr_MD = _AllToAll.apply(xs_ND, recv_splits, send_splits, self.group, self.index, record)
        # 3. local experts; received rows come by source rank, then by local expert
        M = xr_MD.shape[0]
        if M == 0:  # keep the graph: every rank must run the backward exchange
            h_MD = xr_MD * 0
        else:
            local_M = torch.repeat_interleave(torch.arange(El, device=dev).repeat(N), recv_NL.reshape(-1))
            order_M = torch.argsort(local_M, stable=True)
            if use_grouped_mm is None:
                use_grouped_mm = grouped_mm_usable(self.d_model, self.width, dtype, dev)
            plan = build_dispatch_plan(local_M[:, None], order_M, recv_NL.sum(0), overhead_rows=overhead_rows,
                                       grouped_mm=use_grouped_mm,
                                       batch_quantum=torch.get_num_threads() if dev.type == "cpu" else 1)
            ones_M1 = xr_MD.new_ones(M, 1)
            with torch.autocast(device_type=dev.type, enabled=False):
                # gate 1: the outputs in the compute dtype exactly (the gate is applied at home)
                h_MD = grouped_experts(xr_MD, ones_M1, local_tensor(self.w_in).to(dtype),
                                       local_tensor(self.w_out).to(dtype), plan, self.kind).to(dtype)
        # 4. combine at home, as the single-process path sums: fixed order over k, fp32 for 16-bit
        o_ND = _AllToAll.apply(h_MD, send_splits, recv_splits, self.group, self.index, record)
        o_TKD = o_ND.new_zeros(T * K, self.d_model).index_copy(0, order_N, o_ND).view(T, K, self.d_model)
        acc = torch.float32 if o_TKD.element_size() < 4 else o_TKD.dtype
        y_TD = (o_TKD.to(acc) * gate_TK.to(dtype).to(acc).unsqueeze(2)).sum(dim=1)
        return y_TD.to(x_TD.dtype)

    def extra_repr(self) -> str:
        lo = self.index * self.local_experts
        return f"experts {lo}..{lo + self.local_experts - 1} of {self.num_experts} (EP rank {self.index} of {self.ep})"


def a2a_row_bytes(d_model: int, dtype: torch.dtype) -> int:
    """Bytes of one token row on the wire (``d_model`` values of the compute dtype)."""
    return d_model * torch.empty((), dtype=dtype).element_size()


def expected_a2a_bytes(slots_out: int, slots_in: int, d_model: int, dtype: torch.dtype, backward: bool = True) -> int:
    """Analytic bytes one rank *sends* per layer and step, the count exchange aside: its ``slots_out`` slots routed
    to a peer's experts leave once (dispatch), the ``slots_in`` rows peers sent it go back once (combine); the
    backward runs both exchanges reversed, doubling it. With uniform routing over ``N`` ranks,
    ``slots_out ~= slots_in ~= (N - 1) / N * T * K``: about ``4 (N - 1) / N * T * K * D * bytes`` per layer, and as
    many received."""
    return (2 if backward else 1) * (slots_out + slots_in) * a2a_row_bytes(d_model, dtype)


def routed_experts_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(fqn of the MoE layer, layer), ...]`` of every MoE layer of a :class:`~moecpt.model.transformer.Transformer`
    (those with a ``router`` and ``experts``), in layer order."""
    return [(f"blocks.{i}.ffn", b.ffn) for i, b in enumerate(model.blocks) if b.is_moe]

