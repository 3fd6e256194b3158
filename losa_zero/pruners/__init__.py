"""Pruning algorithms behind one interface: magnitude, Wanda and SparseGPT.

``get_pruner(name, **options)`` builds one; the block loop then calls
``new_stats`` / ``LinearStats.add_batch`` / ``tensors`` (all-reduce) / ``prune`` for every
linear. See :mod:`losa_zero.pruners.base` for the contract.
"""
from __future__ import annotations

from ..errors import LosaZeroError
from .base import ROUNDING_MODES, LinearStats, Pruner, SparsityTarget
from .magnitude import MagnitudePruner
from .masks import (check_nm_width, count_to_prune, lowest_k_keep, nm_candidates, nm_keep, realised_sparsity,
                    row_counts_keep, rowwise_keep, satisfies_nm, select_keep, toward_nm_keep)
from .sparsegpt import HessianStats, SparseGPTPruner
from .wanda import WandaPruner, WandaStats

PRUNERS: dict[str, type[Pruner]] = {cls.name: cls for cls in (MagnitudePruner, WandaPruner, SparseGPTPruner)}


def get_pruner(name: str, **options) -> Pruner:
    """The pruner called ``name`` ("magnitude", "wanda" or "sparsegpt"), built with ``options``."""
    key = str(name).strip().lower()
    if key not in PRUNERS:
        raise LosaZeroError(f"unknown pruner {name!r}: choose one of {', '.join(PRUNERS)}")
    cls = PRUNERS[key]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise LosaZeroError(
            f"pruner {key!r} does not take option(s) {', '.join(unknown)}: valid are {', '.join(cls.options)}")
    return cls(**options)


__all__ = [
    "PRUNERS", "ROUNDING_MODES", "HessianStats", "LinearStats", "MagnitudePruner", "Pruner", "SparseGPTPruner",
    "SparsityTarget", "WandaPruner", "WandaStats", "check_nm_width", "count_to_prune", "get_pruner",
    "lowest_k_keep", "nm_candidates", "nm_keep", "realised_sparsity", "row_counts_keep", "rowwise_keep", "satisfies_nm",
    "select_keep", "toward_nm_keep",
]
