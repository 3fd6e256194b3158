"""LoSA allocations against independent references: linprog, numpy HSIC, direct formulas."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from losa_zero.allocation import (ReconstructionError, allocate_ranks, band_delta, cka_matrix, cubic_schedule, gram,
                                  linear_cka, mean_rank_schedule, rmi_importance, solve_layer_rates, uniform_rates)
from losa_zero.errors import LosaZeroError


# --- §3 rates -----------------------------------------------------------------------------

def lp_rates(imp, theta, lo, hi):
    L = len(imp)
    res = linprog(c=np.asarray(imp), A_eq=np.ones((1, L)) / L, b_eq=[theta], bounds=[(lo, hi)] * L, method="highs")
    assert res.status == 0
    return res.x, res.fun


def test_solver_equals_linprog():
    rng = random.Random(0)
    for trial in range(60):
        L = rng.randint(1, 40)
        theta = rng.uniform(0.05, 0.9)
        delta = band_delta(theta)
        if trial % 5 == 0:  # ties: only the objective is unique
            imp = [rng.choice([0.2, 0.5, 0.9]) for _ in range(L)]
        else:
            imp = [rng.uniform(0.0, 1.0) for _ in range(L)]
        x = solve_layer_rates(imp, theta, delta)
        ref_x, ref_obj = lp_rates(imp, theta, theta - delta, theta + delta)
        assert abs(sum(a * b for a, b in zip(x, imp)) - ref_obj) < 1e-9
        assert abs(sum(x) / L - theta) < 1e-12
        assert all(theta - delta - 1e-12 <= v <= theta + delta + 1e-12 for v in x)
        assert sum(1 for v in x if abs(v - theta - delta) > 1e-12 and abs(v - theta + delta) > 1e-12) <= 1
        if trial % 5:
            np.testing.assert_allclose(x, ref_x, atol=1e-9)
        # least important at the top of the band
        order = sorted(range(L), key=lambda i: (imp[i], i))
        assert [x[i] for i in order] == sorted(x, reverse=True)


def test_solver_clipped_band_keeps_mean():
    imp = [0.3, 0.1, 0.7, 0.5, 0.2]
    for theta in (0.0, 0.004, 0.99, 0.999):
        x = solve_layer_rates(imp, theta, 0.03)
        assert all(0.0 <= v < 1.0 for v in x)
        assert abs(sum(x) / 5 - theta) < 1e-12
        lo, hi = min(x), max(x)
        _, ref_obj = lp_rates(imp, theta, lo, hi)
        assert abs(sum(a * b for a, b in zip(x, imp)) - ref_obj) < 1e-9
    assert solve_layer_rates(imp, 0.5, 0.0) == [0.5] * 5
    with pytest.raises(LosaZeroError):
        solve_layer_rates(imp, 1.0, 0.01)
    with pytest.raises(LosaZeroError):
        solve_layer_rates([], 0.5, 0.01)


def test_band_delta_and_uniform():
    assert [band_delta(t) for t in (0.3, 0.5, 0.55, 0.6, 0.65, 0.7, 0.9)] == [0.01, 0.01, 0.02, 0.02, 0.03, 0.03, 0.03]
    assert uniform_rates(3, 0.6) == [0.6, 0.6, 0.6]


# --- §2 CKA / RMI -------------------------------------------------------------------------

def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def test_cka_equals_numpy_hsic_and_slicing():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 300))
    y = x @ rng.standard_normal((300, 200)) * 0.1 + rng.standard_normal((12, 200))
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    kx, ky = gram(xt), gram(yt)
    assert kx.dtype == torch.float64 and kx.shape == (12, 12)
    ref = numpy_cka(xt.double().numpy(), yt.double().numpy())
    assert linear_cka(kx, ky) == pytest.approx(ref, abs=1e-12)
    # partial Grams over feature slices add up (how ranks with different slices combine)
    parts = gram(xt[:, :100]) + gram(xt[:, 100:250]) + gram(xt[:, 250:])
    torch.testing.assert_close(parts, kx, rtol=1e-12, atol=1e-9)
    # [n, seq, hidden] flattens per sample
    torch.testing.assert_close(gram(xt.reshape(12, 30, 10)), kx)
    # linear CKA is invariant to isotropic scaling and orthogonal transforms
    q, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    assert linear_cka(gram(torch.from_numpy(3.0 * x @ q)), ky) == pytest.approx(
        linear_cka(gram(torch.from_numpy(x)), ky), abs=1e-12)
    assert linear_cka(kx, kx) == pytest.approx(1.0)
    assert linear_cka(gram(torch.ones(12, 5)), kx) == 0.0  # constant features: undefined -> 0


def test_cka_matrix_and_rmi_importance():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((10, 64))
    feats = [base + s * rng.standard_normal((10, 64)) for s in (0.1, 0.5, 1.0, 3.0)]
    grams = [gram(torch.from_numpy(f)) for f in feats]
    c = cka_matrix(grams)
    ref = np.array([[numpy_cka(a, b) for b in feats] for a in feats])
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-12)
    for beta in (1.0, 100.0):
        imp, red = rmi_importance(grams, beta)
        m = ref.sum(1) - np.diag(ref)
        m = m / m.sum()
        np.testing.assert_allclose(red, m, atol=1e-12)
        np.testing.assert_allclose(imp, np.exp(-beta * m), rtol=1e-12)
    # the odd one out (most noise) is least redundant: most important
    imp, _ = rmi_importance(grams, 1.0)
    assert int(np.argmax(imp)) == 3
    with pytest.raises(LosaZeroError):
        rmi_importance([gram(torch.randn(1, 4))] * 2, 1.0)


# --- §5 schedules -------------------------------------------------------------------------

def test_cubic_schedule_matches_doc():
    assert [round(v, 3) for v in cubic_schedule(0.7, 5)] == [0.342, 0.549, 0.655, 0.694, 0.700]
    assert cubic_schedule(0.7, 5)[-1] == 0.7
    assert cubic_schedule(0.5, 1) == [0.5]
    s = cubic_schedule(0.6, 8)
    assert all(a < b for a, b in zip(s, s[1:]))
    with pytest.raises(LosaZeroError):
        cubic_schedule(1.0, 5)
    with pytest.raises(LosaZeroError):
        cubic_schedule(0.5, 0)


def test_mean_rank_schedule():
    assert mean_rank_schedule(5) == [6.0, 7.0, 8.0, 9.0, 10.0]
    assert mean_rank_schedule(1) == [10.0]
    assert mean_rank_schedule(3, 4, 8) == [4.0, 6.0, 8.0]


# --- §4 ranks -----------------------------------------------------------------------------

def test_allocate_ranks_properties():
    rng = random.Random(0)
    for trial in range(200):
        L = rng.randint(1, 40)
        errors = [rng.expovariate(1.0) ** 2 for _ in range(L)]
        mean_rank = rng.choice([6.0, 7.0, 8.0, 9.0, 10.0, 7.5, 3.3])
        r_max = rng.choice([16, 12, 32])
        r = allocate_ranks(errors, mean_rank, r_max=r_max)
        assert len(r) == L and all(isinstance(v, int) for v in r)
        assert all(1 <= v <= r_max for v in r)
        target = math.floor(L * mean_rank + 0.5)
        assert sum(r) == min(max(target, L), L * r_max)
        for i in range(L):
            for j in range(L):
                if errors[i] > errors[j]:
                    assert r[i] >= r[j]


def test_allocate_ranks_exact_cases():
    # proportional: 4 layers, mean 8 -> 32 total, errors 1:1:2:4 -> 4, 4, 8, 16
    assert allocate_ranks([1, 1, 2, 4], 8) == [4, 4, 8, 16]
    # clip at 16 then hand the remainder out, largest error first
    # (2, 2, 2, 26 -> 16) = 22, +10 in passes: 3 at its bound, then layers 0, 1, 2 by index
    assert allocate_ranks([1, 1, 1, 13], 8) == [6, 5, 5, 16]
    # clipping makes the sum unreachable: stay at the bound
    assert allocate_ranks([1, 2], 20) == [16, 16]
    assert allocate_ranks([1, 2], 0.2) == [1, 1]
    # all-zero errors share equally
    assert allocate_ranks([0, 0, 0], 6) == [6, 6, 6]
    # removal takes from the smallest errors first (3, 4.5 -> 5, 5 sums 13 > 12)
    assert allocate_ranks([1.0, 1.5, 1.5], 4.0) == [2, 5, 5]
    # ... skipping layers at r_min
    assert allocate_ranks([1, 1, 1, 1, 1, 10], 2.0) == [1, 1, 1, 1, 1, 7]
    r = allocate_ranks([0.5, 1.0, 100.0], 10.0)
    assert r[2] == 16 and sum(r) == 30 and r[0] <= r[1]


# --- §4 reconstruction error --------------------------------------------------------------

def test_reconstruction_error_formula_and_additivity():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(4, 50, 16, generator=g)
    pruned = dense + 0.1 * torch.randn(4, 50, 16, generator=g)
    d = dense.double().reshape(-1, 16).numpy()
    y = pruned.double().reshape(-1, 16).numpy()
    ref = np.mean(np.sum(((d - y) / np.linalg.norm(d, axis=0)) ** 2, axis=0))
    whole = ReconstructionError(16)
    whole.add(dense, pruned)
    assert whole.value() == pytest.approx(ref, rel=1e-12)
    # batches add up; two "ranks" summing tensors() give the same value
    a, b = ReconstructionError(16), ReconstructionError(16)
    a.add(dense[:1], pruned[:1])
    a.add(dense[1:2], pruned[1:2])
    b.add(dense[2:], pruned[2:])
    for ta, tb in zip(a.tensors(), b.tensors()):
        ta += tb
    assert a.value() == pytest.approx(ref, rel=1e-12)
    assert all(t.dtype == torch.float64 for t in a.tensors())
    # zero channels are guarded, empty accumulator is 0
    z = ReconstructionError(2)
    assert z.value() == 0.0
    z.add(torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([[0.5, 1.0], [0.0, 1.0]]))
    assert z.value() == pytest.approx(0.5 * (1.0 / 5.0))
    assert ReconstructionError(3).tensors()[0].shape == (3,)
