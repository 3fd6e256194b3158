"""Swap the pruned linears of a loaded model for :class:`BitmaskLinear`.

Works on any model directory losa-zero loads: a plain sparse export (zeros stored) is
packed from its dense weights; a compressed-tensors export is decompressed by transformers
on load and packed the same way. Only linears sparse enough to pay are swapped; the
targets come from the model's architecture (:mod:`losa_zero.modeling`), not from names.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from ..modeling import decoder_layers, layer_linears, load_model
from .build import kernel_available
from .linear import DENSE_ABOVE_TOKENS, BitmaskLinear

log = logging.getLogger(__name__)

# Below this fraction of zeros the expansion work outweighs the bytes saved.
MIN_SPARSITY = 0.3


def sparsify_linears(model: nn.Module, min_sparsity: float = MIN_SPARSITY,
                     value_dtype: torch.dtype | None = None,
                     dense_above: int = DENSE_ABOVE_TOKENS) -> dict:
    """Replace, in place, every target linear with at least ``min_sparsity`` zeros.

    Returns a summary: how many linears were swapped or kept dense and the bytes of their
    weights before and after. Without a working C++ kernel nothing is swapped (the build
    step has already said why in one line) and ``kernel`` is ``False`` in the summary.
    """
    summary = {"kernel": kernel_available(), "swapped": 0, "kept_dense": 0,
               "dense_bytes": 0, "compressed_bytes": 0}
    if not summary["kernel"]:
        return summary
    for layer in decoder_layers(model):
        for name, lin in layer_linears(layer).items():
            if not isinstance(lin, nn.Linear):
                continue
            w = lin.weight.detach()
            sparsity = float((w == 0).sum()) / w.numel()
            if sparsity < min_sparsity:
                summary["kept_dense"] += 1
                continue
            sparse = BitmaskLinear.from_linear(lin, value_dtype=value_dtype, dense_above=dense_above)
            summary["dense_bytes"] += w.numel() * w.element_size()
            summary["compressed_bytes"] += sparse.packed.nbytes()
            layer.set_submodule(name, sparse)
            summary["swapped"] += 1
    log.info("sparse kernel: %d linears swapped (%.1f MiB -> %.1f MiB), %d kept dense",
             summary["swapped"], summary["dense_bytes"] / 2**20, summary["compressed_bytes"] / 2**20,
             summary["kept_dense"])
    return summary


def load_sparse_model(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                      min_sparsity: float = MIN_SPARSITY, dense_above: int = DENSE_ABOVE_TOKENS):
    """``(model, tokenizer, summary)``: a model directory loaded with its sparse linears swapped."""
    model, tokenizer = load_model(path, dtype=dtype)
    summary = sparsify_linears(model, min_sparsity=min_sparsity, dense_above=dense_above)
    return model, tokenizer, summary
