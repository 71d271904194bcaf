"""MXFP4 dequantisation of GPT-OSS checkpoints (OCP Microscaling Formats (MX) v1.0 specification, 2023; OpenAI 2025,
"gpt-oss-120b & gpt-oss-20b Model Card", arXiv 2508.10925, Sec. 2.3: the MoE weights ship in MXFP4).

A tensor ``W [..., Out, In]`` is stored as ``*_blocks [..., Out, In/32, 16]`` uint8 and ``*_scales [..., Out, In/32]``
uint8. Each byte holds two FP4 (E2M1) codes, the low nibble first (even column); each block of 32 values shares one
E8M0 scale ``2^(s - 127)``. The value of code ``c`` is ``E2M1[c] * 2^(s - 127)`` with
``E2M1 = [0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6]``. GPT-OSS stores its expert weights as
``[E, Out, In]``; the dequantised tensor is returned as ``[E, In, Out]``, the layout of the bf16 checkpoints
(``gate_up_proj [E, D, 2F]``, ``down_proj [E, F, D]``), as transformers' ``integrations/mxfp4.py`` does.
"""

from __future__ import annotations

import torch

#: the 16 E2M1 values, by 4-bit code (sign bit 3, two exponent bits, one mantissa bit)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(blocks shape, scales shape)`` of the MXFP4 storage of a dequantised ``[E, In, Out]`` tensor.

    Raises:
        ValueError: ``In`` is not a multiple of 32 (a whole number of MX blocks).
    """
    E, In, Out = shape
    if In % 32:
        raise ValueError(f"an MXFP4 tensor's inner dimension {In} is not a multiple of the block size 32")
    return (E, Out, In // 32, 16), (E, Out, In // 32)


def dequantize_expert(blocks_OG16: torch.Tensor, scales_OG: torch.Tensor) -> torch.Tensor:
    """One expert's ``[In, Out]`` fp32 weight from its MXFP4 ``blocks [Out, G, 16]`` and ``scales [Out, G]``
    (``In = 32 G``). Exact: every E2M1 value times a power of two is an fp32 number."""
    Out, G, _ = blocks_OG16.shape
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    b = blocks_OG16.to(torch.uint8)
    vals = torch.empty(Out, G, 32, dtype=torch.float32)
    vals[..., 0::2] = lut[(b & 0x0F).long()]  # the low nibble is the even column
    vals[..., 1::2] = lut[(b >> 4).long()]
    vals = torch.ldexp(vals, (scales_OG.to(torch.int32) - 127)[..., None])  # E8M0: a biased power of two
    return vals.reshape(Out, G * 32).t()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None,
                     transform=None) -> torch.Tensor:
    """Dequantise MXFP4 ``blocks [E, Out, G, 16]`` uint8 with ``scales [E, Out, G]`` uint8 into ``[E, G * 32, Out]``
    (``In = G * 32``), one expert at a time, so the temporaries stay one expert's size (gpt-oss-120b's
    ``gate_up_proj`` is 8.5 GB in fp32, one expert 66 MB).

    Args:
        out: optional ``[E, In, Out]`` destination (any float dtype), written in place; default a new fp32 tensor.
        transform: optional function applied to each expert's ``[In, Out]`` before it is written (GPT-OSS's
            gate / up de-interleaving).

    Raises:
        ValueError: the shapes do not belong together.
    """
    if blocks.dim() != 4 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
                         "([E, Out, G, 16] and [E, Out, G])")
    E, Out, G, _ = blocks.shape
    if out is None:
        out = torch.empty(E, G * 32, Out, dtype=torch.float32)
    for e in range(E):
        w = dequantize_expert(blocks[e], scales[e])
        out[e].copy_(transform(w) if transform is not None else w)
    return out
