"""OWL (outlier-weighted layer-wise sparsity): the rate map, the outlier ratio against a
direct count, a planted-outlier layer on the real model, and every allocation inside LoSA."""
from __future__ import annotations

import random

import pytest
import torch

from losa_zero.blockwise import capture_inputs
from losa_zero.config import LosaConfig, PruneConfig, build_config
from losa_zero.data import calibration_windows
from losa_zero.errors import LosaZeroError
from losa_zero.modeling import decoder_layers, layer_linears, load_model
from losa_zero.allocators.owl import layer_outlier_ratio, owl_outlier_ratios, owl_rates
from losa_zero.lifecycle import run_losa, run_prune
from losa_zero.runtime import Runtime


def test_rates_average_target_and_stay_in_band():
    rng = random.Random(0)
    for trial in range(200):
        L = rng.randint(2, 40)
        target = rng.choice([0.5, 0.7, rng.uniform(0.1, 0.9)])
        lam = rng.choice([0.08, 0.05, 0.2])
        ratios = [rng.uniform(0, 0.02) for _ in range(L)]
        if trial % 3 == 0:  # skewed: one layer far from the rest
            ratios[rng.randrange(L)] = 0.5
        rates = owl_rates(ratios, target, lam)
        band = min(lam, target, (1 - target) / 2)
        assert abs(sum(rates) / L - target) < 1e-12
        assert all(target - band - 1e-12 <= r <= target + band + 1e-12 for r in rates)
        assert all(0 <= r < 1 for r in rates)
        # more outliers -> lower (or equal) sparsity
        order = sorted(range(L), key=lambda i: ratios[i])
        assert all(rates[a] >= rates[b] - 1e-12 for a, b in zip(order, order[1:]))
        # unskewed ratios use the whole published span of 2 lambda... unless that leaves the band
        assert max(rates) - min(rates) <= 2 * band + 1e-12


def test_rates_published_map_when_inside_band():
    # symmetric ratios: the published linear map (span 2 lambda, shifted to the mean) is kept
    rates = owl_rates([0.0, 0.5, 1.0], 0.7, 0.08)
    assert rates == pytest.approx([0.78, 0.70, 0.62], abs=1e-12)
    assert owl_rates([0.1, 0.1, 0.1], 0.5, 0.08) == [0.5, 0.5, 0.5]
    assert owl_rates([0.3], 0.5, 0.08) == [0.5]
    with pytest.raises(LosaZeroError):
        owl_rates([0.1, 0.2], 1.0, 0.08)


def test_outlier_ratio_direct_count():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(8, 16, generator=g), "b": torch.randn(4, 8, generator=g)}
    norms = {"a": torch.rand(16, generator=g) * 3, "b": torch.rand(8, generator=g)}
    scores = torch.cat([(weights[k].abs() * norms[k][None, :]).reshape(-1) for k in weights])
    for m in (0.5, 1.0, 2.0, 3.0):
        expected = float((scores > m * scores.mean()).double().mean())
        assert layer_outlier_ratio(weights, norms, m) == pytest.approx(expected, abs=1e-12)
    # only surviving weights count (a pruned layer's zeros must not make it look outlier-rich)
    keeps = {"a": torch.rand(8, 16, generator=g) > 0.5, "b": None}
    alive = torch.cat([scores[:128][keeps["a"].reshape(-1)], scores[128:]])
    pruned = {"a": weights["a"] * keeps["a"], "b": weights["b"]}
    for m in (1.0, 2.0):
        expected = float((alive > m * alive.mean()).double().mean())
        assert layer_outlier_ratio(pruned, norms, m, keeps) == pytest.approx(expected, abs=1e-12)


def test_planted_outliers_get_lower_sparsity(stories_model_dir, tinystories_split):
    _, train_txt = tinystories_split
    model, tok = load_model(stories_model_dir)
    calib = calibration_windows(tok, str(train_txt), 16, 512, seed=0)
    runtime = Runtime("cpu")
    base = owl_outlier_ratios(model, capture_inputs(model, calib, runtime, 8), runtime, 8, 5.0)
    g = torch.Generator().manual_seed(0)
    planted = 2
    with torch.no_grad():
        for lin in layer_linears(decoder_layers(model)[planted]).values():
            hit = torch.rand(lin.weight.shape, generator=g) < 0.02  # 2% of the weights x 20
            lin.weight[hit] *= 20
    ratios = owl_outlier_ratios(model, capture_inputs(model, calib, runtime, 8), runtime, 8, 5.0)
    print("\noutlier ratios before:", [round(r, 4) for r in base], "after planting:", [round(r, 4) for r in ratios])
    assert ratios[planted] > max(r for i, r in enumerate(ratios) if i != planted)
    rates = owl_rates(ratios, 0.5, 0.08)
    assert rates[planted] == min(rates) and rates[planted] < 0.5


@pytest.fixture(scope="module")
def common(stories_model_dir, tinystories_split):
    eval_txt, train_txt = tinystories_split
    return {"model": str(stories_model_dir), "calib": str(train_txt), "ppl": [str(eval_txt)], "seqlen": 512,
            "nsamples": 32, "eval_seqlen": 512}


def test_owl_one_shot(common, tmp_path):
    s = run_prune(build_config(PruneConfig, common, {"method": "wanda", "sparsity": 0.7, "allocation": "owl",
                                                     "out": str(tmp_path / "o")}))
    rates = [row["rate"] for row in s["per_layer"]]
    print("\nOWL 70% rates:", [round(r, 4) for r in rates], "ppl", round(s["perplexity"]["eval.txt"]["ppl"], 3))
    assert abs(sum(rates) / len(rates) - 0.7) < 1e-12
    assert all(0.62 - 1e-12 <= r <= 0.78 + 1e-12 for r in rates) and max(rates) - min(rates) > 0.05
    assert abs(s["achieved_sparsity"] - 0.7) < 0.002
    for row in s["per_layer"]:
        assert abs(row["sparsity"] - row["rate"]) < 0.002
        assert row["importance"] is not None  # the outlier ratio


@pytest.mark.parametrize("allocation", ["uniform", "rmi", "owl"])
def test_losa_with_allocation_end_to_end(allocation, common, tinystories_split, tmp_path):
    _, train_txt = tinystories_split
    s = run_losa(build_config(LosaConfig, common, {
        "train": str(train_txt), "sparsity": 0.5, "allocation": allocation, "steps": 2, "samples_per_step": 16,
        "final_step_samples": 16, "max_length": 128, "nsamples": 8, "cka_nsamples": 8, "optimizer": "adamw",
        "ppl": [], "out": str(tmp_path / allocation)}))
    assert s["allocation"] == allocation and len(s["steps"]) == 2
    assert abs(s["achieved_sparsity"] - 0.5) < 0.005
    for step in s["steps"]:
        rates = [layer["rate"] for layer in step["layers"]]
        assert abs(sum(rates) / len(rates) - step["target"]) < 1e-9
        if allocation == "owl":
            assert all(abs(r - step["target"]) <= 0.08 + 1e-12 for r in rates)
            assert all(layer["importance"] is not None for layer in step["layers"])
