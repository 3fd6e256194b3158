"""Pruners against independent references: brute-force sorts, a naive OBS, counting rules."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from losa_zero.allocation import cubic_schedule
from losa_zero.errors import LosaZeroError
from losa_zero.pruners import (HessianStats, SparsityTarget, WandaStats, get_pruner, lowest_k_keep, nm_candidates, nm_keep,
                               realised_sparsity, rowwise_keep, satisfies_nm, toward_nm_keep)

ALL = ("magnitude", "wanda", "sparsegpt")


def correlated_inputs(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and uneven scales, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / math.sqrt(width)
    scale = torch.exp(torch.randn(width, generator=g))
    return (torch.randn(tokens, width, generator=g) @ mix + 0.3 * torch.randn(tokens, width, generator=g)) * scale


def make_stats(pruner, x: torch.Tensor):
    s = pruner.new_stats(x.shape[-1])
    if s is not None:
        s.add_batch(x)
    return s


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    x = correlated_inputs(2048, 256)
    return w, x


def out_error(w, w_hat, x) -> float:
    return float(((w - w_hat) @ x.T).norm())


# --- targets and registry -------------------------------------------------------------

def test_target_validation():
    assert SparsityTarget.nm_pattern(2, 4).rate == 0.5
    assert SparsityTarget.nm_pattern(2, 4).nm == (2, 4)
    assert SparsityTarget.unstructured(0.7).describe() == "70.00%"
    assert SparsityTarget.nm_pattern(4, 8).describe() == "4:8"
    for bad in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(LosaZeroError):
            SparsityTarget.unstructured(bad)
    for n, m in ((0, 4), (5, 4), (2, 0)):
        with pytest.raises(LosaZeroError):
            SparsityTarget.nm_pattern(n, m)
    with pytest.raises(LosaZeroError):
        SparsityTarget(0.3, (2, 4))
    assert SparsityTarget(0.5, (2, 4)).nm == (2, 4)


def test_get_pruner():
    assert get_pruner("Wanda").name == "wanda"
    assert get_pruner("sparsegpt", blocksize=64, percdamp=0.02).blocksize == 64
    with pytest.raises(LosaZeroError, match="unknown pruner"):
        get_pruner("obc")
    with pytest.raises(LosaZeroError, match="blocksize"):
        get_pruner("wanda", blocksize=4)
    with pytest.raises(LosaZeroError, match="rounding"):
        get_pruner("magnitude", rounding="ceil")
    with pytest.raises(LosaZeroError):
        get_pruner("sparsegpt", blocksize=0)


# --- N:M ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_masks_valid(layer, name, n, m):
    w, x = layer
    p = get_pruner(name)
    new_w, keep = p.prune(w, make_stats(p, x), SparsityTarget.nm_pattern(n, m))
    groups = keep.reshape(w.shape[0], -1, m).sum(-1)
    assert bool((groups == n).all())
    assert satisfies_nm(keep, n, m)
    assert bool((new_w[~keep] == 0).all())
    # with earlier pruning: never more than n kept, never a resurrected weight
    g = torch.Generator().manual_seed(3)
    prev = torch.rand(w.shape, generator=g) > 0.4
    new_w, keep = p.prune(w * prev, make_stats(p, x), SparsityTarget.nm_pattern(n, m), prev_keep=prev)
    assert satisfies_nm(keep, n, m)
    assert not bool((keep & ~prev).any())
    assert bool((new_w[~keep] == 0).all())
    # groups keep exactly min(n, survivors)
    assert bool((keep.reshape(w.shape[0], -1, m).sum(-1) == prev.reshape(w.shape[0], -1, m).sum(-1).clamp(max=n)).all())


def test_nm_width_error_names_the_linear():
    p = get_pruner("magnitude")
    msg = r"N:M 4:8 needs input width divisible by 8; mlp.down_proj has 172 inputs: use 2:4 or unstructured"
    with pytest.raises(LosaZeroError, match=msg):
        p.prune(torch.randn(8, 172), None, SparsityTarget.nm_pattern(4, 8), name="mlp.down_proj")


@pytest.mark.parametrize("name", ("magnitude", "wanda"))
def test_nm_keeps_top_n_per_group(layer, name):
    w, x = layer
    p = get_pruner(name)
    s = make_stats(p, x)
    score = w.abs() if name == "magnitude" else w.abs() * x.square().sum(0).sqrt()
    _, keep = p.prune(w, s, SparsityTarget.nm_pattern(2, 4))
    sc = score.numpy().reshape(64, -1, 4)
    order = np.argsort(sc, axis=-1, kind="stable")
    ref = np.ones_like(sc, dtype=bool)
    np.put_along_axis(ref, order[..., :2], False, axis=-1)
    assert np.array_equal(keep.numpy(), ref.reshape(64, 256))


# --- unstructured counting ----------------------------------------------------------------

def brute_force_rowwise(score: np.ndarray, per_row: int) -> np.ndarray:
    keep = np.ones_like(score, dtype=bool)
    for r in range(score.shape[0]):
        keep[r, np.argsort(score[r], kind="stable")[:per_row]] = False
    return keep


@pytest.mark.parametrize("name", ("magnitude", "wanda"))
def test_rowwise_top_entries_brute_force(layer, name):
    w, x = layer
    p = get_pruner(name)
    s = make_stats(p, x)
    score = (w.abs() if name == "magnitude" else w.abs() * x.square().sum(0).sqrt()).numpy()
    for rate in (0.25, 0.5, 0.75):  # per-row counts are integers: every row prunes rate*cols
        new_w, keep = p.prune(w, s, SparsityTarget.unstructured(rate))
        assert np.array_equal(keep.numpy(), brute_force_rowwise(score, int(256 * rate)))
        assert torch.equal(new_w, w * keep)


@pytest.mark.parametrize("name", ("magnitude", "wanda"))
@pytest.mark.parametrize("rows,cols,rate", [(7, 33, 0.3), (64, 64, 0.7), (13, 50, 0.55), (5, 9, 0.85)])
def test_nearest_rounding_exact_total(name, rows, cols, rate):
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(100, cols, generator=g)
    p = get_pruner(name)
    s = make_stats(p, x)
    _, keep = p.prune(w, s, SparsityTarget.unstructured(rate))
    pruned_per_row = (~keep).sum(1)
    total = int(pruned_per_row.sum())
    assert total == round(rate * rows * cols)  # none of these is an exact half
    q = total // rows
    assert set(pruned_per_row.tolist()) <= {q, q + 1}
    score = w.abs() if name == "magnitude" else w.abs() * x.square().sum(0).sqrt()
    # within each row the pruned are the lowest scores
    for r in range(rows):
        if 0 < pruned_per_row[r] < cols:
            assert score[r][~keep[r]].max() <= score[r][keep[r]].min()
    # rows taking one more are those with the smallest next candidate (the (q+1)-th lowest)
    nxt = torch.sort(score, dim=1).values[:, q]
    extra = pruned_per_row == q + 1
    if extra.any() and (~extra).any():
        assert nxt[extra].max() <= nxt[~extra].min()


def test_narrow_layer_rounding_matches_doc():
    """docs/method.md §5.3: 64 inputs at 0.7: the released int() prunes 44 per row (68.75%)."""
    w = torch.randn(16, 64)
    _, keep_floor = get_pruner("magnitude", rounding="floor").prune(w, None, SparsityTarget.unstructured(0.7))
    assert ((~keep_floor).sum(1) == 44).all()
    assert realised_sparsity(keep_floor) == 0.6875
    _, keep = get_pruner("magnitude").prune(w, None, SparsityTarget.unstructured(0.7))
    assert int((~keep).sum()) == round(0.7 * 16 * 64)  # 716.8 -> 717


@pytest.mark.parametrize("name", ("magnitude", "wanda"))
def test_floor_rounding_per_row(name):
    w = torch.randn(9, 33)
    p = get_pruner(name, rounding="floor")
    for rate in (0.3, 0.29, 0.7, 0.5):
        _, keep = p.prune(w, make_stats(p, torch.randn(50, 33)), SparsityTarget.unstructured(rate))
        assert ((~keep).sum(1) == int(33 * rate)).all()


def test_ties_break_by_index():
    keep = rowwise_keep(torch.ones(3, 8), 0.5)
    assert torch.equal(keep, torch.tensor([[False] * 4 + [True] * 4] * 3))
    keep = nm_keep(torch.ones(2, 8), 2, 4)
    assert torch.equal(keep[0], torch.tensor([False, False, True, True] * 2))
    keep = lowest_k_keep(torch.ones(2, 3), 4)
    assert torch.equal(keep, torch.tensor([[False, False, False], [False, True, True]]))
    # nearest rounding: the extra prune goes to the row whose next candidate is smallest
    score = torch.tensor([[1.0, 5.0, 9.0], [1.0, 2.0, 9.0]])
    keep = rowwise_keep(score, 0.5)  # round(3) = 3 pruned: 1 and 2 per row
    assert torch.equal(keep, torch.tensor([[False, True, True], [False, False, True]]))


def test_rate_zero_is_identity(layer):
    w, x = layer
    for name in ALL:
        p = get_pruner(name)
        new_w, keep = p.prune(w, make_stats(p, x), SparsityTarget.unstructured(0.0))
        assert keep.all() and torch.equal(new_w, w)


# --- earlier pruning (prev_keep) ----------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_prev_keep_respected(layer, name):
    w, x = layer
    p = get_pruner(name)
    s = make_stats(p, x)
    g = torch.Generator().manual_seed(5)
    prev = torch.rand(w.shape, generator=g) > 0.3  # ~30% already pruned, < 50% in every row
    assert ((~prev).sum(1) < 128).all()
    new_w, keep = p.prune(w * prev, s, SparsityTarget.unstructured(0.5), prev_keep=prev)
    assert not bool((keep & ~prev).any())  # no resurrected weight
    assert bool((new_w[~keep] == 0).all())
    assert int((~keep).sum()) == 64 * 128  # earlier prunes count toward the target
    if name != "sparsegpt":
        assert ((~keep).sum(1) == 128).all()
    # rows that already lost more than the target keep all of it pruned
    prev_hi = torch.rand(w.shape, generator=g) > 0.8
    new_w, keep = p.prune(w * prev_hi, s, SparsityTarget.unstructured(0.5), prev_keep=prev_hi)
    assert torch.equal(keep, prev_hi)
    assert realised_sparsity(keep) > 0.5
    assert bool((new_w[~keep] == 0).all())


@pytest.mark.parametrize("name", ("magnitude", "wanda"))
def test_prev_keep_mixed_rows(name):
    """A row over its share stays over; the others still reach their own share."""
    w = torch.randn(4, 10)
    prev = torch.ones(4, 10, dtype=torch.bool)
    prev[0, :8] = False  # row 0 already at 80%
    p = get_pruner(name)
    _, keep = p.prune(w, make_stats(p, torch.randn(20, 10)), SparsityTarget.unstructured(0.5), prev_keep=prev)
    assert (~keep).sum(1).tolist() == [8, 5, 5, 5]
    assert not bool((keep & ~prev).any())


# --- SparseGPT ----------------------------------------------------------------------------

@pytest.mark.parametrize("target", [SparsityTarget.unstructured(0.5), SparsityTarget.nm_pattern(2, 4)],
                         ids=["50%", "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda(layer, target):
    w, x = layer
    errs = {}
    for name in ALL:
        p = get_pruner(name)
        new_w, keep = p.prune(w, make_stats(p, x), target)
        assert int((~keep).sum()) == w.numel() // 2
        assert bool((new_w[~keep] == 0).all())
        errs[name] = out_error(w, new_w, x)
    assert errs["sparsegpt"] < errs["wanda"]
    assert errs["sparsegpt"] < errs["magnitude"]


def naive_obs(w: np.ndarray, h: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Reference OBS with a fixed mask: visit columns in order, zero the pruned entries and
    compensate with the inverse Hessian of the columns not yet visited (float64, explicit
    inverse; no Cholesky, no blocks)."""
    w = w.astype(np.float64).copy()
    cols = w.shape[1]
    for i in range(cols):
        hinv = np.linalg.inv(h[i:, i:])
        q = np.where(keep[:, i], w[:, i], 0.0)
        err = (w[:, i] - q) / hinv[0, 0]
        w[:, i:] -= np.outer(err, hinv[0, :])
        w[:, i] = q
    return w


@pytest.mark.parametrize("target", [SparsityTarget.unstructured(0.6), SparsityTarget.nm_pattern(2, 4)],
                         ids=["60%", "2:4"])
def test_sparsegpt_matches_naive_obs(target):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 40, generator=g)
    x = correlated_inputs(500, 40, seed=7)
    p = get_pruner("sparsegpt", blocksize=16)  # 40 = 16 + 16 + 8: ragged last block
    s = make_stats(p, x)
    new_w, keep = p.prune(w, s, target)
    h = (2 * x.double().T @ x.double() / 500).numpy()
    h += 0.01 * np.mean(np.diag(h)) * np.eye(40)
    ref = naive_obs(w.numpy(), h, keep.numpy())
    np.testing.assert_allclose(new_w.numpy(), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert realised_sparsity(keep) == pytest.approx(target.rate, abs=1 / w.numel())


def test_sparsegpt_lazy_blocks_equal_eager():
    """Lazy batch updates are exact: N:M masks and weights do not depend on the block size."""
    w = torch.randn(32, 96)
    x = correlated_inputs(400, 96, seed=2)
    outs = []
    for bs in (4, 32, 128, 6):  # 6 is rounded down to a multiple of m = 4
        p = get_pruner("sparsegpt", blocksize=bs)
        outs.append(p.prune(w, make_stats(p, x), SparsityTarget.nm_pattern(2, 4)))
    for new_w, keep in outs[1:]:
        assert torch.equal(keep, outs[0][1])
        torch.testing.assert_close(new_w, outs[0][0], rtol=1e-4, atol=1e-4)


COMPILED_LOOP_TARGETS = {
    "60%": SparsityTarget.unstructured(0.6),
    "2:4": SparsityTarget.nm_pattern(2, 4),
    "3:8": SparsityTarget.nm_pattern(3, 8),
    "toward 2:4": SparsityTarget.toward_nm(0.3, 2, 4),
    "per-row": SparsityTarget.per_row([(7 * r) % 150 for r in range(37)], 200),
}


@pytest.mark.parametrize("earlier", [False, True], ids=["first", "after-earlier-pruning"])
@pytest.mark.parametrize("name", list(COMPILED_LOOP_TARGETS))
def test_sparsegpt_compiled_loop_equals_torch_loop(monkeypatch, name, earlier):
    """The compiled CPU column loop and its torch twin give the same masks and weights: the
    same operations with the same rounding (rows not a multiple of the kernel's grain, a
    ragged last block, a dead input, weights pruned before)."""
    from losa_zero.kernels import build as kbuild
    from losa_zero.pruners import sparsegpt

    if not kbuild.kernel_available():
        pytest.skip("the C++ kernels could not be built here (see the warning above): no compiler")
    target = COMPILED_LOOP_TARGETS[name]
    g = torch.Generator().manual_seed(11)
    w = torch.randn(37, 200, generator=g)
    x = correlated_inputs(600, 200, seed=11)
    x[:, 9] = 0.0
    prev = None
    if earlier:
        prev = torch.rand(37, 200, generator=g) > 0.2
        if target.nm is not None or target.toward is not None:  # earlier steps kept the groups' n
            prev = ~nm_candidates(torch.rand(37, 200, generator=g), 2, 4) | prev
    p = get_pruner("sparsegpt", blocksize=64)
    stats = make_stats(p, x)
    compiled = p.prune(w, stats, target, prev)
    monkeypatch.setattr(sparsegpt, "load_kernel", lambda: None)
    in_torch = p.prune(w, stats, target, prev)
    assert torch.equal(compiled[1], in_torch[1])
    assert torch.equal(compiled[0], in_torch[0])
    if target.nm is not None:
        assert satisfies_nm(compiled[1], *target.nm)


@pytest.mark.parametrize("cols,rate", [(200, 0.5), (300, 0.7), (130, 0.33)])
def test_sparsegpt_exact_count_ragged_blocks(cols, rate):
    w = torch.randn(24, cols)
    x = correlated_inputs(600, cols, seed=cols)
    p = get_pruner("sparsegpt")
    new_w, keep = p.prune(w, make_stats(p, x), SparsityTarget.unstructured(rate))
    assert int((~keep).sum()) == round(rate * w.numel())
    assert bool((new_w[~keep] == 0).all())
    p = get_pruner("sparsegpt", rounding="floor")
    _, keep = p.prune(w, make_stats(p, x), SparsityTarget.unstructured(rate))
    blocks = [(a, min(a + 128, cols)) for a in range(0, cols, 128)]
    assert int((~keep).sum()) == sum(int(24 * (b - a) * rate) for a, b in blocks)


def test_sparsegpt_dead_inputs_and_singular_hessian():
    w = torch.randn(8, 32)
    x = correlated_inputs(12, 32, seed=4)  # 12 tokens < 32 inputs: singular H
    x[:, 5] = 0.0  # a dead input
    p = get_pruner("sparsegpt", percdamp=0.0)  # forces the dampening retry
    new_w, keep = p.prune(w, make_stats(p, x), SparsityTarget.unstructured(0.5))
    assert (new_w[:, 5] == 0).all()
    assert torch.isfinite(new_w).all()
    assert int((~keep).sum()) == 128
    bad = p.new_stats(32)
    bad.add_batch(torch.full((4, 32), float("nan")))
    with pytest.raises(RuntimeError, match="NaN"):
        p.prune(w, bad, SparsityTarget.unstructured(0.5))


def test_missing_tokens_is_a_user_error():
    for name in ("wanda", "sparsegpt"):
        p = get_pruner(name)
        with pytest.raises(LosaZeroError, match="no calibration tokens"):
            p.prune(torch.randn(4, 8), p.new_stats(8), SparsityTarget.unstructured(0.5))


# --- statistics are sums: the all-reduce property -----------------------------------------

@pytest.mark.parametrize("name,dtype", [("wanda", None), ("sparsegpt", "float32"), ("sparsegpt", "float64")])
def test_stats_halves_sum_to_whole(layer, name, dtype):
    w, x = layer
    p = get_pruner(name) if dtype is None else get_pruner(name, hessian_dtype=dtype)
    a, b = make_stats(p, x[:700]), make_stats(p, x[700:])
    whole = make_stats(p, x.reshape(8, 256, 256))  # any leading dims
    for ta, tb in zip(a.tensors(), b.tensors()):
        ta += tb  # what an all-reduce of two ranks does, in place
    assert a.count == whole.count == 2048
    for ta, tw in zip(a.tensors(), whole.tensors()):
        assert ta.dtype == tw.dtype
        torch.testing.assert_close(ta, tw, rtol=1e-4, atol=1e-3)
    if dtype == "float64":
        assert a.tensors()[0].dtype == torch.float64
    m_a = p.prune(w, a, SparsityTarget.nm_pattern(2, 4))[1]
    m_w = p.prune(w, whole, SparsityTarget.nm_pattern(2, 4))[1]
    assert (m_a != m_w).float().mean() < 0.01


def test_stats_reference_values():
    x = torch.randn(3, 5, 6, dtype=torch.float16)
    ws = WandaStats(6)
    ws.add_batch(x)
    xf = x.float().reshape(-1, 6)
    torch.testing.assert_close(ws.sum_sq, xf.square().sum(0))
    torch.testing.assert_close(ws.column_norms(), xf.norm(dim=0))
    hs = HessianStats(6)
    hs.add_batch(x)
    torch.testing.assert_close(hs.h_sum, xf.T @ xf)
    torch.testing.assert_close(hs.hessian(), 2 * xf.T @ xf / 15)
    assert ws.count == hs.count == 15
    assert [t.shape for t in hs.tensors()] == [(6, 6), (1,)]


# -- selection toward N:M -------------------------------------------------------------------------

def _reference_toward(score: torch.Tensor, per_row: int, n: int, m: int, prev: torch.Tensor | None) -> torch.Tensor:
    """Independent loop version: in each row, the candidates are the m - n lowest of every
    group (previously pruned first, then by score, then by index); the row prunes its
    ``per_row`` lowest candidates (previously pruned first)."""
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        def key(j):
            was_pruned = prev is not None and not bool(prev[r, j])
            return (0 if was_pruned else 1, float(score[r, j]), j)

        cands = []
        for g in range(0, cols, m):
            cands += sorted(range(g, g + m), key=key)[:m - n]
        for j in sorted(cands, key=key)[:per_row]:
            keep[r, j] = False
        if prev is not None:
            keep[r] &= prev[r]
    return keep


def test_toward_nm_keep_matches_reference():
    rng = random.Random(0)
    for trial in range(40):
        m = rng.choice([4, 8])
        n = rng.randint(1, m - 1)
        rows, cols = rng.randint(1, 6), m * rng.randint(1, 5)
        score = torch.randint(0, 6, (rows, cols)).float() if trial % 3 == 0 else torch.rand(rows, cols)
        prev = None
        if trial % 2:
            prev = torch.ones(rows, cols, dtype=torch.bool)
            for r in range(rows):  # up to m - n earlier prunes per group, as earlier steps leave them
                for g in range(0, cols, m):
                    for j in rng.sample(range(g, g + m), rng.randint(0, m - n)):
                        prev[r, j] = False
        per_row = rng.randint(0, cols * (m - n) // m)
        rate = per_row / cols
        got = toward_nm_keep(score, rate, n, m, prev, rounding="floor")
        assert torch.equal(got, _reference_toward(score, per_row, n, m, prev)), trial
        assert bool((got.reshape(rows, -1, m).sum(-1) >= n).all())
        if prev is not None:
            assert bool((got <= prev).all())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_steps_toward_2_4_end_exactly_2_4(method):
    """Cubic steps toward 50% capped at 2 pruned per group of 4, then 2:4: every step meets its
    rate, keeps what was pruned pruned, and the end is exact 2:4 (2 kept in every group)."""
    torch.manual_seed(0)
    w, x = torch.randn(24, 64), torch.randn(300, 64)
    pruner = get_pruner(method)
    stats = pruner.new_stats(64)
    if stats is not None:
        stats.add_batch(x)
    prev = None
    for rate in cubic_schedule(0.5, 5)[:-1]:
        _, keep = pruner.prune(w, stats, SparsityTarget.toward_nm(rate, 2, 4), prev_keep=prev)
        assert abs((1 - keep.float().mean().item()) - rate) <= 1 / w.numel() + 1e-9
        assert bool((keep.reshape(24, 16, 4).sum(-1) >= 2).all())
        assert prev is None or bool((keep <= prev).all())
        prev = keep
    new_w, keep = pruner.prune(w, stats, SparsityTarget.nm_pattern(2, 4), prev_keep=prev)
    assert bool((keep <= prev).all()) and bool((keep.reshape(24, 16, 4).sum(-1) == 2).all())
    assert bool((new_w[~keep] == 0).all())


def test_target_validation():
    assert SparsityTarget.toward_nm(0.3, 2, 4).describe() == "30.00% toward 2:4"
    assert SparsityTarget.toward_nm(0.5, 2, 4).rate == 0.5
    with pytest.raises(LosaZeroError, match="at most 0.5"):
        SparsityTarget.toward_nm(0.6, 2, 4)
    with pytest.raises(LosaZeroError):
        SparsityTarget(0.5, (2, 4), toward=(2, 4))
    with pytest.raises(LosaZeroError, match="divisible by 8"):
        get_pruner("magnitude").prune(torch.randn(4, 12), None, SparsityTarget.toward_nm(0.2, 4, 8))


@pytest.mark.parametrize("target", [SparsityTarget.unstructured(0.5), SparsityTarget.nm_pattern(2, 4)])
def test_sparsegpt_on_bf16_weights_computes_in_fp32_and_rounds_once(target):
    """A bf16 model (dtype auto on a GPU) is pruned by the same float32 arithmetic as its
    float32 copy: the same Hessian from bf16 activations (accumulated in fp32), the same mask,
    and the float32 result rounded once to bf16. No step of the OBS update runs in bf16, so a
    bf16 run differs from an fp32 one only through its bf16 inputs (weights and activations)."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(48, 64, generator=g) * 0.05).to(torch.bfloat16)
    x = (torch.randn(4, 32, 64, generator=g) * torch.linspace(0.1, 3, 64)).to(torch.bfloat16)
    p = get_pruner("sparsegpt", blocksize=32)
    w16, keep16 = p.prune(w, make_stats(p, x), target)
    w32, keep32 = p.prune(w.float(), make_stats(p, x.float()), target)
    assert w16.dtype == torch.bfloat16 and torch.equal(keep16, keep32)
    assert torch.equal(w16, w32.to(torch.bfloat16))
    update = w32.to(torch.bfloat16).float() - w.float()
    assert update[keep32].abs().max() > 0  # the survivors were updated: the equality above is not trivial
