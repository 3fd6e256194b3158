"""BESA: blockwise parameter-efficient sparsity allocation (Xu et al., ICLR 2024), written
from its description in docs/method.md section 9 (items cited below as "docs/method.md §9.N").

Block by block, learn how many weights every output row (``granularity="row"``, the
published headline) or every linear (``"layer"``) of the block drops, by gradient descent on
the block's reconstruction error under a penalty that holds the block's mean sparsity at
the target. Which weights drop is fixed by the Wanda ranking; surviving weights are never
changed by BESA.

Here BESA is an *allocation*: :func:`besa_allocate` returns, for every linear, the per-row
pruned counts floor(s_r * C) it learned (a :meth:`SparsityTarget.per_row`); a pruner then
realises them. With the Wanda pruner the realised masks are exactly BESA's masks (same
scores from the same inputs, same stable ranking), i.e. published BESA; with SparseGPT the
counts are BESA's and the choice of weights and the update of the survivors are OBS's; with
magnitude the ranking is |W|. While learning, each block's masks are applied functionally
(the stored weights are not written), and the masked block's output on X_p becomes the next
block's input (docs/method.md §9.8), so the allocation is learned on the pruned chain.

Generalisations the doc does not cover, needed inside LoSA (the weights are LoSA's merged
weights and some are already pruned): weights outside the previous keep-mask rank lowest
and stay pruned, and a row's expected rate is sum_d pi_d max(p_d, prev_r / C), the expected
*realised* rate, so the penalty sees the sparsity the row really has.

The logits start at 0 as released (docs/method.md §9.3): the expected rate starts at 0.5
whatever the target. (Tried: starting the logits at the target instead was clearly worse on
the fixture at 70%, perplexity 109 against 72, so the released initialisation stays.)

ZeRO-3: one block is gathered at a time; the logits exist only while their block is
processed; the Wanda norms and the reconstruction normaliser are sums all-reduced over
ranks; the batch-1 steps visit the calibration sequences in their global order, the rank
holding the sequence computing the gradient and an all-reduce handing it to every rank, so
every rank holds the same logits and the result does not depend on the number of ranks
(ranks do not speed BESA up; they share its memory).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blockwise import Activations, call_block, collect_input_stats, forward_block
from ..errors import LosaZeroError
from ..lora import SparseLoRALinear
from ..modeling import decoder_layers, layer_linears
from ..pruners import SparsityTarget, WandaPruner
from ..runtime import Runtime
from .base import Allocation, Allocator, effective_weight

log = logging.getLogger("losa_zero")

#: candidate rates p_d = d / 100, d = 0..100 (docs/method.md §9.3)
N_CANDIDATES = 101
#: the sigmoid variant keeps every rate inside about [0.376, 0.624] (docs/method.md §9.4), so
#: "auto" uses it only for targets in this range (the published 50% included) and drops it
#: outside, at high sparsity and also at the low targets of LoSA's first steps
SIGMOID_AUTO_RANGE = (0.4, 0.6)


def default_d_coef(n_params: int) -> float:
    """Released Prodigy d_coef by model size (docs/method.md §9.7): 5 for 7B/13B, 10 for
    30B, 50 for 65B/70B. Decided by parameter count: below 20B -> 5, below 50B -> 10,
    else 50 (so every smaller model, the fixtures included, gets 5)."""
    if n_params < 20e9:
        return 5.0
    if n_params < 50e9:
        return 10.0
    return 50.0


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model; under ZeRO-3 a partitioned parameter reports its full size
    as ``ds_numel``."""
    return int(sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()))


@dataclass
class BesaOptions:
    """BESA's knobs (CLI ``--besa-*``). Defaults are the released ones (docs/method.md §9.3-9.7)."""

    granularity: str = "row"        # "row" (published headline) or "layer" (one rate per linear)
    sigmoid: str = "auto"           # "auto" | "on" | "off"
    lam: float = 5.0                # penalty weight lambda
    d_coef: float | None = None     # Prodigy d_coef (None: by model size)
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.granularity not in ("row", "layer"):
            raise LosaZeroError(f"BESA granularity must be 'row' or 'layer', got {self.granularity!r}")
        if self.sigmoid not in ("auto", "on", "off"):
            raise LosaZeroError(f"BESA sigmoid must be auto, on or off, got {self.sigmoid!r}")
        if not self.lam >= 0 or self.epochs < 1 or (self.d_coef is not None and not self.d_coef > 0):
            raise LosaZeroError("BESA needs lambda >= 0, epochs >= 1 and d_coef > 0")

    @classmethod
    def from_config(cls, cfg) -> "BesaOptions":
        return cls(granularity=cfg.besa_granularity, sigmoid=cfg.besa_sigmoid, lam=cfg.besa_lambda,
                   d_coef=cfg.besa_d_coef, epochs=cfg.besa_epochs)

    def use_sigmoid(self, target: float, pruned_before: bool = False) -> bool:
        """Whether pi = softmax(sigmoid(theta)). "auto": only for targets the sigmoid's band
        reaches, and only on a block none of whose weights are pruned yet: inside LoSA a
        row's rate cannot drop below what it already lost, and the band above that floor
        then no longer reaches the step's target."""
        if self.sigmoid == "auto":
            return not pruned_before and SIGMOID_AUTO_RANGE[0] <= target <= SIGMOID_AUTO_RANGE[1]
        return self.sigmoid == "on"


def _candidates(device=None, dtype=torch.float32) -> Tensor:
    return torch.arange(N_CANDIDATES, device=device, dtype=dtype) / (N_CANDIDATES - 1)


def candidate_probs(theta: Tensor, sigmoid: bool) -> Tensor:
    """pi = softmax(sigmoid(theta)) (released default) or softmax(theta) (docs/method.md §9.4)."""
    return torch.softmax(torch.sigmoid(theta) if sigmoid else theta, dim=-1)


class LinearRates:
    """The learnable sparsity allocation of one linear (docs/method.md §9.2-9.5).

    ``score`` is the Wanda importance of every weight; ``prev_keep`` marks weights still
    alive (None: all). Every row is ranked ascending once (stable, ties by index, entries
    outside ``prev_keep`` first), exactly as :func:`~losa_zero.pruners.row_counts_keep`
    ranks them, so the final hard mask and the pruner's mask coincide.
    """

    def __init__(self, score: Tensor, prev_keep: Tensor | None, granularity: str, sigmoid: bool,
                 dtype: torch.dtype = torch.float32):
        rows, cols = score.shape
        self.rows, self.cols, self.sigmoid = rows, cols, sigmoid
        device = score.device
        s = score if prev_keep is None else score.masked_fill(~prev_keep, float("-inf"))
        order = torch.sort(s, dim=1, stable=True).indices
        ranks = torch.arange(cols, device=device, dtype=torch.int64).expand(rows, cols)
        index_dtype = torch.int32 if cols < 2 ** 31 else torch.int64
        # rank[r, j]: position of weight j in row r's ascending order (int32 to halve memory).
        self.rank = torch.empty(rows, cols, dtype=torch.int64, device=device).scatter_(1, order, ranks).to(index_dtype)
        del order, s
        self.prev_count = (torch.zeros(rows, dtype=torch.int64, device=device) if prev_keep is None
                           else (~prev_keep).sum(1).to(torch.int64))
        # Weight with rank k is pruned by candidate d iff k < C p_d  <=>  d >= floor(100 k / C) + 1.
        self.first_pruning_d = (100 * torch.arange(cols, device=device, dtype=torch.int64)) // cols + 1
        self.p = _candidates(device, dtype)
        n_theta = rows if granularity == "row" else 1
        self.theta = torch.zeros(n_theta, N_CANDIDATES, device=device, dtype=dtype, requires_grad=True)

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def probs(self) -> Tensor:
        return candidate_probs(self.theta, self.sigmoid)

    def expected_rates(self, pi: Tensor | None = None) -> Tensor:
        """s_r = sum_d pi_d max(p_d, prev_r / C), one per row (docs/method.md §9.4)."""
        pi = self.probs() if pi is None else pi
        floor_rate = (self.prev_count.to(self.p.dtype) / self.cols)[:, None]
        return (pi * torch.maximum(self.p[None, :], floor_rate)).sum(-1).expand(self.rows)

    def counts(self, rates: Tensor) -> Tensor:
        """Hard per-row pruned counts floor(s_r * C) (docs/method.md §9.5), never below the
        weights already pruned."""
        c = torch.floor(rates.detach() * self.cols).to(torch.int64)
        return torch.maximum(c.clamp(0, self.cols), self.prev_count)

    def hard_keep(self, counts: Tensor) -> Tensor:
        """Keep everything but the ``counts[r]`` lowest-ranked weights of every row."""
        return self.rank >= counts[:, None].to(self.rank.dtype)

    def soft_keep(self, pi: Tensor | None = None) -> Tensor:
        """1 - sum_d pi_d [rank < C p_d]: the keep probability of every weight, zero for the
        weights already pruned (docs/method.md §9.5)."""
        pi = self.probs() if pi is None else pi
        tail = torch.flip(torch.cumsum(torch.flip(pi, [-1]), -1), [-1])      # sum_{d' >= d} pi_d'
        tail = torch.cat([tail, tail.new_zeros(tail.shape[0], 1)], -1)       # d = 101: nothing
        keep_by_rank = 1.0 - tail[:, self.first_pruning_d]                     # [n_theta, C]
        keep_by_rank = keep_by_rank.expand(self.rows, self.cols)
        soft = torch.gather(keep_by_rank, 1, self.rank.to(torch.int64))
        if bool((self.prev_count > 0).any()):
            soft = soft * (self.rank >= self.prev_count[:, None].to(self.rank.dtype))
        return soft

    def mask(self) -> tuple[Tensor, Tensor]:
        """(straight-through mask, expected row rates): forward = hard mask, gradient through
        the soft keep probabilities: mask = hard - soft.detach() + soft (docs/method.md §9.5)."""
        pi = self.probs()
        rates = self.expected_rates(pi)
        soft = self.soft_keep(pi)
        hard = self.hard_keep(self.counts(rates)).to(soft.dtype)
        return hard - soft.detach() + soft, rates


def reconstruction_loss(out: Tensor, dense: Tensor, channel_ms: Tensor) -> Tensor:
    """Channel-normalised reconstruction error (docs/method.md §9.6 and section 4) of
    one batch: (1/d) sum_c mean_tokens (Y - Y_hat)_c^2 / ms_c, where ms_c is channel c's mean
    square over *all* calibration tokens. Summed over equal-size batches this is the e_l of
    the whole calibration set (divided by the number of batches)."""
    d = out.shape[-1]
    dtype = torch.promote_types(out.dtype, torch.float32)  # at least fp32 (bf16 models)
    diff = (out.to(dtype) - dense.to(dtype)).reshape(-1, d)
    inv = torch.where(channel_ms > 0, 1.0 / channel_ms.clamp_min(1e-30), torch.zeros_like(channel_ms))
    return (diff.square().mean(0) * inv.to(diff.dtype)).sum() / d


def sparsity_penalty(expected: Tensor, target: float, lam: float) -> Tensor:
    """lambda ((s_block - S) / S)^2 (docs/method.md §9.6)."""
    return lam * ((expected - target) / target) ** 2


@contextlib.contextmanager
def override_linears(block: nn.Module, weights: dict[str, Tensor]):
    """Inside the context the block's target linears compute x W^T + b with W read from
    ``weights`` (mutable: callers swap masked weights in between forwards). The stored
    parameters are untouched, a sparse-LoRA layer's adapter path is bypassed (``weights``
    then hold the merged weights), and the block's own parameters need no gradient."""
    linears = layer_linears(block)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    saved = {name: lin.__dict__.get("forward") for name, lin in linears.items()}  # e.g. accelerate hooks
    for name, lin in linears.items():
        bias = lin.bias

        def fwd(x, _name=name, _bias=bias):
            w = weights[_name]
            return F.linear(x, w.to(x.dtype), None if _bias is None else _bias.to(x.dtype))

        lin.forward = fwd
    try:
        yield
    finally:
        for name, lin in linears.items():
            if saved[name] is None:
                del lin.forward
            else:
                lin.forward = saved[name]
        for p in frozen:
            p.requires_grad_(True)


@dataclass
class BesaBlockResult:
    """What BESA learned for one block."""

    layer: int
    targets: dict[str, SparsityTarget]
    sparsity: float                         # realised (hard masks), parameter-weighted
    expected: float                         # s_block of the final logits
    linear_rates: dict[str, float]          # realised per linear
    loss_first: float                       # reconstruction loss, first / last sequence seen
    loss_last: float
    seconds: float

    def record(self) -> dict:
        return {"layer": self.layer, "sparsity": self.sparsity, "expected": self.expected,
                "linear_rates": self.linear_rates, "loss_first": self.loss_first, "loss_last": self.loss_last,
                "seconds": self.seconds}


@dataclass
class BesaAllocation:
    blocks: list[BesaBlockResult] = field(default_factory=list)

    @property
    def targets(self) -> list[dict[str, SparsityTarget]]:
        return [b.targets for b in self.blocks]

    @property
    def layer_rates(self) -> list[float]:
        return [b.sparsity for b in self.blocks]


def _rank_counts(runtime: Runtime, n_local: int) -> list[int]:
    """How many calibration sequences every rank holds (one all-reduce)."""
    counts = torch.zeros(max(1, runtime.world_size), dtype=torch.float64, device=runtime.device)
    counts[runtime.rank] = n_local
    runtime.all_reduce_sum_([counts])
    return [int(c) for c in counts.tolist()]


@torch.no_grad()
def dense_reference(block: nn.Module, acts: Activations, runtime: Runtime, batch_size: int,
                    layer: int) -> tuple[dict, Tensor, Tensor]:
    """Steps 1-2 of the doc's Procedure: the dense block's Wanda input statistics, its
    output Y on this rank's sequences, and Y's per-channel mean square over every rank's
    tokens (the reconstruction loss's normaliser)."""
    device = runtime.device
    stats = collect_input_stats(block, WandaPruner(), acts, runtime, batch_size, layer=layer)
    dense = forward_block(block, acts, batch_size, device, layer=layer)
    sums = torch.zeros(dense.shape[-1] + 1, dtype=torch.float64, device=device)
    for s in range(0, dense.shape[0], batch_size):
        y = dense[s:s + batch_size].to(device=device, dtype=torch.float64).reshape(-1, dense.shape[-1])
        sums[:-1] += y.square().sum(0)
        sums[-1] += y.shape[0]
    runtime.all_reduce_sum_([sums])
    return stats, dense, (sums[:-1] / sums[-1].clamp_min(1)).float()


def learn_rates(block: nn.Module, acts: Activations, runtime: Runtime, rates: dict[str, LinearRates],
                weights: dict[str, Tensor], current: dict[str, Tensor], dense: Tensor, channel_ms: Tensor,
                target: float, opts: BesaOptions, d_coef: float, layer: int) -> list[float]:
    """Steps 4-7: straight-through training of the rate logits, batch 1, for ``opts.epochs``
    epochs; returns the reconstruction loss of every sequence this rank trained on.

    The sequences are visited in their global order (ranks hold contiguous slices, in rank
    order): for each one the rank holding it computes the gradient, the others contribute
    zeros, the sum is all-reduced and every rank takes the same step. So the optimiser sees
    the same n batch-1 steps on any number of ranks."""
    from prodigyopt import Prodigy

    device = runtime.device
    total = sum(r.numel for r in rates.values())
    params = [r.theta for r in rates.values()]
    opt = Prodigy(params, lr=1.0, d_coef=d_coef)
    schedule = [(r, i) for r, n in enumerate(_rank_counts(runtime, acts.hidden.shape[0])) for i in range(n)]
    losses: list[float] = []
    with torch.enable_grad():
        for _ in range(opts.epochs):
            for owner, i in schedule:
                for p in params:
                    p.grad = torch.zeros_like(p)
                if owner == runtime.rank:
                    expected = 0.0
                    for name, r in rates.items():
                        mask, row_rates = r.mask()
                        current[name] = weights[name] * mask
                        expected = expected + row_rates.sum() * r.cols
                    expected = expected / total
                    out = call_block(block, acts.hidden[i:i + 1].to(device), acts.layer_kwargs[layer])
                    recon = reconstruction_loss(out, dense[i:i + 1].to(device), channel_ms)
                    loss = recon + sparsity_penalty(expected, target, opts.lam)
                    loss.backward()
                    losses.append(float(recon.detach()))
                    current.update(weights)  # drop the autograd graphs
                    del out, loss, mask, row_rates, expected
                runtime.all_reduce_sum_([p.grad for p in params])
                opt.step()
    return losses


@torch.no_grad()
def harden(rates: dict[str, LinearRates], weights: dict[str, Tensor],
           current: dict[str, Tensor]) -> tuple[dict[str, SparsityTarget], dict[str, float], int, float]:
    """Step 8: hard masks from the final logits, applied in ``current``. Returns the per-row
    targets, the realised rate of every linear, the pruned count and s_block of the logits."""
    total = sum(r.numel for r in rates.values())
    targets, linear_rates, pruned = {}, {}, 0
    expected = sum(float(r.expected_rates().sum()) * r.cols for r in rates.values()) / total
    for name, r in rates.items():
        counts = r.counts(r.expected_rates())
        targets[name] = SparsityTarget.per_row(counts, r.cols)
        keep = r.hard_keep(counts)
        current[name] = weights[name] * keep
        n_pruned = int((~keep).sum())
        linear_rates[name] = n_pruned / r.numel
        pruned += n_pruned
    return targets, linear_rates, pruned, expected


def besa_learn_block(block: nn.Module, acts: Activations, runtime: Runtime, target: float, opts: BesaOptions,
                     batch_size: int, d_coef: float, layer: int = 0) -> BesaBlockResult:
    """Learn one (gathered) block's allocation on its inputs ``acts`` (docs/method.md §9.1-9.8);
    on return ``acts.hidden`` holds the block's output with the learned masks applied."""
    t0 = time.perf_counter()
    device = runtime.device
    linears = layer_linears(block)
    weights = {name: effective_weight(lin, runtime).to(device) for name, lin in linears.items()}
    prev = {name: (lin.keep_mask() if isinstance(lin, SparseLoRALinear) else None) for name, lin in linears.items()}
    prev = {k: (None if v is None or bool(v.all()) else v.to(device)) for k, v in prev.items()}
    use_sigmoid = opts.use_sigmoid(target, pruned_before=any(v is not None for v in prev.values()))

    current = dict(weights)  # what the block's linears apply; swapped between forwards
    with override_linears(block, current):
        stats, dense, channel_ms = dense_reference(block, acts, runtime, batch_size, layer)
        # 3. Learnable rates, logits initialised to 0.
        rates = {}
        for name, w in weights.items():
            score = w.abs() * stats[name].column_norms().to(device)[None, :]
            rates[name] = LinearRates(score, prev[name], opts.granularity, use_sigmoid)
            del score
        del stats
        losses = learn_rates(block, acts, runtime, rates, weights, current, dense, channel_ms, target, opts,
                             d_coef, layer)
        del dense
        targets, linear_rates, pruned, expected = harden(rates, weights, current)
        total = sum(r.numel for r in rates.values())
        del rates
        # The masked block's output feeds the next block.
        acts.hidden = forward_block(block, acts, batch_size, device, layer=layer)
    current.clear()
    weights.clear()

    result = BesaBlockResult(layer, targets, pruned / total, expected, linear_rates,
                             losses[0] if losses else 0.0, losses[-1] if losses else 0.0, time.perf_counter() - t0)
    runtime.info(f"BESA block {layer}: sparsity {result.sparsity:.4f} (expected {expected:.4f}, target {target:.4f}), "
                 f"reconstruction {result.loss_first:.4g} -> {result.loss_last:.4g} ({result.seconds:.1f}s)")
    return result


def besa_allocate(model: nn.Module, acts: Activations, runtime: Runtime, target: float, opts: BesaOptions,
                  batch_size: int) -> BesaAllocation:
    """BESA over every decoder layer in order, each learned on the outputs of the BESA-masked
    layers before it (docs/method.md §9.1 and §9.8). Weights are read (LoSA: merged), never
    written; ``acts`` is consumed. Returns per-row targets for a pruner to realise."""
    if not 0.0 <= target < 1.0:
        raise LosaZeroError(f"BESA target sparsity must be in [0, 1), got {target}")
    layers = decoder_layers(model)
    alloc = BesaAllocation()
    if target == 0.0:
        for l, block in enumerate(layers):
            with runtime.gathered(block):
                ts = {name: SparsityTarget.per_row([0] * lin.out_features, lin.in_features)
                      for name, lin in layer_linears(block).items()}
            alloc.blocks.append(BesaBlockResult(l, ts, 0.0, 0.0, {k: 0.0 for k in ts}, 0.0, 0.0, 0.0))
        return alloc
    d_coef = opts.d_coef if opts.d_coef is not None else default_d_coef(parameter_count(model))
    if opts.use_sigmoid(target) and not 0.376 <= target <= 0.624:
        log.warning("BESA with the sigmoid keeps rates within about [0.376, 0.624]: target %.3f is out of reach; "
                    "use --besa-sigmoid off (or auto)", target)
    for l in runtime.progress(range(len(layers)), desc="besa", unit="block"):
        with runtime.gathered(layers[l]):
            alloc.blocks.append(besa_learn_block(layers[l], acts, runtime, target, opts, batch_size, d_coef, l))
    return alloc


class BesaAllocator(Allocator):
    """BESA learns per-row (or per-linear) pruned counts at the target, block by block on its
    own masked chain, without writing any weight; the pass's pruner then prunes every linear
    to exactly those counts (with Wanda: BESA's masks; with SparseGPT: BESA's counts, OBS's
    choice and update). The layer rates are BESA's realised ones, for the record."""

    name = "besa"

    def allocate(self, model, calib, runtime, target, delta) -> Allocation:
        besa = besa_allocate(model, calib.capture(), runtime, target, BesaOptions.from_config(self.cfg),
                             self.cfg.calib_batch_size)
        return Allocation(besa.layer_rates, targets=besa.targets, records=[b.record() for b in besa.blocks])
