"""The backend of one rank of a DeepSpeed ZeRO-3 LoSA run (``losa-zero train``).

The lifecycle (:mod:`losa_zero.lifecycle`) is the single-process one; this class supplies
what differs, in the order a run meets it:

1. distributed init (torchrun / deepspeed / srun / mpirun / single process); the resume
   decision (rank 0's, on every rank) before any heavy work, so a bad resume fails at once;
2. the DeepSpeed config, its "auto" fields filled from the run config, registered with
   transformers (``HfDeepSpeedConfig``) *before* the model is built, so ``from_pretrained``
   creates every parameter partitioned (``zero.Init``): no rank ever holds the whole model;
3. a fresh run writes LoSA's dense targets into the checkpoint folder as it computes them;
   a resumed one checks their checksums and reads them back (memory-mapped, at any world
   size), or computes them again when a file is damaged;
4. the DeepSpeed engine is built once the sparse-LoRA factors exist, then the newest
   complete checkpoint (if any) is restored; LoSA's events write checkpoints;
5. evaluation runs with DeepSpeed's module hooks on; the export is streamed one layer at a
   time into the output folder, with ``metrics.jsonl`` and ``tensorboard/`` copied beside it;
6. once the output is committed, the dense targets and (by default) the checkpoints go.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import LosaZeroError
from ..modeling import load_model, read_config, resolve_dtype
from .config import ZeroRunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_ds_config_path(spec: str, config_file: str | None = None) -> Path:
    """A ds_configs path as given, else next to the run config, else in this repository."""
    p = Path(spec)
    candidates = [p]
    if not p.is_absolute():
        if config_file:
            candidates.append(Path(config_file).resolve().parent / p)
        candidates.append(REPO_ROOT / p)
        candidates.append(REPO_ROOT / "ds_configs" / p.name)
    for c in candidates:
        if c.is_file():
            return c
    raise LosaZeroError(f"DeepSpeed config {spec} not found: pass deepspeed=ds_configs/zero3.json (or another file)")


class ZeroBackend:
    """One rank of a ZeRO-3 run (see the module docstring)."""

    def __init__(self, cfg: ZeroRunConfig, config_file: str | None = None):
        from transformers.integrations import HfDeepSpeedConfig

        from .checkpoint import check_resumable, resolve_resume
        from .dist_env import init_distributed
        from .ds_config import fill_ds_config, load_ds_config, offloads_params
        from .export import parse_size
        from .runtime import ZeroRuntime

        self.cfg = cfg
        self.env = init_distributed(cfg.dist_backend, cfg.dist_timeout_minutes)
        cfg.dtype = resolve_dtype(cfg.dtype, self.env.device)  # before the DeepSpeed config's bf16 section
        self.ckpt_dir = cfg.checkpoint_path
        self.max_shard = parse_size(cfg.export_shard_size)
        self.ds_path = resolve_ds_config_path(cfg.deepspeed, config_file)
        raw_ds = load_ds_config(self.ds_path)
        hf_config = read_config(cfg.model)
        ds_config = fill_ds_config(raw_ds, cfg, self.env.world_size, int(hf_config.hidden_size), str(self.ds_path))
        # Must exist (and stay referenced) before from_pretrained: transformers then builds the
        # model under deepspeed.zero.Init and loads each tensor straight into its shards
        # (transformers holds it only weakly, so the backend keeps it to the end of the run).
        self._hf_ds = HfDeepSpeedConfig(ds_config)
        self.ds_config = ds_config
        self.runtime = ZeroRuntime(self.env.device, ds_config, cfg.calib_batch_size,
                                   mask_device="cpu" if offloads_params(ds_config) else None,
                                   activation_dir=self.ckpt_dir / "dense_targets")
        # before any heavy work: a bad or damaged resume fails at once (checksums verified by
        # all ranks, a share each; rank 0's listing decides, so all restore the same one)
        info = resolve_resume(cfg.resume, self.ckpt_dir, self.runtime)
        if info is not None:
            check_resumable(info, cfg, self.env.world_size)
        self.resume_from = info
        self.trainer = None
        self.checkpointer = None
        self.runtime.info(f"{self.env.world_size} rank(s) via {self.env.launcher}, backend {self.env.backend}, "
                          f"DeepSpeed config {self.ds_path}; rank 0 on {self.env.device_note}")

    def load_model(self) -> tuple[nn.Module, object]:
        return load_model(self.cfg.model, dtype=self.cfg.dtype, attn_implementation=self.cfg.attn_implementation)  # partitioned by zero.Init as it loads

    # -- LoSA ---------------------------------------------------------------------------------
    def metrics_path(self, out_dir: Path) -> Path | None:
        """``metrics.jsonl`` lives in the checkpoint folder (a resumed run continues it, cut
        back to its checkpoint) and is copied into the output at the export."""
        from .. import preemption
        from .checkpoint import truncate_metrics

        rt = self.runtime
        path = self.ckpt_dir / "metrics.jsonl"
        if rt.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            preemption.clear_marker(self.ckpt_dir)  # a stop marker from an earlier run is history now
            if self.resume_from is None and path.exists():
                path.unlink()
            elif self.resume_from is not None:
                truncate_metrics(path, self.resume_from.key)
        rt.barrier()
        return path if rt.is_main else None

    def dense_targets(self, compute: Callable[[], list[torch.Tensor]], n_layers: int, n: int) -> list[torch.Tensor]:
        """A fresh run computes them (the runtime writes each layer's into the checkpoint
        folder, then rank 0 writes the manifest with every file's checksum); a resumed one
        reads them back, after checking them: damaged ones are computed again, exactly as a
        fresh run computes them (the dense model is what is loaded now; the checkpoint is
        restored later)."""
        from . import dense_targets

        rt = self.runtime
        directory = rt.activation_dir
        if self.resume_from is not None and dense_targets.intact(directory, rt, n_layers, n):
            return dense_targets.load(directory, rt, n_layers, n)
        dense_targets.clear(directory, rt)
        targets = compute()
        dense_targets.write_manifest(directory, rt, n_layers, n)
        return targets

    def adapter_trainer(self, model: nn.Module):
        """The DeepSpeed engine over the LoRA factors, and the checkpointer that saves it."""
        from .checkpoint import Checkpointer
        from .engine import ZeroTrainer

        cfg = self.cfg
        self.trainer = ZeroTrainer(model, self.runtime, cfg, self.ds_config)
        self.checkpointer = Checkpointer(self.ckpt_dir, self.runtime, self.trainer, cfg, every=cfg.checkpoint_every,
                                         keep=cfg.keep_checkpoints)
        return self.trainer

    def on_losa_event(self, losa, kind: str) -> None:
        self.checkpointer.on_event(losa, kind)

    def restore(self, losa) -> None:
        if self.resume_from is not None:
            self.checkpointer.load(self.resume_from, losa)

    # -- evaluation and export ----------------------------------------------------------------
    def evaluating(self):
        return self.trainer.hooks_active() if self.trainer is not None else contextlib.nullcontext()

    def export(self, model: nn.Module, tokenizer, out_dir: Path, compressor=None) -> dict:
        from .export import export_model

        exported = export_model(model, tokenizer, out_dir, self.runtime, self.max_shard, compressor)
        metrics, tensorboard = self.ckpt_dir / "metrics.jsonl", self.ckpt_dir / "tensorboard"
        if self.runtime.is_main and metrics.exists():
            shutil.copyfile(metrics, out_dir / "metrics.jsonl")
        if self.runtime.is_main and tensorboard.is_dir():  # the run's folder holds it, as for losa-zero losa
            shutil.copytree(tensorboard, out_dir / "tensorboard")
        return exported

    def after_commit(self) -> None:
        """The output is committed: the checkpoint folder (dense targets, checkpoints) goes,
        unless ``keep_checkpoints_after_export`` (a resume is no longer needed)."""
        from .checkpoint import remove_after_export

        if not self.cfg.keep_checkpoints_after_export:
            remove_after_export(self.ckpt_dir, self.runtime)

    def summary_extras(self, export: dict | None) -> dict:
        rt = self.runtime
        return {
            "launcher": self.env.launcher,
            "backend": self.env.backend,
            "deepspeed_config": str(self.ds_path),
            "mask_bytes_per_rank": rt.all_gather_object(rt.masks.local_bytes()),
            "export": export,
            "resumed_from": self.checkpointer.resumed_from if self.checkpointer is not None else [],
            "checkpoint_dir": str(self.ckpt_dir),
        }

    def close(self) -> None:
        self.runtime.barrier()
        self._hf_ds = None
