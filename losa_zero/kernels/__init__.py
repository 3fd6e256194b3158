"""Sparse inference kernels: the bitmask layout, its C++ CPU kernel and module, the model
loader that swaps a sparse model's linears for it, and the GPU paths (Triton bitmask decode,
PyTorch semi-structured 2:4)."""
from .build import kernel_available, load_kernel
from .layout import BitmaskWeight, pack_bitmask, unpack_bitmask
from .linear import BitmaskLinear

__all__ = ["BitmaskLinear", "BitmaskWeight", "kernel_available", "load_kernel", "pack_bitmask", "unpack_bitmask"]
