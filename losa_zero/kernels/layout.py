"""The bitmask layout of a sparse weight, in plain torch (no compiled code).

A weight ``W [out, in]`` is kept as a per-row bitmask of its nonzeros plus the nonzeros
themselves, packed row after row: the bytes read per token fall with the density, which is
what decode speed depends on. The C++ kernel (``bitmask_linear.cpp``) and the Triton kernel
(``triton_bitmask.py``) read this same layout; :func:`unpack_bitmask` is their reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_VALUES = 16  # zeros after the last nonzero: the kernels load fixed-width groups past it
VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass
class BitmaskWeight:
    """``mask`` uint8 [out, in_pad/8] (bit j of byte k of row r: W[r, 8k+j] != 0),
    ``values`` [nnz + PAD_VALUES] the nonzeros row-major then zeros, ``row_offsets`` int64
    [out + 1] index of each row's first nonzero in ``values``; ``in_features`` the true width
    (in_pad rounds it up to a multiple of 8; the padding columns are empty)."""

    mask: torch.Tensor
    values: torch.Tensor
    row_offsets: torch.Tensor
    in_features: int

    @property
    def out_features(self) -> int:
        return self.mask.shape[0]

    @property
    def in_padded(self) -> int:
        return self.mask.shape[1] * 8

    @property
    def nnz(self) -> int:
        return int(self.row_offsets[-1])

    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads: mask, nonzeros and row offsets."""
        return (self.mask.numel() + self.nnz * self.values.element_size()
                + self.row_offsets.numel() * self.row_offsets.element_size())


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
    nz = w != 0
    if in_pad != cols:
        nz = torch.nn.functional.pad(nz, (0, in_pad - cols), value=False)
    bits = nz.view(out, in_pad // 8, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)
    mask = bits.sum(-1, dtype=torch.uint8).contiguous()
    vals = w[w != 0]  # boolean indexing is row-major, the order the kernels walk
    values = torch.cat([vals, torch.zeros(PAD_VALUES, dtype=value_dtype)])
    counts = nz.sum(1)
    row_offsets = torch.zeros(out + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    return BitmaskWeight(mask, values, row_offsets, cols)


def unpack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in_pad] of a uint8 [out, in_pad/8] bitmask (bit j of byte k = column 8k+j)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return ((mask.unsqueeze(-1) >> shifts) & 1).bool().reshape(mask.shape[0], -1)


def unpack_bitmask(bw: BitmaskWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight ``[out, in_features]`` (reference for every kernel, and the fallback)."""
    nz = unpack_bits(bw.mask)
    w = torch.zeros(nz.shape, dtype=bw.values.dtype, device=bw.values.device)
    w[nz] = bw.values[: bw.nnz]
    w = w[:, : bw.in_features]
    return w if dtype is None else w.to(dtype)
