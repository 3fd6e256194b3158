"""The one interface every pruning algorithm implements.

Why this shape: the block loop (``losa_zero.blockwise``) must run the same code for every
algorithm on one process and under DeepSpeed ZeRO-3 on many ranks. So a pruner is split in
two parts that never touch a model or a process group:

* :class:`LinearStats` accumulates statistics of one linear's *input* activations as plain
  sums. Sums over tokens are what ranks can all-reduce: the caller sums
  :meth:`LinearStats.tensors` in place across ranks and every rank then holds the statistics
  of the whole calibration set.
* :meth:`Pruner.prune` is pure tensor math on the gathered weight and the reduced
  statistics. Every rank gets the same inputs, so every rank computes the same mask (all
  selections are deterministic: stable sorts, ties broken by index).

Masks are KEEP masks (bool, True = the weight survives), shaped like the weight
``[out_features, in_features]``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import LosaZeroError

ROUNDING_MODES = ("nearest", "floor")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nm_pair(pattern) -> tuple[int, int]:
    """``(n, m)`` validated: integers with 1 <= n <= m."""
    try:
        n, m = pattern
    except (TypeError, ValueError):
        raise LosaZeroError(f"N:M pattern must be a pair (n_keep, m), got {pattern!r}") from None
    if not (_is_int(n) and _is_int(m)) or m < 1 or not 1 <= n <= m:
        raise LosaZeroError(f"N:M pattern {n}:{m} is invalid: need integers 1 <= n <= m (e.g. 2:4)")
    return n, m


@dataclass(frozen=True)
class SparsityTarget:
    """What one linear must reach.

    ``rate`` is the fraction of weights pruned, in [0, 1). ``nm = (n_keep, m)`` asks for at
    most ``n_keep`` kept weights in every group of ``m`` consecutive input columns; its rate
    is derived (``1 - n/m``) so that reports treat both kinds alike. Build targets with
    :meth:`unstructured`, :meth:`nm_pattern`, :meth:`toward_nm` or :meth:`per_row`; direct
    construction is validated too.
    """

    rate: float
    nm: tuple[int, int] | None = None
    #: per-row pruned counts (BESA's row-wise allocation, see :meth:`per_row`); ``row_width``
    #: is the linear's in_features they refer to.
    row_counts: tuple[int, ...] | None = None
    row_width: int | None = None
    #: ``(n, m)``: an unstructured ``rate`` that never prunes more than ``m - n`` weights of
    #: any group of ``m`` consecutive input columns, so a later step can still reach exactly
    #: n:m without bringing a pruned weight back (LoSA's progressive steps toward N:M); see
    #: :meth:`toward_nm`.
    toward: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.row_counts is not None or self.row_width is not None:
            self._init_per_row()
            return
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
            raise LosaZeroError(f"sparsity rate must be a number in [0, 1), got {rate!r}")
        if not 0.0 <= rate < 1.0:
            raise LosaZeroError(
                f"sparsity rate must be in [0, 1) (fraction pruned), got {rate}: pass e.g. 0.5 for 50%")
        if self.nm is not None and self.toward is not None:
            raise LosaZeroError("a target is either an N:M pattern or a step toward one, not both")
        if self.nm is not None:
            n, m = _nm_pair(self.nm)
            derived = 1.0 - n / m
            if abs(rate - derived) > 1e-9:
                raise LosaZeroError(
                    f"N:M {n}:{m} prunes {derived:g} of the weights, not {rate:g}: use SparsityTarget.nm_pattern({n}, {m})")
            object.__setattr__(self, "nm", (n, m))
            rate = derived
        elif self.toward is not None:
            n, m = _nm_pair(self.toward)
            if rate > 1.0 - n / m + 1e-12:
                raise LosaZeroError(f"a step toward N:M {n}:{m} can prune at most {1 - n / m:g} of the weights, "
                                    f"got rate {rate:g}")
            object.__setattr__(self, "toward", (n, m))
            rate = min(rate, 1.0 - n / m)
        object.__setattr__(self, "rate", float(rate))

    def _init_per_row(self) -> None:
        if self.nm is not None or self.toward is not None:
            raise LosaZeroError("a per-row target cannot also be an N:M pattern or a step toward one")
        width, counts = self.row_width, self.row_counts
        if not _is_int(width) or width < 1 or counts is None:
            raise LosaZeroError(f"per-row target needs row_counts and a positive row_width, got {width!r}")
        counts = tuple(counts)
        if not counts or not all(_is_int(c) and 0 <= c <= width for c in counts):
            raise LosaZeroError(f"per-row pruned counts must be integers in [0, {width}]")
        derived = sum(counts) / (len(counts) * width)
        if isinstance(self.rate, (int, float)) and not isinstance(self.rate, bool) and abs(self.rate - derived) > 1e-9:
            raise LosaZeroError(f"per-row counts prune {derived:g} of the weights, not {self.rate:g}: "
                                "use SparsityTarget.per_row(counts, in_features)")
        object.__setattr__(self, "row_counts", counts)
        # The derived rate may be 1.0 here (a learned allocation may drop a whole linear).
        object.__setattr__(self, "rate", float(derived))

    @classmethod
    def per_row(cls, counts, in_features: int) -> "SparsityTarget":
        """Prune exactly ``counts[r]`` weights of row ``r`` (lowest scores of the row), e.g.
        BESA's learned row-wise allocation. ``counts`` is a sequence of ints or an integer
        tensor with one entry per output row."""
        if isinstance(counts, Tensor):
            counts = counts.detach().reshape(-1).cpu().tolist()
        counts = tuple(int(c) for c in counts)
        if not _is_int(in_features) or in_features < 1 or not counts:
            raise LosaZeroError(f"per-row target needs counts and in_features >= 1, got {in_features!r}")
        return cls(sum(counts) / (len(counts) * in_features), None, counts, in_features)

    @property
    def is_per_row(self) -> bool:
        return self.row_counts is not None

    @classmethod
    def unstructured(cls, rate: float) -> "SparsityTarget":
        """Prune the fraction ``rate`` of the linear's weights, anywhere."""
        return cls(rate)

    @classmethod
    def nm_pattern(cls, n: int, m: int) -> "SparsityTarget":
        """Keep at most ``n`` weights in every ``m`` consecutive input columns (2:4 = 50%)."""
        n, m = _nm_pair((n, m))
        return cls(1.0 - n / m, (n, m))

    @classmethod
    def toward_nm(cls, rate: float, n: int, m: int) -> "SparsityTarget":
        """Prune the fraction ``rate`` of the linear's weights (per row, like
        :meth:`unstructured`) but at most ``m - n`` in any group of ``m`` consecutive input
        columns: every group still holds ``n`` survivors, so a later n:m step completes the
        pattern exactly (``rate`` <= 1 - n/m)."""
        return cls(rate, None, None, None, (n, m))

    @property
    def is_nm(self) -> bool:
        return self.nm is not None

    def describe(self) -> str:
        """Short label for logs and reports: ``"2:4"`` or ``"70.00%"``."""
        if self.nm is not None:
            return f"{self.nm[0]}:{self.nm[1]}"
        if self.row_counts is not None:
            return f"per-row {100 * self.rate:.2f}%"
        if self.toward is not None:
            return f"{100 * self.rate:.2f}% toward {self.toward[0]}:{self.toward[1]}"
        return f"{100 * self.rate:.2f}%"


def check_nm_width(in_features: int, n: int, m: int, name: str | None = None) -> None:
    """Raise a user error when N:M groups cannot tile the input width."""
    if in_features % m:
        fits = "use 2:4 or unstructured" if in_features % 4 == 0 and m != 4 else "use unstructured"
        raise LosaZeroError(
            f"N:M {n}:{m} needs input width divisible by {m}; {name or 'this linear'} has {in_features} inputs: {fits}")


class LinearStats(ABC):
    """Statistics of one linear's input activations, kept as sums so ranks can all-reduce them.

    ``device=None`` lets the buffers follow the data: they start (zero) on the CPU and move
    to the device of the first batch. Pass the compute device explicitly when every rank
    must hold its buffers on the communication device even if it sees no batch at all.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if not _is_int(in_features) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self._follow_data = device is None
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._count = torch.zeros(1, dtype=torch.int64, device=self._device)
        self._narrowed: dict[str, torch.dtype] = {}

    @abstractmethod
    def add_batch(self, x: Tensor) -> None:
        """Accumulate a batch of inputs ``x`` of shape ``[..., in_features]`` (any dtype)."""

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The sum tensors, in a fixed order, token count last. They are the live buffers:
        the caller all-reduces (sums) them in place."""

    @abstractmethod
    def _buffers(self) -> list[str]:
        """Attribute names of the sum buffers (for :meth:`to`)."""

    def widen_vector_sums(self) -> "LinearStats":
        """Accumulate the per-column sum vectors in float64 from now on (call before the
        first batch). Each batch's float32 sum is the same however the batches are split
        between ranks, and their float64 total is then the same too, so the statistic (and
        the mask) does not depend on the number of ranks. :meth:`reduced` rounds back."""
        for attr in self._buffers():
            t = getattr(self, attr)
            if t.dim() == 1 and t.is_floating_point() and t.dtype != torch.float64:
                self._narrowed[attr] = t.dtype
                setattr(self, attr, t.to(torch.float64))
        return self

    def reduced(self) -> None:
        """Called once the sums hold the whole calibration set (after the all-reduce):
        vectors widened by :meth:`widen_vector_sums` go back to their own dtype, so the
        pruner scores in its usual precision."""
        for attr, dtype in self._narrowed.items():
            setattr(self, attr, getattr(self, attr).to(dtype))
        self._narrowed = {}

    @property
    def count(self) -> int:
        """Number of tokens accumulated (after the all-reduce: over all ranks)."""
        return int(self._count.item())

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> "LinearStats":
        """Move the buffers (in place) to ``device`` and pin them there."""
        device = torch.device(device)
        for attr in self._buffers() + ["_count"]:
            t = getattr(self, attr)
            if t is not None:  # a buffer freed once it was used (SparseGPT's factorised Hessian)
                setattr(self, attr, t.to(device))
        self._device = device
        self._follow_data = False
        return self

    def _tokens(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``x`` as a ``[tokens, in_features]`` matrix of ``dtype`` on the buffers' device,
        moving the (still empty) buffers to the data on the first batch if asked to."""
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected inputs of shape [..., {self.in_features}], got {shape}")
        if self._follow_data:
            if x.device != self._device:
                self.to(x.device)
            self._follow_data = False
        return x.detach().reshape(-1, self.in_features).to(device=self._device, dtype=dtype)

    def _check_has_tokens(self, algorithm: str) -> None:
        if self.count <= 0:
            raise LosaZeroError(
                f"{algorithm}: no calibration tokens reached this linear (token count 0): "
                "give it calibration data (and all-reduce its statistics before pruning)")


class Pruner(ABC):
    """One pruning algorithm (llm-compressor "modifier" style).

    Subclasses implement :meth:`_prune`; :meth:`prune` validates inputs once for all of them.
    ``rounding`` chooses how a rate becomes a count of pruned weights (docs/method.md §5.3):
    ``"nearest"`` (default) prunes exactly ``round(rate * numel)`` weights per linear, so the
    realised sparsity is as close as possible to the rate; ``"floor"`` reproduces the
    released code's ``int(in_features * rate)`` per row (it under-prunes narrow layers).
    """

    name: ClassVar[str] = ""
    #: whether it scores weights with calibration statistics (LoSA's step pruner must: the
    #: released method prunes the merged weights with Wanda or SparseGPT)
    calibrated: ClassVar[bool] = True
    #: constructor options accepted by :func:`losa_zero.pruners.get_pruner`
    options: ClassVar[tuple[str, ...]] = ("rounding",)

    def __init__(self, *, rounding: str = "nearest") -> None:
        if rounding not in ROUNDING_MODES:
            raise LosaZeroError(f"{self.name}: unknown rounding {rounding!r}: use 'nearest' or 'floor'")
        self.rounding = rounding

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options)
        return f"{type(self).__name__}({opts})"

    def new_stats(self, in_features: int, device: torch.device | str | None = None) -> LinearStats | None:
        """Fresh statistics for one linear with ``in_features`` inputs (None: none needed)."""
        return None

    def prune(
        self,
        weight: Tensor,
        stats: LinearStats | None,
        target: SparsityTarget,
        prev_keep: Tensor | None = None,
        *,
        name: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Prune ``weight`` ([out, in]) to ``target``.

        Returns ``(new_weight, keep)``: a new tensor (same dtype and device as ``weight``)
        with pruned entries exactly 0 (SparseGPT also updates the survivors), and the bool
        keep mask. ``prev_keep`` marks weights that survived earlier pruning: everything
        outside it is pruned again and counts toward the target ("pruned weights never come
        back", docs/method.md §5.3); where a row/group already has more pruned than the target
        asks, all stay pruned. ``name`` only improves error messages.
        """
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            got = (f"{weight.dtype} tensor of shape {tuple(weight.shape)}" if isinstance(weight, Tensor)
                   else type(weight).__name__)
            raise ValueError(f"{self.name}: weight must be a 2-D floating tensor [out, in], got {got}")
        if weight.numel() == 0:
            raise ValueError(f"{self.name}: weight {name or ''} is empty")
        if not isinstance(target, SparsityTarget):
            raise TypeError(f"{self.name}: target must be a SparsityTarget, got {type(target).__name__}")
        rows, cols = weight.shape
        if prev_keep is not None:
            is_tensor = isinstance(prev_keep, Tensor)
            if not is_tensor or prev_keep.dtype != torch.bool or tuple(prev_keep.shape) != (rows, cols):
                got = f"{prev_keep.dtype} {tuple(prev_keep.shape)}" if is_tensor else type(prev_keep).__name__
                raise ValueError(f"{self.name}: prev_keep must be a bool tensor of shape {(rows, cols)}, got {got}")
            prev_keep = prev_keep.to(weight.device)
            if bool(prev_keep.all()):
                prev_keep = None
        if target.row_counts is not None and (len(target.row_counts) != rows or target.row_width != cols):
            raise ValueError(f"{self.name}: per-row target is for [{len(target.row_counts)}, {target.row_width}] "
                             f"but weight {name or ''} is [{rows}, {cols}]")
        for pattern in (target.nm, target.toward):
            if pattern is not None:
                check_nm_width(cols, pattern[0], pattern[1], name)
        if not torch.isfinite(weight).all():
            raise ValueError(f"{self.name}: weight {name or ''} contains NaN or Inf; cannot prune it")
        if target.rate == 0.0 and prev_keep is None:
            # Nothing to prune: identity (SparseGPT would otherwise still touch dead columns).
            return weight.detach().clone(), torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
        w32 = weight.detach().to(torch.float32)
        new_weight, keep = self._prune(w32, stats, target, prev_keep)
        return new_weight.to(weight.dtype), keep

    @abstractmethod
    def _prune(self, weight: Tensor, stats: LinearStats | None, target: SparsityTarget,
               prev_keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """Algorithm body: ``weight`` is float32 (never modify it in place), inputs validated,
        ``prev_keep`` is None when nothing was pruned before."""

    def _check_stats(self, stats, cls: type, in_features: int) -> None:
        if not isinstance(stats, cls):
            raise TypeError(f"{self.name}: expected {cls.__name__} from new_stats(), got {type(stats).__name__}")
        if stats.in_features != in_features:
            raise ValueError(
                f"{self.name}: statistics are for {stats.in_features} inputs but the weight has {in_features}")
        stats._check_has_tokens(self.name)
