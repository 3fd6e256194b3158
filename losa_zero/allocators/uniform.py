"""Uniform allocation: the same rate in every layer (the baseline and LoSA's ablation)."""
from __future__ import annotations

from .base import Allocation, Allocator


class UniformAllocator(Allocator):
    name = "uniform"

    def allocate(self, model, calib, runtime, target, delta) -> Allocation:
        from ..modeling import decoder_layers

        return Allocation([target] * len(decoder_layers(model)))
