"""Magnitude pruning: the data-free baseline.

Score |W_ij|, compared within each output row (the per-output comparison group the Wanda
paper found best), or within each N:M group. No calibration statistics, so
:meth:`new_stats` returns None and the block loop skips the calibration forward.
"""
from __future__ import annotations

from torch import Tensor

from .base import Pruner, SparsityTarget
from .masks import select_keep


class MagnitudePruner(Pruner):
    """Prune the smallest |W| of every row (or N:M group)."""

    name = "magnitude"
    calibrated = False
    options = ("rounding",)

    def _prune(self, weight: Tensor, stats, target: SparsityTarget, prev_keep: Tensor | None) -> tuple[Tensor, Tensor]:
        keep = select_keep(weight.abs(), target, prev_keep, self.rounding)
        return weight.masked_fill(~keep, 0.0), keep
