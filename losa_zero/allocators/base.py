"""The allocator interface: how much of each decoder layer a pruning pass removes.

An allocator turns a mean target sparsity into one rate per layer (or, for BESA, a pruned
count per row of every linear), measured on the current model: dense for ``prune``, the
merged weights at every LoSA step. The pruner then decides which weights go. Allocators
are small classes behind one interface, registered by name in
:data:`losa_zero.allocators.ALLOCATORS` beside the pruners' registry, so the CLI choices,
the config validation and the planner read one list.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..blockwise import CalibrationInputs
from ..lora import SparseLoRALinear
from ..pruners import SparsityTarget
from ..runtime import Runtime

@dataclass
class Allocation:
    """One pass's layer rates and what explains them (for the summary)."""

    rates: list[float]
    importance: list[float] | None = None
    redundancy: list[float] | None = None
    #: per-linear targets that replace the rates (BESA's learned per-row counts), per layer
    targets: list[dict[str, SparsityTarget]] | None = None
    #: per-layer details the summary records under the allocator's name
    records: list[dict] | None = None


class Allocator(ABC):
    """Layer-wise sparsity for one pruning pass.

    ``cfg`` is the run config (the allocator reads its own options, e.g. ``--owl-m``);
    ``pruner`` the name of the pruner that realises the rates (RMI's temperature depends
    on it)."""

    name: ClassVar[str] = ""
    #: whether the allocator ranks layers by importance, so that with one N:M pattern it
    #: can give each layer its own N (mixed N:M, docs/method.md section 7)
    mixed_nm: ClassVar[bool] = False

    def __init__(self, cfg, pruner: str):
        self.cfg = cfg
        self.pruner = pruner

    @abstractmethod
    def allocate(self, model: nn.Module, calib: CalibrationInputs, runtime: Runtime, target: float,
                 delta: float) -> Allocation:
        """Rates with mean ``target``, measured on ``model`` as it is; ``delta`` is the
        half-width of the band RMI keeps them in."""

    def importance(self, model: nn.Module, calib: CalibrationInputs, runtime: Runtime
                   ) -> tuple[list[float], list[float] | None]:
        """(importance, redundancy) of every layer, more important = fewer weights pruned
        (allocators with ``mixed_nm`` only)."""
        raise NotImplementedError(f"allocator {self.name!r} does not rank layers")


@torch.no_grad()
def effective_weight(linear: nn.Module, runtime: Runtime) -> torch.Tensor:
    """The weight the linear applies (float32, full): for a sparse-LoRA layer with an active
    adapter that is the merged W + s (B_r A_r) ⊙ M (docs/method.md section 1)."""
    w = runtime.read_weight(linear)
    if isinstance(linear, SparseLoRALinear) and linear.rank > 0:
        w = w + linear.delta_weight().to(w.device)
    return w
