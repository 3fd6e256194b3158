"""Mask selection shared by the pruners: turn scores into keep masks with exact counts.

Why a module of its own: every algorithm differs only in its score; how many weights are
pruned, in which comparison group, how ties break and how earlier pruning is respected must
be identical everywhere, and deterministic so that every rank computes the same mask.

Conventions: ``score`` is "importance", higher = keep; the lowest scores are pruned. Ties
break by index: among equal scores the lower index is pruned first (what a stable ascending
sort gives). No selection sorts: a k-th value threshold (``torch.kthvalue``, linear time)
prunes everything below it and the first of the entries equal to it, by index, as needed.
N:M groups of m entries are sorted (m is a small constant).
Entries outside ``prev_keep`` get score -inf, so they are always the first pruned and count
toward the target (docs/method.md §5.3, "pruned weights never come back"); any of them beyond
the target stay pruned too.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import LosaZeroError
from .base import ROUNDING_MODES, SparsityTarget, check_nm_width

# Select over at most this many scores at once: bounds the temporary buffers on 70B-wide linears.
_CHUNK_ELEMS = 1 << 24


def count_to_prune(rate: float, numel: int) -> int:
    """round(rate * numel), halves rounded up; the nearest count to the rate (§5.3).

    A tolerance far above float64 noise but far below 0.5 keeps exact halves (like
    0.3 * 5) from flipping because ``rate`` is not exactly representable.
    """
    k = math.floor(rate * numel + 0.5 + 1e-12 * numel)
    return min(max(k, 0), numel)


def _masked_score(score: Tensor, prev_keep: Tensor | None) -> Tensor:
    if prev_keep is None:
        return score
    return score.masked_fill(~prev_keep, float("-inf"))


def _row_chunk(rows: int, width: int) -> int:
    return max(1, min(rows, _CHUNK_ELEMS // max(1, width)))


def _prune_lowest(s: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` lowest entries of every row of ``s`` (ties: lower column first),
    without sorting: the k-th smallest value per row is the threshold, every entry below it
    is pruned, and of the entries equal to it the first ones by column, as many as needed."""
    rows, cols = s.shape
    if k <= 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=s.device)
    if k >= cols:
        return torch.ones(rows, cols, dtype=torch.bool, device=s.device)
    t = torch.kthvalue(s, k, dim=1, keepdim=True).values
    prune = s < t
    eq = s == t
    need = k - prune.sum(1, keepdim=True)
    ties = eq.sum(1, keepdim=True) > need  # rows where some entries equal to t must stay
    if bool(ties.any()):
        r = ties.squeeze(1).nonzero().squeeze(1)
        first = eq[r].to(torch.int32).cumsum(1, dtype=torch.int32) <= need[r].to(torch.int32)
        eq[r] &= first
    return prune.logical_or_(eq)


def rowwise_keep(score: Tensor, rate: float, prev_keep: Tensor | None = None, rounding: str = "nearest") -> Tensor:
    """Keep mask pruning the lowest scores of every row (Wanda's per-output comparison group).

    ``nearest``: exactly ``round(rate * numel)`` pruned in total, each row floor or ceil of
    the per-row share; the rows that take one more are those whose next candidate (the
    (q+1)-th lowest score) is smallest, i.e. the cheapest extra prunes, ties by row index.
    ``floor``: ``int(in_features * rate)`` per row, as the released code.
    Rows that already lost more (prev_keep) than their share keep all those pruned.
    """
    if rounding not in ROUNDING_MODES:
        raise LosaZeroError(f"unknown rounding {rounding!r}: use 'nearest' or 'floor'")
    rows, cols = score.shape
    s = _masked_score(score, prev_keep)
    chunk = _row_chunk(rows, cols)
    if rounding == "floor":
        per_row = torch.full((rows,), int(cols * rate), dtype=torch.int64, device=score.device)
    else:
        q, rem = divmod(count_to_prune(rate, rows * cols), rows)
        per_row = torch.full((rows,), q, dtype=torch.int64, device=score.device)
        if rem:
            # q < cols here, since the total is < numel whenever rem > 0.
            nxt = torch.cat([torch.kthvalue(s[a:a + chunk], q + 1, dim=1).values for a in range(0, rows, chunk)])
            order = torch.sort(nxt, stable=True).indices
            per_row[order[:rem]] += 1
    keep = torch.empty(rows, cols, dtype=torch.bool, device=score.device)
    counts = per_row.unique().tolist()  # one count (floor) or two (nearest: q and q + 1)
    for a in range(0, rows, chunk):
        part, want = s[a:a + chunk], per_row[a:a + chunk]
        if len(counts) == 1:
            keep[a:a + chunk] = ~_prune_lowest(part, counts[0])
            continue
        for c in counts:
            sel = (want == c).nonzero().squeeze(1)
            if sel.numel():
                keep[a + sel] = ~_prune_lowest(part[sel], c)
    if prev_keep is not None:
        keep &= prev_keep
    return keep


def nm_keep(score: Tensor, n: int, m: int, prev_keep: Tensor | None = None) -> Tensor:
    """Keep mask with the ``n`` highest scores of every group of ``m`` consecutive columns
    kept (exactly ``n`` per group; fewer where prev_keep already pruned more). A stable sort
    of each group of m entries: with m a small constant that is linear in the width."""
    rows, cols = score.shape
    check_nm_width(cols, n, m)
    s = _masked_score(score, prev_keep).reshape(rows, cols // m, m)
    keep_sorted = (torch.arange(m, device=score.device) >= m - n).expand(cols // m, m)
    keep = torch.empty(rows, cols // m, m, dtype=torch.bool, device=score.device)
    chunk = _row_chunk(rows, cols)
    for a in range(0, rows, chunk):
        idx = torch.sort(s[a:a + chunk], dim=2, stable=True).indices
        keep[a:a + chunk].scatter_(2, idx, keep_sorted.expand(idx.shape[0], -1, -1))
    keep = keep.reshape(rows, cols)
    if prev_keep is not None:
        keep &= prev_keep
    return keep


def nm_candidates(score: Tensor, n: int, m: int, prev_keep: Tensor | None = None) -> Tensor:
    """True where a weight may still be pruned without any group of ``m`` consecutive
    columns keeping fewer than ``n``: the ``m - n`` lowest scores of every group (entries
    outside prev_keep first, as the lowest)."""
    return ~nm_keep(score, n, m, prev_keep)


def toward_nm_keep(score: Tensor, rate: float, n: int, m: int, prev_keep: Tensor | None = None,
                   rounding: str = "nearest") -> Tensor:
    """Per-row unstructured selection (:func:`rowwise_keep`) restricted to the
    :func:`nm_candidates`: each row loses its share of ``rate`` among its lowest scores, but
    no group of ``m`` loses more than ``m - n``, so an exact n:m mask can follow later
    without reviving a pruned weight."""
    allowed = nm_candidates(score, n, m, prev_keep)
    return rowwise_keep(score.masked_fill(~allowed, float("inf")), rate, prev_keep, rounding)


def lowest_k_keep(score: Tensor, k: int, prev_keep: Tensor | None = None) -> Tensor:
    """Keep mask pruning the ``k`` lowest scores jointly over the whole tensor (ties by
    row-major index), plus everything outside ``prev_keep``."""
    flat = _masked_score(score, prev_keep).reshape(1, -1)
    k = min(max(int(k), 0), flat.numel())
    keep = ~_prune_lowest(flat, k).reshape(score.shape)
    if prev_keep is not None:
        keep &= prev_keep
    return keep


def row_counts_keep(score: Tensor, counts: Tensor, prev_keep: Tensor | None = None) -> Tensor:
    """Keep mask pruning the ``counts[r]`` lowest scores of every row ``r`` (ties by index);
    entries outside ``prev_keep`` rank lowest, and a row that already lost more keeps them
    all pruned. This is BESA's hard mask (docs/method.md §9.5)."""
    rows, cols = score.shape
    counts = torch.as_tensor(counts, device=score.device).reshape(-1).to(torch.int64)
    if counts.numel() != rows:
        raise ValueError(f"row_counts_keep: {counts.numel()} counts for {rows} rows")
    s = _masked_score(score, prev_keep)
    chunk = _row_chunk(rows, cols)
    ranks = torch.arange(cols, device=score.device)
    keep = torch.empty(rows, cols, dtype=torch.bool, device=score.device)
    for a in range(0, rows, chunk):
        idx = torch.sort(s[a:a + chunk], dim=1, stable=True).indices
        keep[a:a + chunk].scatter_(1, idx, ranks[None, :] >= counts[a:a + chunk, None])
    if prev_keep is not None:
        keep &= prev_keep
    return keep


def select_keep(score: Tensor, target: SparsityTarget, prev_keep: Tensor | None = None,
                rounding: str = "nearest") -> Tensor:
    """Keep mask for ``target``: N:M groups, per-row counts (BESA), or per-row comparison
    for unstructured rates (restricted to the N:M candidates for a step toward N:M)."""
    if target.nm is not None:
        return nm_keep(score, target.nm[0], target.nm[1], prev_keep)
    if target.row_counts is not None:
        return row_counts_keep(score, torch.tensor(target.row_counts, dtype=torch.int64), prev_keep)
    if target.toward is not None:
        return toward_nm_keep(score, target.rate, target.toward[0], target.toward[1], prev_keep, rounding)
    return rowwise_keep(score, target.rate, prev_keep, rounding)


def realised_sparsity(keep: Tensor) -> float:
    """Fraction of weights pruned by a keep mask (the value reports should show)."""
    return 1.0 - keep.sum().item() / keep.numel()


def satisfies_nm(keep: Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive columns keeps at most ``n`` weights."""
    rows, cols = keep.shape
    if cols % m:
        return False
    return bool((keep.reshape(rows, cols // m, m).sum(-1) <= n).all())
