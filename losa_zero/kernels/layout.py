"""The bitmask layout of a sparse weight, in plain torch (no compiled code).

A weight ``W [out, in]`` is kept as a bitmask of its nonzeros plus the nonzeros themselves:
the bytes read per token fall with the density, which is what decode speed depends on.

Rows are grouped in blocks of ``ROW_BLOCK`` (8), and within a block the mask and the values
are interleaved column group by column group (8 columns, one mask byte per row): the mask
bytes of the block's 8 rows for columns 8k..8k+7 are 8 consecutive bytes (one 64-bit word),
and the values are those of row 0's byte k, then row 1's, ..., row 7's, then the same for
byte k+1. A kernel computing the block then reads exactly two sequential streams
(mask words and values), with one mask load per 64 weights and one pointer that advances by
the word's bit count; consecutive blocks follow each other in memory, so a whole layer is
two streams as well. The C++ kernel (``bitmask_linear.cpp``) and the Triton kernel
(``gpu.py``) read this layout; :func:`unpack_bitmask` is their reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_BLOCK = 8    # rows interleaved per block (the C++ kernel's kRowBlock)
PAD_VALUES = 16  # zeros after the last nonzero: the kernels load fixed-width groups past it
VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class BitmaskWeight:
    """``mask`` uint8 [blocks, in_pad/8 * ROW_BLOCK]: byte ``ROW_BLOCK*k + i`` of block b
    holds the mask bits of row ``ROW_BLOCK*b + i`` for columns 8k..8k+7 (bit j: column
    8k+j nonzero); ``values`` [nnz + PAD_VALUES] the nonzeros in that same order (per block,
    per column group, per row, per column), then zeros; ``block_offsets`` int64
    [blocks + 1] index in ``values`` of each block's first nonzero. ``in_features`` and
    ``out_features`` are the true sizes: in_pad rounds the width up to a multiple of 8, the
    last block may hold fewer than ROW_BLOCK rows; padding columns and rows are empty."""

    mask: torch.Tensor
    values: torch.Tensor
    block_offsets: torch.Tensor
    in_features: int
    out_features: int

    @property
    def in_padded(self) -> int:
        return self.mask.shape[1] // ROW_BLOCK * 8

    @property
    def nnz(self) -> int:
        return int(self.block_offsets[-1])

    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads: mask, nonzeros and block offsets."""
        return (self.mask.numel() + self.nnz * self.values.element_size()
                + self.block_offsets.numel() * self.block_offsets.element_size())


def _blocked(t: torch.Tensor, out: int, in_pad: int) -> torch.Tensor:
    """[out, in_pad] -> [blocks, in_pad/8, ROW_BLOCK, 8]: the order of the layout (padding
    rows appended as zeros / False)."""
    blocks = -(-out // ROW_BLOCK)
    t = torch.nn.functional.pad(t, (0, 0, 0, blocks * ROW_BLOCK - out))
    return t.view(blocks, ROW_BLOCK, in_pad // 8, 8).transpose(1, 2)


def pack_bitmask(weight: torch.Tensor, value_dtype: torch.dtype | None = None) -> BitmaskWeight:
    """Compress a dense 2-D weight (zeros = pruned) into the bitmask layout.

    ``value_dtype`` defaults to the weight's own dtype, so the packed values are exactly
    the weight's nonzeros; a lower precision is an explicit choice of the caller.
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_bitmask needs a 2-D weight, got shape {tuple(weight.shape)}")
    value_dtype = value_dtype or weight.dtype
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"bitmask values must be one of {VALUE_DTYPES}, got {value_dtype}")
    w = weight.detach().to("cpu", value_dtype)
    out, cols = w.shape
    in_pad = -(-cols // 8) * 8
    w = torch.nn.functional.pad(w, (0, in_pad - cols))
    wb = _blocked(w, out, in_pad)                          # [blocks, groups, ROW_BLOCK, 8]
    nz = wb != 0
    mask = (nz.to(torch.uint8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    mask = mask.reshape(nz.shape[0], -1).contiguous()      # [blocks, groups * ROW_BLOCK]
    values = torch.cat([wb[nz], torch.zeros(PAD_VALUES, dtype=value_dtype)])  # layout order
    block_offsets = torch.zeros(nz.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(nz.flatten(1).sum(1), 0, out=block_offsets[1:])
    return BitmaskWeight(mask, values, block_offsets, cols, out)


def unpack_bits(bw: BitmaskWeight) -> torch.Tensor:
    """bool [out, in_pad]: which weights are nonzero (the mask in plain row-major order)."""
    blocks = bw.mask.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=bw.mask.device)
    bits = ((bw.mask.view(blocks, -1, ROW_BLOCK).unsqueeze(-1) >> shifts) & 1).bool()  # [blocks, groups, R, 8]
    return bits.transpose(1, 2).reshape(blocks * ROW_BLOCK, -1)[: bw.out_features]


def unpack_bitmask(bw: BitmaskWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight ``[out, in_features]`` (reference for every kernel, and the fallback)."""
    out, in_pad = bw.out_features, bw.in_padded
    blocks = bw.mask.shape[0]
    nz = _blocked(unpack_bits(bw), out, in_pad)
    wb = torch.zeros(nz.shape, dtype=bw.values.dtype, device=bw.values.device)
    wb[nz] = bw.values[: bw.nnz]
    w = wb.transpose(1, 2).reshape(blocks * ROW_BLOCK, in_pad)[:out, : bw.in_features]
    return w if dtype is None else w.to(dtype)
