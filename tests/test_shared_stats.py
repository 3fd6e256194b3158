"""Shared statistics per input group and linear-time mask selection give exactly today's
masks and weights: the grouped block loop against the per-linear one (every linear its own
group), and the k-th value selection against the stable full sort it replaced, on scores
with many ties."""
from __future__ import annotations

import copy

import pytest
import torch

import losa_zero.blockwise as blockwise
import losa_zero.pruners.sparsegpt as sparsegpt_mod
from losa_zero.blockwise import capture_inputs, collect_input_stats, sequential_prune
from losa_zero.modeling import decoder_layers, input_groups, target_names
from losa_zero.pruners import SparsityTarget, WandaStats, get_pruner, lowest_k_keep, nm_keep, rowwise_keep
from losa_zero.pruners.masks import count_to_prune
from losa_zero.runtime import Runtime


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _prune(model, method, target, per_linear: bool, monkeypatch):
    calls = []
    real = sparsegpt_mod.inverse_hessian_cholesky

    def counting(h, percdamp, retries=3):
        calls.append(h.shape[0])
        return real(h, percdamp, retries)

    with monkeypatch.context() as mp:
        mp.setattr(sparsegpt_mod, "inverse_hessian_cholesky", counting)
        names = target_names(model)
        if per_linear:
            mp.setattr(blockwise, "input_groups", lambda layer: [(name,) for name in names])
        ids = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))
        runtime = Runtime("cpu")
        acts = capture_inputs(model, ids, runtime, 4)
        sequential_prune(model, acts, get_pruner(method), lambda l: {n: target for n in names}, runtime, 4)
    return calls


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("target", [SparsityTarget.unstructured(0.6), SparsityTarget.nm_pattern(2, 4)],
                         ids=["60%", "2:4"])
def test_shared_statistics_give_the_per_linear_weights(method, target, monkeypatch):
    base = _tiny_llama()
    grouped, per_linear = copy.deepcopy(base), copy.deepcopy(base)
    calls_grouped = _prune(grouped, method, target, False, monkeypatch)
    calls_single = _prune(per_linear, method, target, True, monkeypatch)
    for (name, a), (_, b) in zip(grouped.named_parameters(), per_linear.named_parameters()):
        assert torch.equal(a, b), name
    if method == "sparsegpt":  # one factorisation per input group: 4 per layer instead of 7
        assert len(calls_single) == 7 * 2 and len(calls_grouped) == 4 * 2
        assert calls_grouped == [64, 64, 64, 160] * 2


def test_one_statistics_object_per_input_group():
    model = _tiny_llama()
    layer = decoder_layers(model)[0]
    runtime = Runtime("cpu")
    acts = capture_inputs(model, torch.randint(0, 97, (2, 16)), runtime, 2)
    stats = collect_input_stats(layer, get_pruner("wanda"), acts, runtime, 2, layer=0)
    groups = input_groups(layer)
    assert [len(g) for g in groups] == [3, 1, 2, 1]
    assert len({id(s) for s in stats.values()}) == 4
    for g in groups:
        assert all(stats[n] is stats[g[0]] for n in g)
    assert stats["self_attn.q_proj"].count == 2 * 16


def test_widened_vector_sums_round_back_after_reduce():
    s = WandaStats(5).widen_vector_sums()
    assert s.sum_sq.dtype == torch.float64
    s.add_batch(torch.randn(7, 5))
    s.reduced()
    assert s.sum_sq.dtype == torch.float32 and s.count == 7


# -- selection against the stable full sort it replaced ---------------------------------------

def _sorted_rowwise(score, rate, prev_keep=None, rounding="nearest"):
    rows, cols = score.shape
    s = score if prev_keep is None else score.masked_fill(~prev_keep, float("-inf"))
    if rounding == "floor":
        per_row = torch.full((rows,), int(cols * rate), dtype=torch.int64)
    else:
        q, rem = divmod(count_to_prune(rate, rows * cols), rows)
        per_row = torch.full((rows,), q, dtype=torch.int64)
        if rem:
            nxt = torch.sort(s, dim=1, stable=True).values[:, q]
            per_row[torch.sort(nxt, stable=True).indices[:rem]] += 1
    idx = torch.sort(s, dim=1, stable=True).indices
    keep = torch.empty(rows, cols, dtype=torch.bool).scatter_(1, idx, torch.arange(cols)[None, :] >= per_row[:, None])
    return keep if prev_keep is None else keep & prev_keep


def _sorted_lowest(score, k, prev_keep=None):
    flat = (score if prev_keep is None else score.masked_fill(~prev_keep, float("-inf"))).reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:min(max(k, 0), flat.numel())]] = False
    keep = keep.reshape(score.shape)
    return keep if prev_keep is None else keep & prev_keep


def _tied_scores(trial):
    g = torch.Generator().manual_seed(trial)
    rows, cols = int(torch.randint(1, 13, (1,), generator=g)), 4 * int(torch.randint(1, 10, (1,), generator=g))
    levels = int(torch.randint(1, 5, (1,), generator=g))  # 1 level: every score tied
    score = torch.randint(0, levels, (rows, cols), generator=g).float()
    if trial % 2:
        score = -score  # with -0.0 == 0.0 ties
    prev = (torch.rand(rows, cols, generator=g) < 0.7) if trial % 3 == 0 else None
    rate = float(torch.rand(1, generator=g)) * 0.95
    return score, prev, rate


@pytest.mark.parametrize("trial", range(60))
def test_selection_equals_stable_sort_with_ties(trial):
    score, prev, rate = _tied_scores(trial)
    for rounding in ("nearest", "floor"):
        assert torch.equal(rowwise_keep(score, rate, prev, rounding), _sorted_rowwise(score, rate, prev, rounding))
    for k in (0, 1, score.numel() // 3, score.numel() - 1, score.numel(), score.numel() + 2):
        assert torch.equal(lowest_k_keep(score, k, prev), _sorted_lowest(score, k, prev))
    # N:M keeps its stable per-group sort; checked here on the same tied scores
    m = 4
    ref = torch.ones_like(score, dtype=torch.bool)
    s = score if prev is None else score.masked_fill(~prev, float("-inf"))
    for c in range(0, score.shape[1], m):
        idx = torch.sort(s[:, c:c + m], dim=1, stable=True).indices[:, :m - 2]
        ref[:, c:c + m].scatter_(1, idx, False)
    if prev is not None:
        ref &= prev
    assert torch.equal(nm_keep(score, 2, m, prev), ref)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_statistics_forward_stops_after_the_last_input(method, monkeypatch):
    """A statistics forward stops once every input group of the batch is recorded: the
    block's last linear (down_proj) never computes its product, and the statistics equal
    those of the whole forward (what the ZeRO-3 runtime still runs)."""
    model = _tiny_llama()
    block = decoder_layers(model)[0]
    ids = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(1))
    runtime = Runtime("cpu")
    acts = capture_inputs(model, ids, runtime, 4)
    ran = []
    handle = block.mlp.down_proj.register_forward_hook(lambda m, i, o: ran.append(o.shape))
    stopped = collect_input_stats(block, get_pruner(method), acts, runtime, 4, layer=0)
    assert ran == []  # 6 sequences in batches of 4: two forwards, both cut before its product
    monkeypatch.setattr(runtime, "stop_after_inputs", False)
    whole = collect_input_stats(block, get_pruner(method), acts, runtime, 4, layer=0)
    handle.remove()
    assert len(ran) == 2
    assert set(stopped) == set(whole)
    for name in stopped:
        for a, b in zip(stopped[name].tensors(), whole[name].tensors()):
            assert torch.equal(a, b), name
