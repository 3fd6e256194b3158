"""OWL: outlier-weighted layer-wise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity
(OWL)", ICML 2024); docs/method.md section 10.

A layer whose Wanda scores have many outliers is harder to prune, so it gets less sparsity:

* outlier ratio of layer l: the fraction of its weights (all 7 target linears together)
  whose Wanda score |W_ij| * ||x_j||_2 exceeds M times the layer's mean score (M = 5);
  on a partly pruned model (inside LoSA) only the surviving weights count;
* rates: the ratios mapped linearly onto a band of width 2 lambda (lambda = 0.08), more
  outliers -> lower sparsity, shifted so that the mean rate is exactly the target.

The published mapping spans the full 2 lambda and is shifted to mean S, which leaves the
band S +- lambda when the ratios are skewed (one layer far from the rest). We then shrink
the deviations around S uniformly just enough to stay inside S +- lambda; the ordering and
the mean are unchanged. The band is also narrowed where S +- lambda would leave [0, 1).

Statistics follow the block loop's rules: the Wanda input norms are sums all-reduced by
``collect_input_stats``, one block is gathered at a time, and every rank derives the same
ratios from the same gathered weights.
"""
from __future__ import annotations


import torch
from torch import nn

from ..allocation import _as_floats, check_target_and_band
from ..blockwise import Activations, collect_input_stats, forward_block
from ..lora import SparseLoRALinear
from ..modeling import decoder_layers, layer_linears
from ..pruners import WandaPruner
from ..runtime import Runtime
from .base import Allocation, Allocator, effective_weight


def layer_outlier_ratio(weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], m: float,
                        keeps: dict[str, torch.Tensor | None] | None = None) -> float:
    """Fraction of the layer's Wanda scores |W| * ||x|| above ``m`` times their mean over all
    the layer's linears together. With ``keeps`` (keep-masks; None = all alive) only the
    surviving weights count, in the mean and in the fraction: otherwise the zeros of an
    already pruned layer would pull its mean down and make it look outlier-rich (inside
    LoSA, where OWL runs on a partly pruned model). On a dense model both are the same."""
    keeps = keeps or {}
    total, count = 0.0, 0
    for name, w in weights.items():
        score = w.abs() * norms[name].to(w.device)[None, :]
        keep = keeps.get(name)
        if keep is not None:
            keep = keep.to(w.device)
            total += float(score[keep].double().sum())
            count += int(keep.sum())
        else:
            total += float(score.double().sum())
            count += score.numel()
    if count == 0:
        return 0.0
    threshold = m * total / count
    outliers = 0
    for name, w in weights.items():
        hit = w.abs() * norms[name].to(w.device)[None, :] > threshold
        keep = keeps.get(name)
        outliers += int((hit & keep.to(w.device)).sum()) if keep is not None else int(hit.sum())
    return outliers / count


@torch.no_grad()
def owl_outlier_ratios(model: nn.Module, acts: Activations, runtime: Runtime, batch_size: int,
                       m: float = 5.0) -> list[float]:
    """Outlier ratio of every decoder layer, each layer fed the outputs of the layers before
    it on the calibration set (the current model, unpruned by this pass). ``acts`` is
    consumed (it ends holding the last layer's outputs)."""
    ratios = []
    wanda = WandaPruner()
    layers = decoder_layers(model)
    for l in runtime.progress(range(len(layers)), desc="owl", unit="block"):
        block = layers[l]
        with runtime.gathered(block):
            stats = collect_input_stats(block, wanda, acts, runtime, batch_size, layer=l)
            linears = layer_linears(block)
            weights = {name: effective_weight(lin, runtime) for name, lin in linears.items()}
            norms = {name: stats[name].column_norms() for name in linears}
            keeps = {name: (lin.keep_mask() if isinstance(lin, SparseLoRALinear) else None)
                     for name, lin in linears.items()}
            ratios.append(layer_outlier_ratio(weights, norms, m, keeps))
            del weights, stats
            acts.hidden = forward_block(block, acts, batch_size, runtime.device, layer=l)
    return ratios


def owl_rates(ratios, target: float, lam: float = 0.08) -> list[float]:
    """Layer sparsity rates from outlier ratios: linear in the ratio (more outliers -> lower
    sparsity), mean exactly ``target``, every rate within ``target +- lam``."""
    r = _as_floats(ratios, "outlier ratios")
    target, lam = check_target_and_band(target, lam, "OWL lambda")
    L = len(r)
    lam = min(lam, target, (1.0 - target) / 2)  # stay inside [0, 1)
    lo, hi = min(r), max(r)
    if L == 1 or lam == 0 or hi - lo <= 1e-12 * max(abs(hi), abs(lo)):
        return [target] * L
    u = [(v - lo) / (hi - lo) for v in r]                 # 0 = fewest outliers, 1 = most
    mu = sum(u) / L
    dev = [2 * lam * (mu - v) for v in u]                 # published map: spans 2 lambda, mean 0
    worst = max(abs(d) for d in dev)
    if worst > lam:                                       # skewed ratios: shrink into the band
        dev = [d * lam / worst for d in dev]
    shift = sum(dev) / L                                  # float residue only
    return [min(target + lam, max(target - lam, target + d - shift)) for d in dev]


class OwlAllocator(Allocator):
    """Rates within target +- ``--owl-lambda`` from the outlier ratios (``--owl-m``), which
    are the layers' importance (more outliers, fewer weights pruned)."""

    name = "owl"
    mixed_nm = True

    def importance(self, model, calib, runtime):
        cfg = self.cfg
        return owl_outlier_ratios(model, calib.capture(), runtime, cfg.calib_batch_size, cfg.owl_m), None

    def allocate(self, model, calib, runtime, target, delta) -> Allocation:
        ratios, _ = self.importance(model, calib, runtime)
        return Allocation(owl_rates(ratios, target, self.cfg.owl_lambda), importance=ratios)
