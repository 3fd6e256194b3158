"""Checksums of the files a ZeRO-3 run writes and later trusts, and deleting big shared
folders without making ranks wait on one of them.

A resumed run loads hundreds of GB of checkpoint shards and dense targets. A byte changed
on disk (a bad sector, a storage bug, a stray copy) keeps the file's size, loads without
error and gives a different model with exit 0, so sizes are not enough: every file is
hashed (xxHash XXH3-128, fast enough to be limited by the disk) *while it is written*, by
passing ``torch.save`` a writer that hashes each chunk on its way to the file. Recording a
checksum therefore costs no read; only verifying one (at resume) reads the file back, and
that work is split between the ranks.

Deleting old checkpoints or the dense targets (hundreds of GB at 70B) from one rank while
the others wait in a collective can outlast the collective timeout. :func:`remove_shared`
renames the folder away in O(1) (so nothing can pick it up any more), then every rank
deletes an equal share of its files.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import torch
import xxhash

from .partition import balance

#: the checksum recorded for every file, under this key of its record
ALGORITHM = "xxh3_128"
_CHUNK = 16 << 20


class _HashingWriter:
    """File object for ``torch.save`` that hashes every byte it passes to the file."""

    def __init__(self, fh):
        self.fh, self.hash, self.size = fh, xxhash.xxh3_128(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def save_atomic(obj, path: Path) -> dict:
    """torch.save to a temporary name while hashing it, fsync, rename; returns the file's
    record ``{"size": bytes, ALGORITHM: hex digest}``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"size": writer.size, ALGORITHM: writer.hash.hexdigest()}


def file_record(path: Path) -> dict:
    """The record of a file already on disk (small files: markers' companions such as meta.json)."""
    h, size = xxhash.xxh3_128(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, ALGORITHM: h.hexdigest()}


def problem(path: Path, record: dict) -> str | None:
    """Why ``path`` does not match ``record`` (missing, other size, other checksum), or None."""
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size != record.get("size"):
        return f"{size} bytes, {record.get('size')} recorded"
    if ALGORITHM not in record:
        return "no checksum recorded"
    if file_record(path)[ALGORITHM] != record[ALGORITHM]:
        return "checksum mismatch (same size, different bytes)"
    return None


# -- collective helpers (``peers``: the runtime: rank, world size, all_gather_object, barrier) --
def verify_shared(directory: Path, records: dict[str, dict], peers) -> dict[str, str]:
    """``{file name: problem}`` for the files of ``directory`` that do not match their
    records, the same on every rank. Each rank hashes a share of the files (balanced by
    size), so verifying costs one read of the folder in all, spread over the ranks."""
    names = sorted(records)
    owners = balance([int(records[n].get("size", 0)) for n in names], peers.world_size)
    mine = {}
    for name, owner in zip(names, owners):
        if owner == peers.rank:
            why = problem(Path(directory) / name, records[name])
            if why is not None:
                mine[name] = why
    found: dict[str, str] = {}
    for part in peers.all_gather_object(mine):
        found.update(part)
    return dict(sorted(found.items()))


def remove_shared(paths: list[Path], peers) -> None:
    """Delete the folders ``paths`` (rank 0's list counts; call on every rank).

    Rank 0 renames each folder to a hidden name (O(1): no run can pick it up any more), then
    every rank deletes its share of the files (balanced by size) and rank 0 removes what is
    left. No rank spends long on the others' behalf inside a collective wait."""
    chosen = peers.all_gather_object([str(p) for p in paths] if peers.is_main else None)[0]
    trash, files = [], []
    if peers.is_main:  # rename, then list once: every rank splits the same listing
        for p in map(Path, chosen):
            t = p.with_name(f".deleting-{p.name}-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(p, t)
                trash.append(str(t))
        for t in trash:
            for f in sorted(Path(t).rglob("*")):
                with contextlib.suppress(OSError):
                    if f.is_file():
                        files.append((str(f), f.stat().st_size))
    trash, files = peers.all_gather_object((trash, files))[0]
    for (f, _), owner in zip(files, balance([size for _, size in files], peers.world_size)):
        if owner == peers.rank:
            with contextlib.suppress(FileNotFoundError):
                Path(f).unlink()
    peers.barrier()
    if peers.is_main:
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)
