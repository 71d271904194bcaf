"""Tensor pieces: how one Hugging Face tensor maps onto its moecpt tensor (:class:`Piece`, one :class:`PieceOp`),
writing it on import (:func:`place`) and cutting it back out on export (:func:`extract`), with the RoPE-pair and
gate / up interleaving permutations some families need."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from moecpt.interop.mxfp4 import dequantize_mxfp4, mxfp4_shapes


class PieceOp(StrEnum):
    """How a Hugging Face tensor maps onto its moecpt tensor (:class:`Piece`)."""

    COPY = "copy"  # same shape
    ROWS = "rows"  # dst[a:b] = src: gate / up rows of a dense or shared w_in
    EXPERT_IN = "expert_in"  # dst[e, :, a:b] = src.T, src [F, D]
    EXPERT_OUT = "expert_out"  # dst[e] = src.T, src [D, F]
    FUSED_IN = "fused_in"  # transformers >= 5 stacked experts: dst = src.transpose(1, 2)
    FUSED_OUT = "fused_out"
    ROPE_PAIRS = "rope_pairs"  # q / k rows of interleaved-pair RoPE -> moecpt's half rotation (index: heads, A)
    ROW = "row"  # dst [N] = src[0], src [1, N] (Ernie-4.5's e_score_correction_bias)
    DEINTERLEAVE = "deinterleave"  # GPT-OSS gate_up [..., 2F] with gate / up interleaved -> [gate | up]
    MXFP4 = "mxfp4"  # src = (blocks, scales) of GPT-OSS's MXFP4 experts, dequantised (index: (deinterleave,))


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor and where it lives in the moecpt state dict.

    ``op`` says how (one :class:`PieceOp`; each member documents its mapping).
    """

    hf: str
    dst: str
    op: PieceOp
    hf_shape: tuple[int, ...]
    index: tuple[int, ...] = ()


def _shape_of(dst_shape: tuple[int, ...], op: PieceOp, index: tuple[int, ...]) -> tuple[int, ...]:
    if op == PieceOp.COPY:
        return dst_shape
    if op == PieceOp.ROWS:
        return (index[1] - index[0], *dst_shape[1:])
    if op == PieceOp.EXPERT_IN:  # dst [E, D, 2F] -> src [F, D]
        return (index[2] - index[1], dst_shape[1])
    if op == PieceOp.EXPERT_OUT:  # dst [E, F, D] -> src [D, F]
        return (dst_shape[2], dst_shape[1])
    if op in (PieceOp.ROPE_PAIRS, PieceOp.DEINTERLEAVE):
        return dst_shape
    if op == PieceOp.MXFP4:
        return mxfp4_shapes(dst_shape)[0]
    if op == PieceOp.ROW:
        return (1, *dst_shape)
    return (dst_shape[0], dst_shape[2], dst_shape[1])  # FUSED_IN / FUSED_OUT


def rope_pair_order(head_dim: int) -> torch.Tensor:
    """``[A]`` permutation taking a head's dims from interleaved-pair RoPE (pairs ``(2i, 2i+1)`` rotate by
    frequency ``i``: GPT-J, Ernie-4.5, GLM's original layout) to the half rotation (pairs ``(i, i + A/2)``, as
    moecpt and LLaMA): ``half = interleaved[..., order]``. Attention scores are unchanged when q and k are permuted
    alike, so the conversion is exact (it is the permutation of Meta's LLaMA-to-transformers converter)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def deinterleave(src):
    """``[..., 2F]`` with gate / up interleaved (GPT-OSS ``gate_up[..., ::2]`` / ``[..., 1::2]``) -> ``[gate | up]``."""
    return torch.cat([src[..., 0::2], src[..., 1::2]], dim=-1)


def interleave(dst):
    """Inverse of :func:`deinterleave`: ``[gate | up]`` -> gate / up interleaved (a contiguous copy)."""
    gate, up = dst.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _per_head(w, piece: Piece):
    heads, head_dim = piece.index
    return w.reshape(heads, head_dim, *w.shape[1:])


def place(dst, src, piece: Piece) -> None:
    """Write HF tensor ``src`` into the moecpt tensor ``dst`` (dtype cast included)."""
    op, ix = piece.op, piece.index
    if op == PieceOp.COPY:
        dst.copy_(src)
    elif op == PieceOp.ROPE_PAIRS:
        _per_head(dst, piece).copy_(_per_head(src, piece)[:, rope_pair_order(ix[1])])
    elif op == PieceOp.ROW:
        dst.copy_(src[0])
    elif op == PieceOp.DEINTERLEAVE:
        dst.copy_(deinterleave(src))
    elif op == PieceOp.MXFP4:
        dequantize_mxfp4(*src, out=dst, transform=deinterleave if ix[0] else None)  # expert by expert
    elif op == PieceOp.ROWS:
        dst[ix[0]:ix[1]].copy_(src)
    elif op == PieceOp.EXPERT_IN:
        dst[ix[0], :, ix[1]:ix[2]].copy_(src.t())
    elif op == PieceOp.EXPERT_OUT:
        dst[ix[0]].copy_(src.t())
    else:  # fused_in / fused_out
        dst.copy_(src.transpose(1, 2))


def extract(dst, piece: Piece):
    """The HF tensor of ``piece`` cut out of the moecpt tensor ``dst`` (a contiguous copy or view)."""
    op, ix = piece.op, piece.index
    if op == PieceOp.COPY:
        out = dst
    elif op == PieceOp.ROPE_PAIRS:
        out = _per_head(dst, piece)[:, torch.argsort(rope_pair_order(ix[1]))].reshape(dst.shape)
    elif op == PieceOp.ROW:
        out = dst[None]
    elif op == PieceOp.DEINTERLEAVE:
        out = interleave(dst)
    elif op == PieceOp.ROWS:
        out = dst[ix[0]:ix[1]]
    elif op == PieceOp.EXPERT_IN:
        out = dst[ix[0], :, ix[1]:ix[2]].t()
    elif op == PieceOp.EXPERT_OUT:
        out = dst[ix[0]].t()
    else:  # FUSED_IN / FUSED_OUT
        out = dst.transpose(1, 2)
    return out.contiguous()
