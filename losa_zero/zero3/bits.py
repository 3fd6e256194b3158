"""Bit-packing of keep masks: 8 mask entries per byte, entry 8*i + k in bit k of byte i.

Plain tensor ops, so packing and unpacking run on whatever device the mask lives on.
"""
from __future__ import annotations

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


def packed_size(numel: int) -> int:
    """Bytes holding ``numel`` mask entries."""
    return (int(numel) + 7) // 8


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor (any shape, read flat) as a uint8 tensor of ``packed_size(numel)`` bytes."""
    flat = keep.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` entries of a packed mask as a flat bool tensor."""
    bits = (packed.reshape(-1, 1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:numel].bool()
