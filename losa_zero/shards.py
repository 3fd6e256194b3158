"""Sharded safetensors output, written one shard at a time.

The streamed ZeRO-3 export and ``losa-zero compress`` both produce a Hugging Face folder
from parameter groups that arrive one after another (a gathered decoder layer, the
tensors of one layer read from disk); neither ever holds the whole model. Groups are
packed into shards in order, each shard file is written under a temporary name and
renamed, and the index lists the tensors as stored (compressed names included).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch

from .errors import LosaZeroError
from .outputs import write_json_atomic

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text, what: str = "export_shard_size") -> int:
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise LosaZeroError(f"{what} {text!r} is not a size like 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def plan_groups(group_bytes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups (by index) cut into shards of at most ``max_bytes`` dense bytes; a
    group is never split, and one larger than the limit is a shard of its own."""
    shards, cur, size = [], [], 0
    for i, nbytes in enumerate(group_bytes):
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardWriter:
    """Writes shard files into ``out_dir``; ``transform`` (e.g. a compressor) maps each
    shard's tensors to the tensors stored. Keeps only the names and byte counts."""

    def __init__(self, out_dir: Path, n_shards: int,
                 transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None):
        self.out_dir = Path(out_dir)
        self.files = shard_names(n_shards)
        self.transform = transform
        self.weight_map: dict[str, str] = {}
        self.bytes = 0

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if self.transform is not None:
            tensors = self.transform(tensors)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        for name, t in tensors.items():
            self.weight_map[name] = self.files[i]
            self.bytes += t.numel() * t.element_size()
        tmp = self.out_dir / f".{self.files[i]}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.out_dir / self.files[i])

    def state(self) -> tuple[dict[str, str], int]:
        return self.weight_map, self.bytes


def write_index(out_dir: Path, parts: list[tuple[dict[str, str], int]], n_shards: int) -> int:
    """The safetensors index from every writer's ``state()`` (one per rank); none for one
    shard. Returns the stored bytes."""
    weight_map, total = {}, 0
    for names, nbytes in parts:
        weight_map.update(names)
        total += nbytes
    if n_shards > 1:
        write_json_atomic(Path(out_dir) / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return total
