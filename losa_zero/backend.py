"""Where a run's model lives, as seen by the run lifecycle (:mod:`losa_zero.lifecycle`).

A backend owns the :class:`~losa_zero.runtime.Runtime` and the few steps of a run that
depend on where the weights are: loading the model, training the adapters, restoring a
checkpoint, evaluating, exporting. :class:`LocalBackend` is one process holding the whole
model; :class:`losa_zero.zero3.backend.ZeroBackend` is one rank of a DeepSpeed ZeRO-3 run
(loading under ``zero.Init``, a DeepSpeed engine, checkpoints, a streamed export). The
lifecycle calls the same methods on both, so it has no branch on the kind of run.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .finetune import LocalTrainer
from .modeling import load_model, resolve_dtype, save_model
from .shards import parse_size
from .runtime import Runtime, resolve_device


class LocalBackend:
    """One process; the whole model on ``--device``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.runtime = Runtime(resolve_device(cfg.device))
        cfg.dtype = resolve_dtype(cfg.dtype, self.runtime.device)

    def load_model(self) -> tuple[nn.Module, object]:
        model, tokenizer = load_model(self.cfg.model, dtype=self.cfg.dtype, attn_implementation=self.cfg.attn_implementation)
        return model.to(self.runtime.device), tokenizer

    # -- LoSA ---------------------------------------------------------------------------------
    def metrics_path(self, out_dir: Path) -> Path | None:
        """Where this rank writes ``metrics.jsonl`` (None: it writes none)."""
        return out_dir / "metrics.jsonl" if self.runtime.is_main else None

    def dense_targets(self, compute: Callable[[], list[torch.Tensor]], n_layers: int, n: int) -> list[torch.Tensor]:
        """LoSA's dense targets: ``compute()`` (kept in memory)."""
        return compute()

    def adapter_trainer(self, model: nn.Module):
        """The trainer of the sparse-LoRA factors (built once they exist)."""
        cfg = self.cfg
        return LocalTrainer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.max_grad_norm)

    #: called by LoSA at its events (checkpoints); none on one process
    on_losa_event = None

    def restore(self, losa) -> None:
        """Continue ``losa`` from a checkpoint (one process: none, nothing to do)."""

    # -- evaluation and export ----------------------------------------------------------------
    def evaluating(self):
        """Context in which the model can be called for evaluation."""
        return contextlib.nullcontext()

    def export(self, model: nn.Module, tokenizer, out_dir: Path, compressor=None) -> dict | None:
        """Write the model as an ordinary Hugging Face folder into ``out_dir``; with a
        ``compressor``, through the same shard writer as the ZeRO-3 export (which stores the
        pruned linears compressed)."""
        if compressor is None:
            save_model(model, tokenizer, out_dir, max_shard_size=self.cfg.export_shard_size)
            return None
        from .zero3.export import export_model

        return export_model(model, tokenizer, out_dir, self.runtime, parse_size(self.cfg.export_shard_size), compressor)

    def summary_extras(self, export: dict | None) -> dict:
        """Fields this kind of run adds to the common summary."""
        return {}

    def after_commit(self) -> None:
        """Delete what was kept only to resume the run, once the output is committed (one
        process: nothing)."""

    def close(self) -> None:
        """Release what the backend holds once the output is committed."""
