"""The narrow interface between the algorithms and where the weights live.

Every pruning, calibration and merging loop in losa-zero touches weights only through a
:class:`Runtime`: gather one block, read a linear's full weight, write a new weight and
keep-mask, all-reduce statistics, know which calibration samples this process holds. The
single-process implementation here is trivial; the ZeRO-3 implementation gathers a block's
shards, writes each rank's slice of the pruned weight into its own shard and keeps the
mask partitioned the same way. The algorithms are the same code in both cases, which is
what makes "same answer on 1 rank or many" testable.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterable, Iterator

import torch
from torch import nn

from .errors import LosaZeroError
from .lora import SparseLoRALinear
from .modeling import decoder_layers, layer_linears, linear_full_name

log = logging.getLogger("losa_zero")


def resolve_device(name: str) -> torch.device:
    """The torch device of ``--device``: auto (cuda when available), cpu, cuda[:N]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LosaZeroError(f"unknown --device {name!r}: use auto, cpu or cuda[:N]") from None


def check_device(name: str) -> None:
    """``--device`` checked before any work: a known device, and a CUDA one only where this
    torch sees it."""
    device = resolve_device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LosaZeroError(f"--device {name}: this torch sees no CUDA device (torch.cuda.is_available() is "
                                "False): use --device cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= count:
            raise LosaZeroError(f"--device {name}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")


class Runtime:
    """One process, weights fully materialised on ``device``."""

    rank: int = 0
    world_size: int = 1
    #: A statistics forward may stop once the last input it needs is recorded
    #: (blockwise.collect_input_stats). Not under ZeRO-3, whose module hooks follow the order
    #: in which submodules run and would see a forward cut short.
    stop_after_inputs: bool = True

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops on one process) ------------------------------------------------
    def all_reduce_sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum ``tensors`` in place over all ranks."""

    def barrier(self) -> None:
        """Wait for every rank."""

    def all_gather_object(self, obj) -> list:
        """``obj`` of every rank, in rank order (picklable objects)."""
        return [obj]

    def local_indices(self, n: int) -> list[int]:
        """Which of the ``n`` calibration sequences this rank processes (all of them here)."""
        return list(range(n))

    def gram(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """The n x n Gram matrix X X^T (float64) of the calibration sequences' flattened
        features (LoSA's CKA, docs/method.md section 2). ``rows`` are this rank's sequences; on
        one process that is all ``n`` of them. Accumulated over feature slices so no
        float64 copy of the whole activation is made."""
        k = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, rows.shape[1], 1 << 20):
            part = rows[:, start:start + (1 << 20)].to(torch.float64)
            k += (part @ part.t()).cpu()
        return k

    # -- statistics and stored activations ---------------------------------------------------
    def new_stats(self, pruner, in_features: int):
        """Fresh input statistics of one linear for ``pruner`` (None when it needs none)."""
        return pruner.new_stats(in_features, device=self.device)

    def keep_activation(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Hold on to a tensor that lives across LoSA steps (the dense targets D_l): in host
        memory, never on an accelerator (at 7B the targets of 128 x 2048 calibration tokens
        are about 69 GB in bf16); the error measurement brings one calibration batch at a
        time to the device. The ZeRO-3 runtime writes them to the checkpoint folder instead
        and returns a memory-mapped view, so a resumed run finds them and host memory does
        not hold them."""
        return hidden if hidden.device.type == "cpu" else hidden.to("cpu")

    # -- weights ----------------------------------------------------------------------------
    #: merge_and_unwrap puts plain nn.Linear modules back after the final merge. Under ZeRO-3
    #: the adapted layers stay (at rank 0 they are exactly the base linear): replacing a
    #: module would detach it from DeepSpeed's parameter hooks.
    unwrap_after_merge: bool = True

    def adapter_init(self, model: nn.Module):
        """Context in which the sparse-LoRA factors of ``model`` are created (ZeRO-3:
        partitioned at birth)."""
        return contextlib.nullcontext()

    def map_linears(self, items, compute) -> None:
        """Store ``compute(name, linear) -> (weight, keep)`` for every ``(name, linear)`` of a
        gathered block with :meth:`write_linear`. The linears are independent (a block's
        statistics are taken before any of them is pruned), so the ZeRO-3 runtime shares them
        out: each rank computes its share, and the results are exchanged."""
        for name, lin in items:
            weight, keep = compute(name, lin)
            self.write_linear(lin, weight, keep)
            del weight, keep

    @contextlib.contextmanager
    def gathered(self, module: nn.Module) -> Iterator[None]:
        """Make ``module``'s full parameters readable (and writable) inside the block."""
        yield

    @contextlib.contextmanager
    def gathered_params(self, params, linears=()) -> Iterator[None]:
        """Make ``params`` readable inside the block (they always are here)."""
        yield

    def read_weight(self, linear: nn.Module) -> torch.Tensor:
        """The full weight as a float32 copy (algorithms work in fp32 whatever the storage)."""
        return linear.weight.detach().float().clone()

    def write_linear(self, linear: nn.Module, weight: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Store a new full weight (cast to the storage dtype) and, for sparse-LoRA layers, its mask."""
        with torch.no_grad():
            linear.weight.copy_(weight.to(linear.weight.dtype))
        if keep is not None and isinstance(linear, SparseLoRALinear):
            linear.set_keep_mask(keep)

    def count_pruned(self, linear: nn.Module) -> tuple[int, int]:
        """(pruned entries, total entries) of a linear: from its mask, else from zero weights."""
        keep = linear.keep_mask() if isinstance(linear, SparseLoRALinear) else None
        if keep is not None:
            return int((~keep).sum()), keep.numel()
        w = linear.weight
        return int((w == 0).sum()), w.numel()

    def sparsity_report(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        """Realised sparsity of the target linears: global and per linear (full names)."""
        per_linear, pruned_total, total = {}, 0, 0
        for l, layer in enumerate(decoder_layers(model)):
            with self.gathered(layer):
                for name, lin in layer_linears(layer).items():
                    p, t = self.count_pruned(lin)
                    per_linear[linear_full_name(model, l, name)] = p / t
                    pruned_total += p
                    total += t
        return pruned_total / total, per_linear

    # -- user feedback ----------------------------------------------------------------------
    def progress(self, iterable, **kwargs):
        """A tqdm bar on rank 0 only. In a non-interactive log (CI, a SLURM output file) a
        bar appears only for loops longer than 30 s and refreshes every 30 s, instead of
        flooding the file; the per-step log lines carry the rest. None with ``-q`` (the
        ``losa_zero`` logger above INFO)."""
        if not self.is_main or not logging.getLogger("losa_zero").isEnabledFor(logging.INFO):
            return iterable
        from tqdm.auto import tqdm

        if not sys.stderr.isatty():
            kwargs.setdefault("mininterval", 30.0)
            kwargs.setdefault("delay", 30.0)
        kwargs.setdefault("leave", False)
        return tqdm(iterable, **kwargs)

    def info(self, msg: str) -> None:
        if self.is_main:
            log.info(msg)

