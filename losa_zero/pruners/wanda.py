"""Wanda: prune by |weight| x input-activation norm (Sun et al. 2023), as LoSA uses it.

docs/method.md §5.3: score S_ij = |W_ij| * ||x_j||_2, where ||x_j||_2 is the norm of input
column j over all calibration tokens, compared within each output row. No weight update.

Statistics are the per-column sums of x_j^2 plus the token count: plain sums, so ranks
all-reduce them and every rank scores with the norms of the whole calibration set. We use
the norm sqrt(sum x_j^2) itself (the released code uses the mean-square, whose square root
is proportional by sqrt(count): the ranking within a row, hence the mask, is identical).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import LinearStats, Pruner, SparsityTarget
from .masks import select_keep


class WandaStats(LinearStats):
    """Sum over tokens of x_j^2 per input column (float32) and the token count."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, device)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=self._device)

    def _buffers(self) -> list[str]:
        return ["sum_sq"]

    def add_batch(self, x: Tensor) -> None:
        t = self._tokens(x, torch.float32)
        self.sum_sq += t.square().sum(0)
        self._count += t.shape[0]

    def tensors(self) -> list[Tensor]:
        return [self.sum_sq, self._count]

    def column_norms(self) -> Tensor:
        """||x_j||_2 over all accumulated tokens, shape [in_features]."""
        return self.sum_sq.clamp_min(0).sqrt()


class WandaPruner(Pruner):
    """Prune the lowest |W_ij| * ||x_j||_2 of every row (or N:M group)."""

    name = "wanda"
    options = ("rounding",)

    def new_stats(self, in_features: int, device: torch.device | str | None = None) -> WandaStats:
        return WandaStats(in_features, device)

    def _prune(self, weight: Tensor, stats, target: SparsityTarget, prev_keep: Tensor | None) -> tuple[Tensor, Tensor]:
        self._check_stats(stats, WandaStats, weight.shape[1])
        norms = stats.column_norms().to(weight.device)
        score = weight.abs() * norms[None, :]
        keep = select_keep(score, target, prev_keep, self.rounding)
        return weight.masked_fill(~keep, 0.0), keep
