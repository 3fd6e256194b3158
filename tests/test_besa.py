"""BESA (docs/method.md section 9): the hard mask against a brute-force ranking, the straight-through
gradient against finite differences, per-row targets through every pruner, and BESA on the
real stories260K model, one-shot and inside LoSA."""
from __future__ import annotations

import math

import pytest
import torch

from losa_zero.allocators.besa import (N_CANDIDATES, BesaOptions, LinearRates, candidate_probs, default_d_coef,
                            reconstruction_loss, sparsity_penalty)
from losa_zero.config import LosaConfig, PruneConfig, build_config
from losa_zero.errors import LosaZeroError
from losa_zero.lifecycle import run_losa, run_prune
from losa_zero.pruners import SparsityTarget, get_pruner, row_counts_keep

NSAMPLES = 32  # reduced calibration set: 32 x 512 tokens


def brute_force_keep(score, counts, prev_keep=None):
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        key = [(-math.inf if prev_keep is not None and not prev_keep[r, j] else float(score[r, j]), j)
               for j in range(cols)]
        for _, j in sorted(key)[:int(counts[r])]:
            keep[r, j] = False
    if prev_keep is not None:
        keep &= prev_keep
    return keep


@pytest.mark.parametrize("granularity", ["row", "layer"])
@pytest.mark.parametrize("sigmoid", [True, False])
@pytest.mark.parametrize("with_prev", [False, True])
def test_hard_mask_is_floor_lowest_ranked(granularity, sigmoid, with_prev):
    g = torch.Generator().manual_seed(3)
    rows, cols = 7, 37
    score = torch.rand(rows, cols, generator=g)
    score[:, 5] = score[:, 6]  # ties break by index
    prev = (torch.rand(rows, cols, generator=g) > 0.3) if with_prev else None
    lr = LinearRates(score, prev, granularity, sigmoid)
    with torch.no_grad():
        lr.theta.copy_(3 * torch.randn(lr.theta.shape, generator=g))
    mask, rates = lr.mask()
    p = torch.arange(N_CANDIDATES) / 100
    pi = candidate_probs(lr.theta.detach().double(), sigmoid).expand(rows, -1)
    prev_frac = torch.zeros(rows, 1) if prev is None else (~prev).sum(1, keepdim=True) / cols
    ref_rates = (pi * torch.maximum(p[None, :].double(), prev_frac.double())).sum(1)
    torch.testing.assert_close(rates.double(), ref_rates, atol=1e-6, rtol=0)
    counts = torch.floor(rates.detach() * cols).long()
    if prev is not None:
        counts = torch.maximum(counts, (~prev).sum(1))
    ref = brute_force_keep(score, counts, prev)
    assert torch.equal(mask.detach() > 0.5, ref)
    torch.testing.assert_close(mask.detach(), ref.float(), atol=1e-6, rtol=0)  # forward = hard mask
    assert torch.equal(row_counts_keep(score, counts, prev), ref)  # what the pruners realise
    # soft keep probability 1 - sum_d pi_d [rank < C p_d] against a direct sum
    soft = lr.soft_keep().detach().double()
    ranks = torch.empty(rows, cols, dtype=torch.long)
    for r in range(rows):
        key = [(-math.inf if prev is not None and not prev[r, j] else float(score[r, j]), j) for j in range(cols)]
        for k, (_, j) in enumerate(sorted(key)):
            ranks[r, j] = k
    direct = 1 - (pi[:, None, :] * (ranks[:, :, None] < cols * p[None, None, :]).double()).sum(-1)
    if prev is not None:
        direct = direct * prev.double()
    torch.testing.assert_close(soft, direct, atol=1e-6, rtol=0)


def test_straight_through_gradient_matches_finite_differences():
    """The STE gradient at theta0 is the exact gradient of
    f(theta) = L(W ⊙ (hard0 - soft(theta0) + soft(theta))) + penalty(theta)."""
    torch.manual_seed(0)
    rows, cols, tokens = 3, 10, 6
    w = torch.randn(rows, cols, dtype=torch.float64)
    x = torch.randn(tokens, cols, dtype=torch.float64)
    y = x @ w.T
    ms = y.square().mean(0)
    score = w.abs() * x.norm(dim=0)[None, :]
    for granularity in ("row", "layer"):
        for sigmoid in (True, False):
            lr = LinearRates(score, None, granularity, sigmoid, dtype=torch.float64)
            with torch.no_grad():
                lr.theta.copy_(torch.randn(lr.theta.shape, dtype=torch.float64))

            def loss_of(mask, rates):
                out = x @ (w * mask).T
                return reconstruction_loss(out, y, ms) + sparsity_penalty(rates.mean(), 0.5, 5.0)

            mask, rates = lr.mask()
            loss_of(mask, rates).backward()
            grad = lr.theta.grad.clone()
            theta0 = lr.theta.detach().clone()
            with torch.no_grad():
                hard0 = lr.hard_keep(lr.counts(rates)).double()
                soft0 = lr.soft_keep()

            def f(theta):
                with torch.no_grad():
                    lr.theta.copy_(theta)
                    pi = lr.probs()
                    surrogate = hard0 - soft0 + lr.soft_keep(pi)
                    return float(loss_of(surrogate, lr.expected_rates(pi)))

            fd = torch.zeros_like(theta0)
            eps = 1e-6
            for idx in [(i, d) for i in range(theta0.shape[0]) for d in (0, 7, 33, 50, 64, 99, 100)]:
                tp, tm = theta0.clone(), theta0.clone()
                tp[idx] += eps
                tm[idx] -= eps
                fd[idx] = (f(tp) - f(tm)) / (2 * eps)
                assert abs(fd[idx] - grad[idx]) <= 1e-6 + 1e-5 * abs(grad[idx]), (granularity, sigmoid, idx)
            assert grad.abs().sum() > 0


def test_options_and_defaults():
    assert BesaOptions().use_sigmoid(0.5) and BesaOptions().use_sigmoid(0.6)
    assert not BesaOptions().use_sigmoid(0.7)   # out of the sigmoid's reach
    assert not BesaOptions().use_sigmoid(0.3)
    assert not BesaOptions().use_sigmoid(0.5, pruned_before=True)  # LoSA steps after the first
    assert BesaOptions(sigmoid="on").use_sigmoid(0.7) and not BesaOptions(sigmoid="off").use_sigmoid(0.5)
    assert [default_d_coef(n) for n in (260e3, 6.7e9, 13e9, 32.5e9, 65e9, 70e9)] == [5, 5, 5, 10, 50, 50]
    with pytest.raises(LosaZeroError):
        BesaOptions(granularity="column")
    # the sigmoid variant's reachable range (docs/method.md §9.4)
    p = torch.arange(N_CANDIDATES, dtype=torch.float64) / 100
    hi = max(float((candidate_probs(torch.full((N_CANDIDATES,), -50.0, dtype=torch.float64).masked_fill(p > t, 50),
                                    True) * p).sum()) for t in p.tolist())
    assert 0.62 < hi < 0.63


def test_per_row_target_validation():
    t = SparsityTarget.per_row([1, 2, 3], 4)
    assert t.is_per_row and t.rate == 0.5 and t.describe() == "per-row 50.00%"
    assert SparsityTarget.per_row(torch.tensor([4, 4]), 4).rate == 1.0  # a whole linear may go
    for bad in ([5], [-1], []):
        with pytest.raises(LosaZeroError):
            SparsityTarget.per_row(bad, 4)
    with pytest.raises(ValueError):
        get_pruner("magnitude").prune(torch.randn(2, 4), None, SparsityTarget.per_row([1, 2, 3], 4))


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
def test_every_pruner_realises_per_row_counts(name):
    g = torch.Generator().manual_seed(0)
    rows, cols = 24, 200  # ragged SparseGPT blocks (128 + 72)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(512, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    counts = torch.randint(0, cols + 1, (rows,), generator=g)
    p = get_pruner(name)
    stats = p.new_stats(cols)
    if stats is not None:
        stats.add_batch(x)
    new_w, keep = p.prune(w, stats, SparsityTarget.per_row(counts, cols))
    assert torch.equal((~keep).sum(1), counts)
    assert torch.all(new_w[~keep] == 0)
    if name == "wanda":
        assert torch.equal(keep, brute_force_keep(w.abs() * stats.column_norms()[None, :], counts))
    prev = torch.rand(rows, cols, generator=g) > 0.2
    _, keep = p.prune(w * prev, stats, SparsityTarget.per_row(counts, cols), prev_keep=prev)
    assert not (keep & ~prev).any()
    assert torch.equal((~keep).sum(1), torch.maximum(counts, (~prev).sum(1)))


# --- on the real model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def common(stories_model_dir, tinystories_split):
    eval_txt, train_txt = tinystories_split
    return {"model": str(stories_model_dir), "calib": str(train_txt), "ppl": [str(eval_txt)], "seqlen": 512,
            "nsamples": NSAMPLES, "eval_seqlen": 512}


def _ppl(summary):
    return summary["perplexity"]["eval.txt"]["ppl"]


def test_besa_50_beats_uniform_wanda(common, tmp_path):
    wanda = run_prune(build_config(PruneConfig, common, {"method": "wanda", "sparsity": 0.5, "out": str(tmp_path / "w")}))
    besa = run_prune(build_config(PruneConfig, common, {"method": "wanda", "sparsity": 0.5, "allocation": "besa",
                                                        "out": str(tmp_path / "b")}))
    print(f"\nWanda 50%: ppl {_ppl(wanda):.3f}; BESA 50%: ppl {_ppl(besa):.3f} at {besa['achieved_sparsity']:.4f}")
    assert abs(besa["achieved_sparsity"] - 0.5) <= 0.01
    assert _ppl(besa) < _ppl(wanda)
    # rows really differ (a learned allocation, not uniform), and the Wanda pruner realised
    # exactly BESA's counts, linear by linear
    per_linear = besa["per_linear_sparsity"]
    rates = set()
    for row in besa["per_layer"]:
        assert abs(row["rate"] - row["sparsity"]) < 1e-12
        for name, value in row["besa"]["linear_rates"].items():
            assert per_linear[f"model.layers.{row['layer']}.{name}"] == pytest.approx(value, abs=1e-12)
            rates.add(round(value, 6))
    assert len(rates) > 1


def test_besa_layer_granularity_and_sparsegpt(common, tmp_path):
    s = run_prune(build_config(PruneConfig, common, {"method": "sparsegpt", "sparsity": 0.5, "allocation": "besa",
                                                     "besa_granularity": "layer", "nsamples": 8, "ppl": [],
                                                     "out": str(tmp_path / "s")}))
    assert abs(s["achieved_sparsity"] - 0.5) <= 0.02
    for row in s["per_layer"]:
        for name, value in row["besa"]["linear_rates"].items():
            assert s["per_linear_sparsity"][f"model.layers.{row['layer']}.{name}"] == pytest.approx(value, abs=1e-12)


def test_besa_with_nm_is_rejected(common, tmp_path):
    with pytest.raises(LosaZeroError):
        build_config(PruneConfig, common, {"nm": "2:4", "allocation": "besa", "out": str(tmp_path / "x")})


def test_losa_with_besa_end_to_end(common, tinystories_split, tmp_path):
    _, train_txt = tinystories_split
    s = run_losa(build_config(LosaConfig, common, {
        "train": str(train_txt), "sparsity": 0.5, "allocation": "besa", "steps": 2, "samples_per_step": 16,
        "final_step_samples": 16, "max_length": 128, "nsamples": 8, "optimizer": "adamw", "ppl": [],
        "out": str(tmp_path / "l")}))
    assert s["allocation"] == "besa" and len(s["steps"]) == 2
    for step in s["steps"]:
        for layer in step["layers"]:
            # the step's Wanda pruner realised BESA's learned counts exactly
            assert layer["rate"] == pytest.approx(layer["sparsity"], abs=1e-12)
    assert 0.3 < s["achieved_sparsity"] < 0.75


# --- same answer on 1 rank or 2 ------------------------------------------------------------

def _dist_worker(rank, world, port, model_dir, ids, out_path):
    import os

    import torch.distributed as dist

    from losa_zero.allocators.besa import besa_allocate
    from losa_zero.blockwise import capture_inputs
    from losa_zero.modeling import load_model
    from losa_zero.runtime import Runtime

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)

    class TwoRankRuntime(Runtime):
        """Contiguous shares of the calibration sequences, sums all-reduced over gloo, float64
        Wanda sums (as the ZeRO-3 runtime)."""

        def all_reduce_sum_(self, tensors):
            if world > 1:
                for t in tensors:
                    dist.all_reduce(t)

        def local_indices(self, n):
            return list(range(n * rank // world, n * (rank + 1) // world))

        def new_stats(self, pruner, in_features):
            stats = pruner.new_stats(in_features, device=self.device)
            stats.sum_sq = stats.sum_sq.double()
            return stats

    runtime = TwoRankRuntime("cpu")
    runtime.rank, runtime.world_size = rank, world
    model, _ = load_model(model_dir)
    acts = capture_inputs(model, ids[runtime.local_indices(ids.shape[0])], runtime, 1)
    alloc = besa_allocate(model, acts, runtime, 0.5, BesaOptions(epochs=4), 1)
    if rank == 0:
        torch.save([{k: t.row_counts for k, t in b.items()} for b in alloc.targets], out_path)
    if world > 1:
        dist.destroy_process_group()


def test_same_allocation_on_one_or_two_ranks(stories_model_dir, tmp_path):
    """BESA's batch-1 steps follow the global sequence order whatever the number of ranks,
    so 2 gloo processes holding 3 sequences each learn what 1 process holding 6 learns."""
    import socket

    import torch.multiprocessing as mp

    ids = torch.randint(3, 512, (6, 64), generator=torch.Generator().manual_seed(0))
    _dist_worker(0, 1, 0, str(stories_model_dir), ids, tmp_path / "one.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(stories_model_dir), ids, tmp_path / "two.pt"), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one == two
