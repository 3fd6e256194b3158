"""Keep masks stored partitioned across ZeRO-3 ranks, one bit per weight.

Each rank holds, for every sparse-LoRA linear, the mask bits of exactly the slice of the
weight that its own ZeRO-3 shard holds: flat elements [rank * P, (rank + 1) * P) with P the
weight's DeepSpeed partition size (the last shard padded). That is ceil(P / 8) bytes per
linear, about numel / (8 * world) per rank for the whole model, and nothing model-sized is
replicated. The full mask exists only while it is needed:

- inside ``ZeroRuntime.gathered(block)`` (pruning, merging, calibration forwards) the
  block's masks are all-gathered once when the block's weights are, and dropped with them;
- in a training forward, each adapted linear all-gathers its mask when it runs, and its
  backward rebuilds it again instead of keeping it alive in between (``keep_fn``).

The masks are plain attributes, not buffers or parameters: buffers would be replicated in
full on every rank, and DeepSpeed would try to train or cast parameters.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from ..lora import SparseLoRALinear
from .bits import pack_bits, packed_size, unpack_bits


class _Entry:
    __slots__ = ("name", "numel", "shape", "part", "shard", "full")

    def __init__(self, name: str, shape: tuple[int, int], part: int):
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.part = int(part)           # elements of the weight held by each rank (DeepSpeed's partition size)
        self.shard: torch.Tensor | None = None   # packed bits of this rank's slice; None = dense (no mask yet)
        self.full: torch.Tensor | None = None    # packed full mask while the block is gathered


class PartitionedMaskStore:
    """The ``mask_store`` of every SparseLoRALinear of a ZeRO-3 model (see lora.py)."""

    def __init__(self, rank: int, world_size: int, comm_device: torch.device, store_device: torch.device | None = None,
                 group=None):
        self.rank, self.world_size = rank, world_size
        self.comm_device = torch.device(comm_device)
        self.store_device = torch.device(store_device) if store_device is not None else self.comm_device
        self.group = group
        self._entries: dict[int, _Entry] = {}
        self._layers: dict[str, SparseLoRALinear] = {}

    # -- registration -----------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> int:
        """Route the masks of every SparseLoRALinear of ``model`` here; returns how many."""
        n = 0
        for name, module in model.named_modules():
            if isinstance(module, SparseLoRALinear) and id(module) not in self._entries:
                w = module.weight
                part = w.partition_numel() if hasattr(w, "partition_numel") else w.numel()
                entry = _Entry(name, (module.out_features, module.in_features), part)
                old = module.__dict__.get("_keep")
                self._entries[id(module)] = entry
                self._layers[name] = module
                module.mask_store = self
                if old is not None:
                    self.set(module, old)
                    module._keep = None
                n += 1
        return n

    def _entry(self, layer: SparseLoRALinear) -> _Entry:
        try:
            return self._entries[id(layer)]
        except KeyError:
            raise RuntimeError("this SparseLoRALinear is not registered with the partitioned mask store") from None

    def partition_size(self, name: str) -> int:
        """Entries of ``name``'s weight in each rank's partition (what a mask shard covers)."""
        return self._entry(self._layers[name]).part

    # -- the SparseLoRALinear.mask_store protocol ------------------------------------------------
    def keep(self, layer: SparseLoRALinear) -> torch.Tensor | None:
        e = self._entry(layer)
        if e.shard is None:
            return None
        full = e.full if e.full is not None else self._gather(e)
        return unpack_bits(full, e.numel).view(e.shape)

    def keep_fn(self, layer: SparseLoRALinear):
        return functools.partial(self.keep, layer)

    def set(self, layer: SparseLoRALinear, keep: torch.Tensor | None) -> None:
        e = self._entry(layer)
        if keep is None:
            e.shard = e.full = None
            return
        flat = keep.reshape(-1)
        self._set_local(e, flat)
        if e.full is not None:
            e.full = pack_bits(flat).to(self.comm_device)

    def set_packed(self, layer: SparseLoRALinear, full_bits: torch.Tensor) -> None:
        """Like :meth:`set` from an already packed full mask (as exchanged between ranks)."""
        e = self._entry(layer)
        self._set_local(e, unpack_bits(full_bits, e.numel))
        if e.full is not None:
            e.full = full_bits.to(self.comm_device)

    def _set_local(self, e: _Entry, flat: torch.Tensor) -> None:
        start = self.rank * e.part
        n = max(0, min(e.part, e.numel - start))
        local = torch.zeros(e.part, dtype=torch.bool, device=flat.device)
        if n:
            local[:n] = flat[start:start + n]
        e.shard = pack_bits(local).to(self.store_device)

    # -- gathering --------------------------------------------------------------------------
    def _gather(self, e: _Entry) -> torch.Tensor:
        """The packed full mask of one linear, from every rank's shard (collective)."""
        shard = e.shard.to(self.comm_device)
        if self.world_size == 1:
            return shard
        nbytes = shard.numel()
        out = torch.empty(nbytes * self.world_size, dtype=torch.uint8, device=self.comm_device)
        dist.all_gather_into_tensor(out, shard, group=self.group)
        if e.part % 8 == 0:
            return out[:packed_size(e.numel)]
        bits = unpack_bits(out, out.numel() * 8).view(self.world_size, nbytes * 8)[:, :e.part]
        return pack_bits(bits.reshape(-1)[:e.numel])

    def open(self, layers) -> None:
        """All-gather the masks of ``layers`` (a gathered block's), kept until :meth:`close`."""
        for layer in layers:
            e = self._entry(layer)
            if e.shard is not None and e.full is None:
                e.full = self._gather(e)

    def close(self, layers) -> None:
        for layer in layers:
            self._entry(layer).full = None

    # -- accounting and checkpoints -------------------------------------------------------------
    def local_bytes(self) -> int:
        """Bytes of mask bits this rank holds (its shards; ~ numel / (8 * world) in total)."""
        return sum(e.shard.numel() * e.shard.element_size() for e in self._entries.values() if e.shard is not None)

    def layout(self) -> dict:
        """name -> numel, shape, partition size and whether a mask exists (same on every rank)."""
        return {e.name: {"numel": e.numel, "shape": list(e.shape), "partition": e.part, "dense": e.shard is None}
                for e in self._entries.values()}

    def local_state(self) -> dict[str, torch.Tensor | None]:
        return {e.name: (None if e.shard is None else e.shard.detach().cpu().clone()) for e in self._entries.values()}

    def load_local_bits(self, name: str, local: torch.Tensor | None) -> None:
        """Install this rank's slice of ``name``'s mask given as bools (P entries, re-sharded)."""
        e = self._entries[id(self._layers[name])]
        if local is None:
            e.shard = e.full = None
            return
        e.shard = pack_bits(local.reshape(-1)).to(self.store_device)
        e.full = None
