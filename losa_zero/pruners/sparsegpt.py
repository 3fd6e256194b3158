"""SparseGPT: prune with optimal-brain-surgeon (OBS) weight updates (Frantar & Alistarh 2023).

docs/method.md §5.3: LoSA can prune each step with SparseGPT (blocks of 128 columns, 1%
dampening) instead of Wanda; it also updates the surviving weights so that the layer's
output on the calibration set changes as little as possible.

Why it works, in short: the layer-wise loss ||W X - Ŵ X||^2 has Hessian H = 2 X X^T / N
(the same for every output row). Visiting input columns left to right, pruning or keeping
column i of every row and spreading the error (w - q) / [H^-1]_ii over the not yet visited
columns along row i of the inverse is exact OBS when the inverse Hessian is restricted to
the remaining columns; the upper Cholesky factor U of H^-1 (H^-1 = U^T U) holds exactly
those restricted rows, so one factorisation serves all columns. Updates inside a block of
columns are applied eagerly, to the columns after the block lazily in one matrix product.

Statistics are H_sum = sum_tokens x x^T and the token count: sums, so ranks all-reduce them.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..errors import LosaZeroError
from ..kernels.build import load_kernel
from .base import LinearStats, Pruner, SparsityTarget
from .masks import count_to_prune, lowest_k_keep, nm_candidates, nm_keep, row_counts_keep

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _parse_dtype(value) -> torch.dtype:
    if value in (torch.float32, torch.float64):
        return value
    if isinstance(value, str) and value.replace("torch.", "") in _DTYPES:
        return _DTYPES[value.replace("torch.", "")]
    raise LosaZeroError(f"sparsegpt: hessian_dtype must be 'float32' or 'float64', got {value!r}")


class HessianStats(LinearStats):
    """H_sum = sum over tokens of x x^T ([in, in], float32 or float64) and the token count."""

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, device)
        self.h_sum = torch.zeros(in_features, in_features, dtype=_parse_dtype(dtype), device=self._device)
        self._factor: tuple[float, Tensor, Tensor] | None = None

    def _buffers(self) -> list[str]:
        return ["h_sum"]

    def add_batch(self, x: Tensor) -> None:
        t = self._tokens(x, self.h_sum.dtype)
        self.h_sum.addmm_(t.t(), t)
        self._count += t.shape[0]

    def tensors(self) -> list[Tensor]:
        return [self.h_sum, self._count]

    def hessian(self) -> Tensor:
        """H = 2 H_sum / count, the Hessian of the mean squared layer-output error."""
        self._check_has_tokens("sparsegpt")
        if self.h_sum is None:
            raise RuntimeError("sparsegpt: these statistics were factorised and their Hessian freed; "
                               "collect new statistics to factorise with another dampening")
        return self.h_sum * (2.0 / self.count)

    def inverse_factor(self, percdamp: float, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(dead, U)``: the input columns that were always 0 (their H rows are replaced by a
        unit diagonal) and the float32 upper Cholesky factor of the dampened inverse Hessian.

        Computed once: linears reading the same input share these statistics
        (``modeling.input_groups``), so q/k/v (gate/up) factorise one Hessian, not three
        (two). The Hessian sum is freed once factorised: only the factor stays."""
        if self._factor is None or self._factor[0] != percdamp:
            h = self.hessian().to(device)
            dead = torch.nonzero(h.diagonal() == 0).squeeze(1)
            h[dead, dead] = 1.0
            u = inverse_hessian_cholesky(h, percdamp).to(torch.float32)
            del h
            self.h_sum = None
            self._factor = (percdamp, dead, u)
        return self._factor[1].to(device), self._factor[2].to(device)


def inverse_hessian_cholesky(h: Tensor, percdamp: float, retries: int = 3) -> Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = percdamp * mean(diag H).

    When a factorisation fails (H numerically singular, e.g. few tokens or collinear
    inputs) the dampening grows tenfold, up to ``retries`` times, before giving up.

    ``h`` is overwritten (its diagonal gets the dampening): at 70B a down_proj Hessian is
    3.3 GB, so no copy is made, and each intermediate is freed as soon as it is used; at
    most three n x n matrices are alive at once (H, the factor or inverse, U).
    """
    if not torch.isfinite(h).all():
        raise RuntimeError("sparsegpt: the Hessian contains NaN/Inf: the calibration activations overflowed; "
                           "check the model's inputs or accumulate with hessian_dtype='float64'")
    diag = h.diagonal().clone()
    mean_diag = diag.mean()
    frac = percdamp
    for attempt in range(retries + 1):
        h.diagonal().copy_(diag + frac * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and torch.isfinite(u).all():
                if attempt:
                    log.warning("sparsegpt: Hessian needed dampening %.3g x mean diagonal (asked %.3g)", frac, percdamp)
                return u
            del u
        frac = frac * 10 if frac > 0 else 0.01
    raise RuntimeError(
        f"sparsegpt: Cholesky of the dampened Hessian failed even with dampening {frac / 10:.3g} x mean diagonal "
        f"(asked {percdamp:g}): the calibration inputs of this linear are degenerate; use more calibration tokens, "
        "hessian_dtype='float64' or a larger percdamp")


class SparseGPTPruner(Pruner):
    """OBS pruning with weight updates, column block by column block.

    Options: ``blocksize`` (128) columns per lazy-update block; ``percdamp`` (0.01) relative
    dampening; ``hessian_dtype`` ("float32"; "float64" accumulates and factorises H in
    double, weight updates stay float32); ``rounding`` as for every pruner.
    """

    name = "sparsegpt"
    options = ("rounding", "blocksize", "percdamp", "hessian_dtype")

    def __init__(self, *, rounding: str = "nearest", blocksize: int = 128, percdamp: float = 0.01,
                 hessian_dtype="float32") -> None:
        super().__init__(rounding=rounding)
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise LosaZeroError(f"sparsegpt: blocksize must be a positive integer, got {blocksize!r}")
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < float("inf"):
            raise LosaZeroError(f"sparsegpt: percdamp must be a number >= 0 (default 0.01), got {percdamp!r}")
        self.blocksize = blocksize
        self.percdamp = float(percdamp)
        self.hessian_dtype = _parse_dtype(hessian_dtype)

    def new_stats(self, in_features: int, device: torch.device | str | None = None) -> HessianStats:
        return HessianStats(in_features, device, self.hessian_dtype)

    def _prune(self, weight: Tensor, stats, target: SparsityTarget, prev_keep: Tensor | None) -> tuple[Tensor, Tensor]:
        self._check_stats(stats, HessianStats, weight.shape[1])
        rows, cols = weight.shape
        w = weight.clone()
        # Dead inputs (always 0 on the calibration set): their weights cannot affect the
        # output there, so zero them (H gets a unit diagonal there to stay invertible).
        dead, u = stats.inverse_factor(self.percdamp, weight.device)
        w[:, dead] = 0.0

        nm = target.nm
        bs = self.blocksize
        group = nm or target.toward
        if group is not None:
            # N:M groups must not straddle blocks: round the block down to a multiple of m.
            bs = max(group[1], bs - bs % group[1])
        keep = torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
        pruned_so_far = 0
        row_counts = None
        if target.row_counts is not None:
            # Per-row counts (BESA's allocation): each row prunes its own cumulative share
            # per column block, so row r ends with exactly row_counts[r] pruned.
            # Weights pruned before (prev_keep) count toward a row's total wherever they lie,
            # so only the new prunes are spread over the blocks.
            row_counts = torch.tensor(target.row_counts, dtype=torch.int64, device=weight.device)
            prev_rows = torch.zeros_like(row_counts) if prev_keep is None else (~prev_keep).sum(1)
            new_rows = (row_counts - prev_rows).clamp_min(0)
            new_so_far = torch.zeros_like(row_counts)
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            width = i2 - i1
            w1 = w[:, i1:i2]  # a view: the column loop updates the block in place
            u1 = u[i1:i2, i1:i2]
            d = u1.diagonal()
            prev1 = None if prev_keep is None else prev_keep[:, i1:i2]
            if row_counts is not None:
                prev_here = torch.zeros_like(row_counts) if prev1 is None else (~prev1).sum(1)
                k_new = ((new_rows * i2 + cols // 2) // cols - new_so_far).clamp_min(0)
                k_new = torch.minimum(k_new, width - prev_here)
                keep1 = row_counts_keep(w1.square() / d.square()[None, :], prev_here + k_new, prev1)
                new_so_far += k_new
            elif nm is None:
                # Unstructured: select jointly over the block by OBS saliency w^2 / [H^-1]_ii^2.
                if self.rounding == "floor":
                    k = int(rows * width * target.rate)
                else:
                    # Cumulative nearest counts: blocks sum to exactly round(rate * numel),
                    # and a block that already lost more (prev_keep) lets later blocks prune
                    # less, so the layer stays as close to its rate as possible (§5.3).
                    k = count_to_prune(target.rate, rows * i2) - pruned_so_far
                sal = w1.square() / d.square()[None, :]
                if target.toward is not None:
                    # A step toward N:M: only the m - n lowest of every group may go.
                    allowed = nm_candidates(sal, target.toward[0], target.toward[1], prev1)
                    sal = sal.masked_fill(~allowed, float("inf"))
                    k = min(k, int(allowed.sum()))
                keep1 = lowest_k_keep(sal, k, prev1)
                pruned_so_far += int((~keep1).sum())
            else:
                keep1 = torch.ones(rows, width, dtype=torch.bool, device=weight.device)
            err1 = torch.empty(rows, width, dtype=w.dtype, device=w.device)
            column_loop(w1, u1, keep1, err1, nm, prev1)  # N:M: the groups are chosen into keep1
            w1.masked_fill_(~keep1, 0.0)
            keep[:, i1:i2] = keep1
            if i2 < cols:
                w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
        w.masked_fill_(~keep, 0.0)  # exact zeros (they are already; guards -0.0/rounding)
        return w, keep


def column_loop(w1: Tensor, u1: Tensor, keep1: Tensor, err1: Tensor, nm: tuple[int, int] | None,
                prev1: Tensor | None) -> None:
    """SparseGPT's column loop over one block of columns, in place: ``w1`` [rows, width] (a
    view of the weight) is updated, ``keep1`` is the block's keep mask (chosen beforehand;
    for N:M chosen here, group by group), ``err1`` receives each column's error
    (w - q) / [H^-1]_ii; ``u1`` is the block's [width, width] part of U.

    On CPU the compiled loop (``losa_zero/kernels/sparsegpt_block.cpp``) runs it when the
    kernels are built: the same operations with the same rounding, row by row, without a
    tensor call per column. Elsewhere, or without a compiler, :func:`column_loop_torch`."""
    kernel = load_kernel() if w1.device.type == "cpu" else None
    if kernel is None:
        column_loop_torch(w1, u1, keep1, err1, nm, prev1)
        return
    n, m = nm if nm is not None else (0, 0)
    kernel.sparsegpt_block(w1, u1.contiguous(), keep1, err1, n, m, prev1)


def column_loop_torch(w1: Tensor, u1: Tensor, keep1: Tensor, err1: Tensor, nm: tuple[int, int] | None,
                      prev1: Tensor | None) -> None:
    """:func:`column_loop` as torch operations (GPU, or CPU without the compiled kernels).

    It works on the block transposed (one row per input column, contiguous), so that every
    step reads and updates whole rows."""
    wt = w1.t().contiguous()
    keept = keep1.t().contiguous()
    prevt = None if prev1 is None else prev1.t().contiguous()
    errt = torch.empty_like(wt)
    d = u1.diagonal()
    width = wt.shape[0]
    for i in range(width):
        if nm is not None and i % nm[1] == 0:
            # N:M: choose each group on the weights as updated so far (by the columns before
            # it), which is what makes SparseGPT's N:M masks adaptive.
            g = slice(i, i + nm[1])
            sal = wt[g].t().square() / d[g].square()[None, :]
            keept[g] = nm_keep(sal, nm[0], nm[1], None if prevt is None else prevt[g].t()).t()
        # Column i's error (w - q) / [H^-1]_ii with q = w where kept, 0 where pruned: exactly
        # w / d on pruned weights and +0 on kept ones. Column i itself is final from here on
        # (it becomes q), so only the columns after it are updated.
        torch.div(wt[i].masked_fill(keept[i], 0.0), d[i], out=errt[i])
        if i + 1 < width:
            # A rank-1 matmul (k = 1: each entry is one exact product, the same values as the
            # broadcast multiply) is faster than the broadcast on CPU (BENCHMARKS.md). Not a fused
            # multiply-add (addr_): torch rounds that once in its vector body and twice in the tail.
            wt[i + 1:].sub_(u1[i, i + 1:].unsqueeze(1) @ errt[i].unsqueeze(0))
    w1.copy_(wt.t())
    keep1.copy_(keept.t())
    err1.copy_(errt.t())
