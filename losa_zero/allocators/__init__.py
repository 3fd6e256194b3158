"""Layer-wise sparsity allocators behind one interface: uniform, RMI (LoSA), OWL, BESA.

``get_allocator(name, cfg, pruner)`` builds one; the ``prune`` command and every LoSA step
call its ``allocate`` (and, for a mixed N:M, ``importance``). See
:mod:`losa_zero.allocators.base` for the contract. Adding an allocator is one new module
with an :class:`Allocator` subclass and one entry in :data:`ALLOCATORS`.
"""
from __future__ import annotations

from ..errors import LosaZeroError
from .base import Allocation, Allocator, effective_weight
from .besa import BesaAllocator
from .owl import OwlAllocator
from .rmi import RmiAllocator
from .uniform import UniformAllocator

ALLOCATORS: dict[str, type[Allocator]] = {cls.name: cls for cls in (UniformAllocator, RmiAllocator, OwlAllocator,
                                                                    BesaAllocator)}


def get_allocator(name: str, cfg, pruner: str) -> Allocator:
    """The allocator called ``name`` for a run with config ``cfg`` and pruner ``pruner``."""
    if name not in ALLOCATORS:
        raise LosaZeroError(f"unknown allocation {name!r}: choose one of {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name](cfg, pruner)


def mixed_nm_allocators() -> tuple[str, ...]:
    """Names of the allocators that can choose a mixed N per layer."""
    return tuple(name for name, cls in ALLOCATORS.items() if cls.mixed_nm)


__all__ = ["ALLOCATORS", "Allocation", "Allocator", "effective_weight", "get_allocator", "mixed_nm_allocators"]
