"""How ZeRO-3 ranks share things out: calibration sequences, pruning work, parameters.

Pure functions of sizes and ranks, used by the runtime and by the checkpoints alike (a
checkpoint written at one world size is re-sharded at another with the same rules).
"""
from __future__ import annotations

import math


def split_range(n_items: int, world_size: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """[start, end) of the items rank ``rank`` holds: contiguous, in whole units of ``unit``
    items (calibration batches), as even as possible, ranks in order."""
    units = math.ceil(n_items / unit) if n_items else 0
    a = (rank * units) // world_size
    b = ((rank + 1) * units) // world_size
    return min(a * unit, n_items), min(b * unit, n_items)


def balance(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each item: largest first onto the least loaded rank (ties: lower index)."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def is_zero_param(p) -> bool:
    return hasattr(p, "ds_id")
