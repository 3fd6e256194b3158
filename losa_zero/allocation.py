"""LoSA's allocations: layer importance, layer-wise sparsity rates, schedules and ranks.

Pure math on small tensors and lists (docs/method.md §2-§5); the block loop gathers the
activations and all-reduces the sums. Everything here is deterministic (stable ties by
layer index) so every rank computes the same allocation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import LosaZeroError

# Feature columns converted to float64 at once in gram(): bounds the temporary copy.
_GRAM_CHUNK_ELEMS = 1 << 24


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _as_floats(values, what: str) -> list[float]:
    if isinstance(values, Tensor):
        values = values.detach().reshape(-1).tolist()
    out = [float(v) for v in values]
    if not out:
        raise LosaZeroError(f"{what} is empty: need at least one layer")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} contains NaN or Inf: {out}")
    return out


# --- §2: layer importance from representation mutual information (linear CKA) ----------

def gram(x: Tensor) -> Tensor:
    """Gram matrix X X^T (float64, [n, n]) of ``n`` samples, each flattened to one row.

    Partial Grams over slices of the feature dimension add up to the full one, which is
    how ranks holding different feature slices combine them (docs/method.md §2).
    """
    if x.dim() < 2:
        raise ValueError(f"gram expects [n, features...], got shape {tuple(x.shape)}")
    x = x.detach().reshape(x.shape[0], -1)
    n, f = x.shape
    k = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    step = max(1, _GRAM_CHUNK_ELEMS // max(1, n))
    for a in range(0, f, step):
        part = x[:, a:a + step].to(torch.float64)
        k.addmm_(part, part.t())
    return k


def _center(k: Tensor) -> Tensor:
    """H K H with H = I - 11^T/n, without forming H."""
    k = k.to(torch.float64)
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def _check_gram(k: Tensor) -> None:
    if not isinstance(k, Tensor) or k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"a Gram matrix must be square [n, n], got {getattr(k, 'shape', type(k).__name__)}")


def linear_cka(k1: Tensor, k2: Tensor) -> float:
    """Linear CKA from two Gram matrices: <HK1H, HK2H>_F / (||HK1H||_F ||HK2H||_F).

    Returns 0.0 when either centred Gram is zero (features constant over the samples):
    similarity is undefined there, and 0 keeps it from making a layer look redundant.
    """
    _check_gram(k1)
    _check_gram(k2)
    if k1.shape != k2.shape:
        raise ValueError(f"Gram matrices differ in size: {tuple(k1.shape)} vs {tuple(k2.shape)}")
    a, b = _center(k1), _center(k2.to(k1.device))
    na, nb = torch.linalg.norm(a), torch.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float((a * b).sum() / (na * nb))


def cka_matrix(grams: Sequence[Tensor]) -> Tensor:
    """[L, L] float64 matrix of linear CKA between every pair of layers' Grams."""
    if len(grams) == 0:
        raise LosaZeroError("no Gram matrices: need at least one layer")
    for k in grams:
        _check_gram(k)
    n = grams[0].shape[0]
    if any(k.shape[0] != n for k in grams):
        raise ValueError("all Gram matrices must be over the same n samples")
    cs = [_center(k).cpu() for k in grams]
    norms = [torch.linalg.norm(c) for c in cs]
    L = len(cs)
    out = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(i, L):
            if norms[i] == 0 or norms[j] == 0:
                v = 0.0
            else:
                v = float((cs[i] * cs[j]).sum() / (norms[i] * norms[j]))
            out[i, j] = out[j, i] = v
    return out


def rmi_importance(grams: Sequence[Tensor], beta: float) -> tuple[list[float], list[float]]:
    """(importance, redundancy) per layer (docs/method.md §2).

    Redundancy m_l = sum_{j != l} CKA(l, j), normalised to sum 1; importance
    I_l = exp(-beta * m_l): a layer resembling all others is redundant, so it gets low
    importance and, in §3, more sparsity. (Released beta: 1 with Wanda, 100 with SparseGPT.)
    """
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise LosaZeroError(
            f"RMI beta must be a finite number >= 0 (released: 1 with Wanda, 100 with SparseGPT), got {beta}")
    if len(grams) and grams[0].shape[0] < 2:
        raise LosaZeroError(
            "RMI importance needs at least 2 calibration sequences (CKA compares samples): raise the CKA sample count")
    c = cka_matrix(grams)
    m = c.sum(1) - c.diagonal()
    total = float(m.sum())
    L = c.shape[0]
    red = [float(v) / total for v in m] if total > 0 else [1.0 / L] * L
    imp = [math.exp(-beta * v) for v in red]
    return imp, red


# --- §3: layer-wise sparsity rates -------------------------------------------------------

def band_delta(theta: float) -> float:
    """Half-width δ of the rate band around Θ (released: 0.01 up to 0.5, 0.02 up to 0.6,
    0.03 above)."""
    if theta <= 0.5:
        return 0.01
    if theta <= 0.6:
        return 0.02
    return 0.03


def uniform_rates(num_layers: int, theta: float) -> list[float]:
    """Every layer at Θ (the non-LoSA baseline)."""
    if num_layers < 1:
        raise LosaZeroError("need at least one layer")
    if not 0.0 <= theta < 1.0:
        raise LosaZeroError(f"sparsity must be in [0, 1), got {theta}")
    return [float(theta)] * num_layers


def check_target_and_band(target: float, width: float, width_name: str) -> tuple[float, float]:
    """Validate a layer-rate target in [0, 1) and a band half-width >= 0 (RMI's delta, OWL's
    lambda): the checks every rate allocator shares."""
    target, width = float(target), float(width)
    if not 0.0 <= target < 1.0:
        raise LosaZeroError(f"sparsity must be in [0, 1), got {target}")
    if not math.isfinite(width) or width < 0:
        raise LosaZeroError(f"{width_name} must be >= 0, got {width}")
    return target, width


def solve_layer_rates(importance, theta: float, delta: float) -> list[float]:
    """Exact optimum of min sum x_l I_l s.t. mean(x) = Θ, x_l in the band around Θ (§3).

    A fractional knapsack: start every layer at the band's floor, then raise the least
    important layers (stable ties: lower index first) to the band's ceiling until the mean
    is Θ; at most one layer ends in between. The band is [Θ - δ, Θ + δ] clipped sensibly:
    never below 0, and never more than halfway from Θ to 1 (rates must stay < 1); an
    asymmetric band still gives mean exactly Θ (up to float rounding).
    """
    imp = _as_floats(importance, "importance")
    theta, delta = check_target_and_band(theta, delta, "band half-width delta")
    L = len(imp)
    lo = theta - min(delta, theta)
    hi = theta + min(delta, (1.0 - theta) / 2)
    if hi - lo <= 0:
        return [theta] * L
    order = sorted(range(L), key=lambda i: (imp[i], i))  # least important first
    budget = L * (theta - lo)  # total to add above the floor
    n_full = min(L, math.floor(budget / (hi - lo) + 1e-9))
    x = [lo] * L
    for i in order[:n_full]:
        x[i] = hi
    if n_full < L:
        rest = L * theta - n_full * hi - (L - n_full - 1) * lo
        x[order[n_full]] = min(hi, max(lo, rest))
    return x


# --- §5: schedules ---------------------------------------------------------------------

def cubic_schedule(S: float, T: int) -> list[float]:
    """Θ^t = S - S (1 - t/T)^3 for t = 1..T: fast early, gentle near the target (§5)."""
    if not 0.0 <= S < 1.0:
        raise LosaZeroError(f"target sparsity must be in [0, 1), got {S}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise LosaZeroError(f"number of LoSA steps must be a positive integer, got {T!r}")
    return [S - S * (1.0 - t / T) ** 3 for t in range(1, T + 1)]


def mean_rank_schedule(T: int, start: float = 6.0, end: float = 10.0) -> list[float]:
    """Mean LoRA rank Ω^t growing linearly from ``start`` to ``end`` (released 6..10, §4);
    a single step uses ``end``."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise LosaZeroError(f"number of LoSA steps must be a positive integer, got {T!r}")
    if T == 1:
        return [float(end)]
    return [start + (end - start) * (t - 1) / (T - 1) for t in range(1, T + 1)]


# --- §4: reconstruction error and rank allocation --------------------------------------

def allocate_ranks(errors, mean_rank: float, r_max: int = 16, r_min: int = 1) -> list[int]:
    """Per-layer LoRA ranks proportional to reconstruction error, summing to L * Ω (§4).

    r_l = clip(round(L Ω e_l / sum e), r_min, r_max); then ±1 adjustments in passes over
    the layers, largest error first when adding and smallest first when removing (ties by
    index), skipping layers at the clip bound, until the sum is round(L Ω) or no layer can
    move. All-zero errors share the ranks equally. Rounding halves go up.
    """
    e = _as_floats(errors, "errors")
    if any(v < 0 for v in e):
        raise ValueError(f"reconstruction errors must be >= 0, got {e}")
    if not (isinstance(r_min, int) and isinstance(r_max, int)) or not 0 <= r_min <= r_max:
        raise LosaZeroError(f"rank bounds must be integers with 0 <= r_min <= r_max, got {r_min}, {r_max}")
    if not math.isfinite(mean_rank) or mean_rank < 0:
        raise LosaZeroError(f"mean rank must be >= 0, got {mean_rank}")
    L = len(e)
    total = sum(e)
    if total <= 0:
        e, total = [1.0] * L, float(L)
    budget = L * mean_rank
    target = _round_half_up(budget)
    r = [min(r_max, max(r_min, _round_half_up(budget * v / total))) for v in e]
    desc = sorted(range(L), key=lambda i: (-e[i], i))
    asc = sorted(range(L), key=lambda i: (e[i], i))
    while sum(r) < target:
        moved = False
        for i in desc:
            if sum(r) >= target:
                break
            if r[i] < r_max:
                r[i] += 1
                moved = True
        if not moved:
            break
    while sum(r) > target:
        moved = False
        for i in asc:
            if sum(r) <= target:
                break
            if r[i] > r_min:
                r[i] -= 1
                moved = True
        if not moved:
            break
    return r


class ReconstructionError:
    """Channel-normalised reconstruction error of one layer's output (§4), as sums.

    e = (1/d) sum_c sum_tokens (D - Y)[., c]^2 / ||D[., c]||^2, the channel norm over all
    tokens. Kept as two float64 per-channel sums (squared difference, squared dense output)
    so ranks all-reduce :meth:`tensors` and every rank gets the global value. Channels
    whose dense output is identically zero are skipped (their term counts as 0; the mean
    still divides by d).
    """

    def __init__(self, channels: int, device: torch.device | str | None = None) -> None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.diff_sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.dense_sq = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, dense_out: Tensor, pruned_out: Tensor) -> None:
        """Accumulate a batch of dense targets and pruned outputs, both [..., d]."""
        if dense_out.shape != pruned_out.shape or dense_out.shape[-1] != self.channels:
            raise ValueError(f"expected two [..., {self.channels}] tensors of equal shape, "
                             f"got {tuple(dense_out.shape)} and {tuple(pruned_out.shape)}")
        dev = self.diff_sq.device
        dense = dense_out.detach().reshape(-1, self.channels).to(device=dev, dtype=torch.float64)
        pruned = pruned_out.detach().reshape(-1, self.channels).to(device=dev, dtype=torch.float64)
        self.diff_sq += (dense - pruned).square().sum(0)
        self.dense_sq += dense.square().sum(0)

    def tensors(self) -> list[Tensor]:
        """[diff_sq, dense_sq]: live buffers, to be summed in place across ranks."""
        return [self.diff_sq, self.dense_sq]

    def value(self) -> float:
        """The error e_l (0.0 before any batch)."""
        ok = self.dense_sq > 0
        ratio = torch.where(ok, self.diff_sq / torch.where(ok, self.dense_sq, 1.0), 0.0)
        return float(ratio.sum()) / self.channels


# --- mixed N:M (docs/method.md §7): per-layer N from an allocation's importance ---------------

def mixed_nm_allocation(importance, n_mean: float, m: int, n_min: int = 1, n_max: int | None = None) -> list[int]:
    """Per-layer N (weights kept in every M) with mean exactly ``n_mean``: more important
    layers keep more weights (docs/method.md §7, "mixed N per layer").

    The integer counterpart of :func:`solve_layer_rates`: the exact optimum of
    max sum N_l I_l s.t. sum N_l = L n_mean, n_min <= N_l <= n_max, N_l integer. Start every
    layer at ``n_min`` and raise the most important layers (ties: lower index first) to
    ``n_max`` until the budget is spent; at most one layer ends in between. The band
    [n_min, n_max] sets how far layers may move (default 1 .. m-1). When every layer is
    equally important (e.g. a uniform allocation) and ``n_mean`` is an integer, every layer
    gets ``n_mean``: ties must not invent a mixture.
    """
    imp = _as_floats(importance, "importance")
    if n_max is None:
        n_max = m - 1
    for name, v in (("m", m), ("n_min", n_min), ("n_max", n_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise LosaZeroError(f"mixed N:M: {name} must be an integer, got {v!r}")
    if m < 2 or not 1 <= n_min <= n_max <= m:
        raise LosaZeroError(f"mixed N:M: need 1 <= n_min <= n_max <= m with m >= 2 (got {n_min}, {n_max}, {m})")
    n_mean = float(n_mean)
    if not n_min <= n_mean <= n_max:
        raise LosaZeroError(f"mixed N:M: mean N {n_mean:g} is outside [{n_min}, {n_max}]")
    L = len(imp)
    total = L * n_mean
    if abs(total - round(total)) > 1e-9:
        raise LosaZeroError(f"mixed N:M: a mean N of {n_mean:g} over {L} layers is not a whole number of kept "
                            "weights per group: the mean sparsity could not be met exactly")
    total = int(round(total))
    if max(imp) - min(imp) <= 1e-12 * max(abs(max(imp)), abs(min(imp))) and total % L == 0:
        return [total // L] * L
    order = sorted(range(L), key=lambda i: (-imp[i], i))  # most important first
    n = [n_min] * L
    budget = total - L * n_min
    for i in order:
        add = min(n_max - n_min, budget)
        n[i] += add
        budget -= add
        if budget == 0:
            break
    return n
