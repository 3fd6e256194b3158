"""ZeroRuntime: the :class:`~losa_zero.runtime.Runtime` of a DeepSpeed ZeRO-3 model.

The algorithms (block loop, pruners, LoSA) are the single-process code; only this class
knows that weights are partitioned:

- ``gathered(block)`` all-gathers the block's parameters and masks, and on exit writes
  each rank's slice of every weight that was changed into its own shard (DeepSpeed's
  ``partition(has_been_updated=True)``, which also handles CPU/NVMe offload) and frees
  the rest: no broadcast, every rank holds the same new weight;
- ``map_linears`` shares the pruning of a block's target linears out between ranks and
  broadcasts each result (weight, packed mask) from the rank that computed it;
- calibration sequences are split across ranks in whole batches, in order, so each rank's
  block forwards are exactly the single-process ones for its sequences; statistics are
  sums all-reduced (vectors accumulated in float64, so the reduced value does not depend
  on how the sums were split); the CKA Gram matrix is exact across ranks (all-to-all of
  feature slices, then an all-reduce of the partial n x n Grams);
- masks live in a :class:`~losa_zero.zero3.masks.PartitionedMaskStore`.

Every method that communicates is collective: all ranks call it in the same order (they
run the same block loop on the same schedule, also when one has no sequences left).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..lora import SparseLoRALinear
from ..runtime import Runtime
from .bits import pack_bits, packed_size
from .dense_targets import write_activation
from .masks import PartitionedMaskStore
from .partition import balance, is_zero_param, split_range


class ZeroRuntime(Runtime):
    """Runtime of one rank of a ZeRO-3 run (``torch.distributed`` initialised)."""

    unwrap_after_merge = False
    stop_after_inputs = False

    def __init__(self, device: torch.device | str, ds_config: dict, calib_batch_size: int,
                 mask_device: torch.device | str | None = None, activation_dir: Path | None = None):
        """``activation_dir``: where :meth:`keep_activation` writes the dense targets (the
        checkpoint folder's ``dense_targets``), so a resumed run reads them back."""
        super().__init__(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.ds_config = ds_config
        self.calib_batch_size = int(calib_batch_size)
        self.masks = PartitionedMaskStore(self.rank, self.world_size, self.device, mask_device)
        self.activation_dir = activation_dir
        self.activation_files: dict[str, dict] = {}  # dense-target files this rank wrote: name -> size, checksum
        self._open: dict[int, nn.Parameter] = {}
        self._modified: set[int] = set()
        self._open_linears: set[int] = set()

    # -- collectives --------------------------------------------------------------------------
    def all_reduce_sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if t.device != self.device:
                moved = t.to(self.device)
                dist.all_reduce(moved)
                t.copy_(moved)
            else:
                dist.all_reduce(t)

    def barrier(self) -> None:
        dist.barrier()

    def local_indices(self, n: int) -> list[int]:
        a, b = split_range(n, self.world_size, self.rank, self.calib_batch_size)
        return list(range(a, b))

    def counts(self, n: int) -> list[int]:
        """How many of ``n`` calibration sequences each rank holds."""
        return [b - a for a, b in (split_range(n, self.world_size, r, self.calib_batch_size)
                                   for r in range(self.world_size))]

    def gram(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Exact n x n Gram over sequences held by different ranks: every rank sends each
        other rank one slice of its sequences' features (all-to-all), so it holds all n
        sequences for 1/world of the features; the partial Grams are then all-reduced."""
        if self.world_size == 1:
            return super().gram(rows, n)
        counts = self.counts(n)
        W = self.world_size
        feats = rows.shape[1]
        width = math.ceil(feats / W)
        m = max(counts)
        send = []
        for s in range(W):
            piece = torch.zeros(m, width, dtype=rows.dtype, device=self.device)
            block = rows[:, s * width:(s + 1) * width]
            piece[:block.shape[0], :block.shape[1]] = block
            send.append(piece)
        recv = [torch.empty(m, width, dtype=rows.dtype, device=self.device) for _ in range(W)]
        dist.all_to_all(recv, send)
        del send
        x = torch.cat([recv[s][:counts[s]] for s in range(W)], 0)
        del recv
        k = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for start in range(0, width, 1 << 20):
            part = x[:, start:start + (1 << 20)].to(torch.float64)
            k += part @ part.t()
        dist.all_reduce(k)
        return k.cpu()

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # -- statistics and stored activations ----------------------------------------------------
    def new_stats(self, pruner, in_features: int):
        """As on one process, but per-column sums (Wanda's norms) accumulate in float64
        (``LinearStats.widen_vector_sums``): their total, rounded back to float32 after the
        all-reduce, is then the same on any number of ranks, and so is the mask."""
        stats = pruner.new_stats(in_features, device=self.device)
        return None if stats is None else stats.widen_vector_sums()

    def keep_activation(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.activation_dir is None:
            return hidden
        hidden, record = write_activation(self.activation_dir, layer, self.rank, hidden)
        self.activation_files.update(record)
        return hidden

    # -- weights ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapter_init(self, model: nn.Module):
        """Create the LoRA factors partitioned (zero.Init), then route their masks to the store."""
        import deepspeed

        # Reuse the model's NVMe swapper: a new zero.Init would create another one, and a
        # new swapper empties the swap folder that holds the model's offloaded shards.
        swapper = next((p.nvme_swapper for p in model.parameters() if getattr(p, "nvme_swapper", None) is not None),
                       None)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, param_swapper=swapper):
            yield
        self.masks.attach(model)

    def gathered(self, module: nn.Module):
        linears = [m for m in module.modules() if isinstance(m, SparseLoRALinear) and m.mask_store is self.masks]
        return self.gathered_params(list(module.parameters()), linears)

    @contextlib.contextmanager
    def gathered_params(self, params, linears=()) -> Iterator[None]:
        """Gather ``params`` (and the masks of ``linears``) for the duration of the block."""
        params = {id(p): p for p in params if is_zero_param(p) and id(p) not in self._open}
        params = sorted(params.values(), key=lambda p: p.ds_id)
        linears = [m for m in linears if id(m) not in self._open_linears]
        if params:
            params[0].all_gather(param_list=params)
        for p in params:
            self._open[id(p)] = p
        for m in linears:
            self._open_linears.add(id(m))
        self.masks.open(linears)
        try:
            yield
        finally:
            self.masks.close(linears)
            for m in linears:
                self._open_linears.discard(id(m))
            for p in params:
                del self._open[id(p)]
            changed = [p for p in params if id(p) in self._modified]
            kept = [p for p in params if id(p) not in self._modified]
            for p in changed:
                self._modified.discard(id(p))
            if kept:
                kept[0].partition(param_list=kept, has_been_updated=False)
            if changed:
                # Every rank holds the same full new weight (or, restoring a checkpoint, its
                # own slice of it): each keeps its own slice.
                changed[0].partition(param_list=changed, has_been_updated=True)

    def mark_modified(self, p: nn.Parameter) -> None:
        """``p`` (gathered) was written: its shard is updated when its block is released."""
        self._check_open(p)
        self._modified.add(id(p))

    def _check_open(self, p: nn.Parameter) -> None:
        if is_zero_param(p) and id(p) not in self._open:
            raise RuntimeError("a ZeRO-3 weight was accessed outside runtime.gathered(); this is a bug")

    def read_weight(self, linear: nn.Module) -> torch.Tensor:
        self._check_open(linear.weight)
        return linear.weight.detach().float().clone()

    def write_linear(self, linear: nn.Module, weight: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        w = linear.weight
        self._check_open(w)
        with torch.no_grad():
            w.data.copy_(weight.to(device=w.device, dtype=w.dtype).view(w.data.shape))
        self._modified.add(id(w))
        if keep is not None and isinstance(linear, SparseLoRALinear):
            linear.set_keep_mask(keep)

    def map_linears(self, items, compute) -> None:
        """Each rank prunes its share of the block's linears (balanced by size); then every
        result is broadcast from its rank: the new weight (storage dtype) and the packed mask."""
        if self.world_size == 1:
            return super().map_linears(items, compute)
        items = list(items)
        owners = balance([int(getattr(lin.weight, "ds_numel", lin.weight.numel())) for _, lin in items],
                         self.world_size)
        results = {}
        for i, (name, lin) in enumerate(items):
            if owners[i] == self.rank:
                results[i] = compute(name, lin)
        for i, (name, lin) in enumerate(items):
            w = lin.weight
            self._check_open(w)
            numel = w.data.numel()
            bits = torch.empty(packed_size(numel), dtype=torch.uint8, device=self.device)
            if owners[i] == self.rank:
                new_weight, keep = results.pop(i)
                if keep is None:
                    raise RuntimeError("pruner returned no mask")
                with torch.no_grad():
                    w.data.copy_(new_weight.to(device=w.device, dtype=w.dtype).view(w.data.shape))
                bits.copy_(pack_bits(keep.to(self.device)))
                del new_weight, keep
            dist.broadcast(w.data, src=owners[i])
            dist.broadcast(bits, src=owners[i])
            self._modified.add(id(w))
            if isinstance(lin, SparseLoRALinear) and lin.mask_store is self.masks:
                self.masks.set_packed(lin, bits)
            elif isinstance(lin, SparseLoRALinear):
                from .bits import unpack_bits

                lin.set_keep_mask(unpack_bits(bits, numel).view(w.data.shape))
