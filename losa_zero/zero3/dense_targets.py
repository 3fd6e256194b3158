"""LoSA's dense reconstruction targets on disk: written once per run, read back
memory-mapped, checked before a resumed run trusts them.

Layout of ``CHECKPOINT_DIR/dense_targets/``::

    layer0003.rank00001.pt    this rank's calibration sequences of layer 3
    manifest.json             which sequences each file holds, every file's size and
                              checksum; written last (its absence = incomplete)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import LosaZeroError
from ..outputs import write_json_atomic
from .integrity import remove_shared, save_atomic, verify_shared
from .partition import split_range

log = logging.getLogger("losa_zero")

FORMAT = 2
MANIFEST = "manifest.json"


def write_activation(directory: Path, layer: int, rank: int, hidden: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Save this rank's dense targets of ``layer``; returns them memory-mapped from the file,
    and ``{file name: record}`` (size and checksum, computed while writing)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"layer{layer:04d}.rank{rank:05d}.pt"
    record = save_atomic(hidden.detach().cpu().contiguous(), path)
    return torch.load(path, mmap=True, map_location="cpu", weights_only=True), {path.name: record}


def write_manifest(directory: Path, runtime, n_layers: int, n: int) -> None:
    """Collective, after every rank wrote its files (``runtime.activation_files``)."""
    files = {}
    for part in runtime.all_gather_object(dict(runtime.activation_files)):
        files.update(part)
    if runtime.is_main:
        ranges = [list(split_range(n, runtime.world_size, r, runtime.calib_batch_size))
                  for r in range(runtime.world_size)]
        write_json_atomic(directory / MANIFEST, {
            "format": FORMAT, "n_layers": n_layers, "n": n, "world_size": runtime.world_size, "ranges": ranges,
            "files": files})
    runtime.barrier()


def intact(directory: Path, runtime, n_layers: int, n: int) -> bool:
    """Whether the dense targets in ``directory`` are complete, for this calibration set, and
    byte for byte what was written (checksums, verified by all ranks, a share each). False
    with a warning naming the problem otherwise: the caller then computes them again."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        ok = (manifest["format"] == FORMAT and manifest["n"] == n and manifest["n_layers"] == n_layers
              and isinstance(manifest["files"], dict))
    except (OSError, ValueError, KeyError, TypeError):
        manifest, ok = None, False
    if not all(runtime.all_gather_object(ok)):
        if runtime.is_main:
            log.warning(f"dense targets in {directory} are missing, incomplete or for another calibration set: "
                        "computing them again")
        return False
    damaged = verify_shared(directory, manifest["files"], runtime)
    if damaged:
        if runtime.is_main:
            name, why = next(iter(damaged.items()))
            log.warning(f"dense targets file {directory / name} is damaged ({why}"
                        + (f"; {len(damaged) - 1} more" if len(damaged) > 1 else "") + "): computing them again")
        return False
    return True


def clear(directory: Path, runtime) -> None:
    """Remove earlier dense targets (every rank deletes a share; collective)."""
    remove_shared([directory] if directory.exists() else [], runtime)
    runtime.activation_files.clear()


def load(directory: Path, runtime, n_layers: int, n: int) -> list[torch.Tensor]:
    """This rank's share of the saved dense targets, at any world size (memory-mapped)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        raise LosaZeroError(f"{directory} has no complete dense targets ({MANIFEST}): restart with resume=never") from None
    if manifest["n"] != n or manifest["n_layers"] != n_layers:
        raise LosaZeroError(f"dense targets in {directory} are for {manifest['n']} sequences x {manifest['n_layers']} "
                            f"layers, this run has {n} x {n_layers}: restart with resume=never")
    a, b = split_range(n, runtime.world_size, runtime.rank, runtime.calib_batch_size)
    out = []
    for l in range(n_layers):
        pieces = []
        for q, (qa, qb) in enumerate(manifest["ranges"]):
            lo, hi = max(a, qa), min(b, qb)
            if lo < hi:
                t = torch.load(directory / f"layer{l:04d}.rank{q:05d}.pt", mmap=True, map_location="cpu",
                               weights_only=True)
                pieces.append(t[lo - qa:hi - qa])
        out.append(pieces[0] if len(pieces) == 1 else (torch.cat(pieces) if pieces else None))
    return out
