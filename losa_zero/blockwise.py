"""Block-by-block calibration: the loop that Wanda, SparseGPT, LoSA and BESA share.

The calibration sequences are embedded once; then each decoder layer ("block") in order is
gathered, fed the outputs of the blocks before it, measured (statistics of each linear's
input, Gram matrices for CKA, reconstruction errors), possibly pruned, re-run to produce
the next block's input, and released. Only one block's weights are ever gathered, and all
statistics are sums, so the same code runs on one process or on many ZeRO-3 ranks (each
rank holds a share of the calibration sequences; the runtime all-reduces the sums).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .architectures import architecture_of
from .modeling import decoder_layers, input_groups, layer_linears
from .pruners import Pruner, SparsityTarget
from .runtime import Runtime


class _StopForward(Exception):
    """Raised inside the model's forward once what was needed from it is recorded."""


@dataclass
class Activations:
    """Hidden states of this rank's calibration sequences entering the current block, and
    the keyword arguments the model passes to each decoder layer.

    ``layer_kwargs[l]`` is what the model itself gives layer ``l`` (rotary position
    embeddings, the causal or sliding-window mask of that layer's attention type), captured
    from a real forward so it matches whatever transformers version is installed. Models
    that mix attention types (Gemma 2/3, Qwen2 with sliding-window layers) give different
    layers different masks and, in Gemma 3, different rotary embeddings: calibrating every
    layer with layer 0's arguments would silently use the wrong ones.
    """

    hidden: torch.Tensor  # [n_local, seq, hidden]
    layer_kwargs: list[dict]


_CACHE_KWARGS = ("use_cache", "past_key_values", "past_key_value", "cache")


class _LayerCallRecorder(nn.Module):
    """Stands in for one decoder layer during :func:`layer_call_kwargs`: records the keyword
    arguments the model calls it with and passes its input through (the last one stops
    the forward, so no norm or LM head runs)."""

    def __init__(self, box: list[dict], last: bool):
        super().__init__()
        self.box, self.last = box, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to get everything but the hidden states by keyword")
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        self.box.append({**kwargs, "use_cache": False})
        if self.last:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def layer_call_kwargs(model: nn.Module, seq_len: int, runtime: Runtime) -> list[dict]:
    """The keyword arguments the model passes to each of its decoder layers for a sequence of
    ``seq_len`` tokens, without running any layer: the layer stack is briefly replaced by
    recorders and one probe sequence goes through the embeddings.

    The calibration sequences have no padding, so these depend on the length only; a probe
    of one sequence gives masks of batch 1, which broadcast over any batch. Every rank
    records them, also one holding no calibration sequence.
    """
    layers = decoder_layers(model)
    parent_name, attr = architecture_of(model.config).layers.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    box: list[dict] = []
    setattr(parent, attr, nn.ModuleList(_LayerCallRecorder(box, last=i == len(layers) - 1) for i in range(len(layers))))
    try:
        with runtime.gathered(model.get_input_embeddings()):
            probe = torch.zeros(1, seq_len, dtype=torch.long, device=runtime.device)
            try:
                model(input_ids=probe, use_cache=False)
            except _StopForward:
                pass
    finally:
        setattr(parent, attr, layers)
    if len(box) != len(layers):
        raise RuntimeError(f"the model called {len(box)} of its {len(layers)} decoder layers")
    return box


@torch.no_grad()
def capture_inputs(model: nn.Module, input_ids: torch.Tensor, runtime: Runtime, batch_size: int) -> Activations:
    """Run the model up to its first decoder layer and keep that layer's inputs, plus the
    arguments of every layer (:func:`layer_call_kwargs`)."""
    first = decoder_layers(model)[0]
    captured: list[torch.Tensor] = []

    def catcher(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(hidden.detach())
        raise _StopForward

    handle = first.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        # Only the embeddings run before the first decoder layer: under ZeRO-3 they are the
        # one module to gather here.
        with runtime.gathered(model.get_input_embeddings()):
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(runtime.device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    layer_kwargs = layer_call_kwargs(model, input_ids.shape[1], runtime)
    if not captured:  # a rank with no calibration sequences (many ranks, few sequences)
        emb = model.get_input_embeddings().weight
        hidden = torch.empty(0, input_ids.shape[1], model.config.hidden_size, dtype=emb.dtype, device=runtime.device)
        return Activations(hidden, layer_kwargs)
    return Activations(torch.cat(captured, 0), layer_kwargs)


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer's output hidden states (layers of older transformers return tuples)."""
    out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _batches(acts: Activations, batch_size: int, device: torch.device):
    """The local sequences' block inputs, ``batch_size`` at a time, on ``device``."""
    for start in range(0, acts.hidden.shape[0], batch_size):
        yield acts.hidden[start:start + batch_size].to(device)


@torch.no_grad()
def forward_block(block: nn.Module, acts: Activations, batch_size: int, device: torch.device, *,
                  layer: int) -> torch.Tensor:
    """Decoder layer ``layer``'s outputs for every local sequence, stored where the inputs are."""
    kwargs = acts.layer_kwargs[layer]
    outs = [call_block(block, x, kwargs).to(acts.hidden.device) for x in _batches(acts, batch_size, device)]
    if not outs:
        return acts.hidden.clone()
    return torch.cat(outs, 0)


class _InputsRecorded(Exception):
    """Stops a statistics forward once every input group of the batch has been recorded."""


@torch.no_grad()
def collect_input_stats(block: nn.Module, pruner: Pruner, acts: Activations, runtime: Runtime, batch_size: int, *,
                        layer: int) -> dict:
    """Statistics of the inputs of the block's target linears, summed over all ranks, by
    linear name. Linears that read the same input (``modeling.input_groups``: q/k/v,
    gate/up) share one statistics object, accumulated once from the group's first linear.

    Only the linears' inputs are needed, so where the runtime allows it
    (``Runtime.stop_after_inputs``) each batch's forward stops as soon as the last group's
    input is recorded: the last linear's product (down_proj's, in LLaMA) and what follows
    it are never computed. The statistics are the same either way."""
    linears = layer_linears(block)
    stats: dict = {}
    handles = []
    seen: set[int] = set()  # the groups recorded in the current batch

    def recorder(s):
        def record(module, args):
            s.add_batch(args[0].detach())
            seen.add(id(s))
            if runtime.stop_after_inputs and len(seen) == len(handles):
                raise _InputsRecorded
        return record

    for group in input_groups(block):
        first = linears[group[0]]
        s = runtime.new_stats(pruner, first.in_features)
        stats.update({name: s for name in group})
        if s is not None:
            handles.append(first.register_forward_pre_hook(recorder(s)))
    if set(stats) != set(linears):
        raise RuntimeError(f"input_groups does not cover the layer's linears: {sorted(set(linears) ^ set(stats))}")
    if not handles:
        return stats
    kwargs = acts.layer_kwargs[layer]
    try:
        for x in _batches(acts, batch_size, runtime.device):
            seen.clear()
            try:
                call_block(block, x, kwargs)
            except _InputsRecorded:
                pass
    finally:
        for h in handles:
            h.remove()
    for s in {id(s): s for s in stats.values() if s is not None}.values():
        runtime.all_reduce_sum_(s.tensors())
        s.reduced()
    return stats


@dataclass
class LayerPruneResult:
    layer: int
    pruned: dict[str, tuple[int, int]]  # linear name -> (pruned, total)

    @property
    def sparsity(self) -> float:
        p = sum(v[0] for v in self.pruned.values())
        t = sum(v[1] for v in self.pruned.values())
        return p / t if t else 0.0


def sequential_prune(
    model: nn.Module,
    acts: Activations,
    pruner: Pruner,
    targets: Callable[[int], dict[str, SparsityTarget]],
    runtime: Runtime,
    batch_size: int,
    before_block: Callable[[int, nn.Module], None] | None = None,
    after_block: Callable[[int, nn.Module, torch.Tensor], None] | None = None,
    desc: str = "prune",
) -> list[LayerPruneResult]:
    """Prune every block in order, each calibrated on the outputs of the pruned blocks before it.

    ``targets(l)`` gives the sparsity target of each linear of layer ``l``. ``before_block``
    runs on the gathered block before statistics are taken (LoSA merges its adapters there);
    ``after_block`` sees the pruned block's outputs (LoSA measures reconstruction error).
    ``acts`` is consumed: on return it holds the last block's outputs.
    """
    results = []
    layers = decoder_layers(model)
    for l in runtime.progress(range(len(layers)), desc=desc, unit="block"):
        block = layers[l]
        with runtime.gathered(block):
            if before_block is not None:
                before_block(l, block)
            stats = collect_input_stats(block, pruner, acts, runtime, batch_size, layer=l)
            layer_targets = targets(l)
            linears = layer_linears(block)

            def compute(name, lin, l=l, stats=stats, layer_targets=layer_targets):
                prev_keep = lin.keep_mask() if hasattr(lin, "keep_mask") else None
                weight = runtime.read_weight(lin)
                return pruner.prune(weight, stats[name], layer_targets[name], prev_keep=prev_keep,
                                    name=f"layer {l} {name}")

            runtime.map_linears(list(linears.items()), compute)
            pruned = {name: runtime.count_pruned(lin) for name, lin in linears.items()}
            del stats
            out = forward_block(block, acts, batch_size, runtime.device, layer=l)
            if after_block is not None:
                after_block(l, block, out)
        acts.hidden = out
        results.append(LayerPruneResult(l, pruned))
    return results


@torch.no_grad()
def layer_input_grams(model: nn.Module, acts: Activations, runtime: Runtime, batch_size: int, n: int) -> list[torch.Tensor]:
    """Gram matrices (n x n, float64) of every decoder layer's input, each sequence flattened
    to one row (docs/method.md section 2). Uses the first ``n`` calibration sequences; ``acts``
    must hold exactly those (callers pass a slice)."""
    grams = []
    layers = decoder_layers(model)
    for l in runtime.progress(range(len(layers)), desc="cka", unit="block"):
        grams.append(runtime.gram(acts.hidden.flatten(1), n))
        with runtime.gathered(layers[l]):
            acts.hidden = forward_block(layers[l], acts, batch_size, runtime.device, layer=l)
    return grams


@torch.no_grad()
def dense_layer_outputs(model: nn.Module, acts: Activations, runtime: Runtime, batch_size: int) -> list[torch.Tensor]:
    """Outputs of every decoder layer of the (still dense) model: LoSA's reconstruction
    targets D_l (docs/method.md section 4), computed once. Kept where ``runtime.keep_activation``
    puts them: host memory, or memory-mapped files under ZeRO-3."""
    outs = []
    layers = decoder_layers(model)
    for l in runtime.progress(range(len(layers)), desc="dense targets", unit="block"):
        with runtime.gathered(layers[l]):
            acts.hidden = forward_block(layers[l], acts, batch_size, runtime.device, layer=l)
        outs.append(runtime.keep_activation(l, acts.hidden))
    return outs


class CalibrationInputs:
    """This rank's share of the calibration sequences, and their block-0 inputs captured on
    demand from the model as it is at the time of the call (each call a fresh copy, which
    the block loops consume)."""

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, runtime: Runtime, batch_size: int):
        self.model, self.calib_ids, self.runtime, self.batch_size = model, calib_ids, runtime, batch_size

    @property
    def total(self) -> int:
        """Calibration sequences over all ranks."""
        return self.calib_ids.shape[0]

    def capture(self, n: int | None = None) -> Activations:
        """Inputs of this rank's share of the first ``n`` sequences (all for None)."""
        n = self.total if n is None else min(n, self.total)
        local = self.calib_ids[self.runtime.local_indices(n)]
        return capture_inputs(self.model, local, self.runtime, self.batch_size)
