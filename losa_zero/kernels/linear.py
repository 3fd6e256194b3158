"""``BitmaskLinear``: an inference-only linear whose weight stays compressed in memory.

Small batches (decode: one to a few tokens per sequence) go through the C++ bitmask kernel,
which reads only the mask and the nonzeros. Large batches (prefill) and inputs that need a
gradient use a dense weight decompressed for that call, so the module is always correct and
the kernel is used where it pays.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .build import load_kernel
from .layout import BitmaskWeight, pack_bitmask, unpack_bitmask

DENSE_ABOVE_TOKENS = 64  # default: more tokens than this in one call take the decompressed dense path


class BitmaskLinear(nn.Module):
    """Drop-in for ``nn.Linear`` (inference) holding a :class:`BitmaskWeight`."""

    def __init__(self, packed: BitmaskWeight, bias: torch.Tensor | None = None,
                 dense_above: int = DENSE_ABOVE_TOKENS):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.dense_above = dense_above
        self.register_buffer("mask", packed.mask)
        self.register_buffer("values", packed.values)
        self.register_buffer("block_offsets", packed.block_offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, value_dtype: torch.dtype | None = None,
                    dense_above: int = DENSE_ABOVE_TOKENS) -> "BitmaskLinear":
        """Pack ``linear.weight`` (its zeros are the pruned weights) in its own dtype by default."""
        return cls(pack_bitmask(linear.weight, value_dtype), linear.bias, dense_above=dense_above)

    @property
    def packed(self) -> BitmaskWeight:
        return BitmaskWeight(self.mask, self.values, self.block_offsets, self.in_features, self.out_features)

    @property
    def nnz(self) -> int:
        return int(self.block_offsets[-1])

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight (decompressed now; not kept)."""
        dtype = dtype or self.values.dtype
        kernel = load_kernel()
        if kernel is None or self.values.device.type != "cpu":
            return unpack_bitmask(self.packed, dtype)
        return kernel.decompress(self.mask, self.values, self.block_offsets, self.out_features, dtype)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        kernel = load_kernel()
        if (kernel is None or x2.shape[0] > self.dense_above or x.device.type != "cpu"
                or (x.requires_grad and torch.is_grad_enabled())):
            return F.linear(x, self.dense_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        y = kernel.matmul(x2, self.mask, self.values, self.block_offsets, self.out_features, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"values={str(self.values.dtype).replace('torch.', '')}, density={density:.3f}, "
                f"bias={self.bias is not None}")
