"""LoSA under DeepSpeed ZeRO-3, end to end: the body of ``losa-zero train`` and
``train/losa.py``.

Order of events on every rank:
1. distributed init (torchrun / deepspeed / srun / mpirun / single process);
2. the DeepSpeed config, its "auto" fields filled from the run config, registered with
   transformers (``HfDeepSpeedConfig``) *before* the model is built, so ``from_pretrained``
   creates every parameter partitioned (``zero.Init``): no rank ever holds the whole model;
3. calibration windows and fine-tuning examples (deterministic, the same on every rank;
   each rank then uses its share of the calibration sequences);
4. a fresh run computes LoSA's dense targets (stored in the checkpoint folder) and attaches
   the sparse-LoRA factors (partitioned); a resumed one reads the targets back;
5. the DeepSpeed engine is built once, then the newest complete checkpoint (if any) is
   restored, possibly at another world size;
6. the LoSA steps (the single-process algorithm on a ZeroRuntime), checkpointing at each
   step's end and every N optimizer steps;
7. the final merge, perplexity, the streamed export and summary.json (with per-rank peak
   memory, also by phase), all written under a temporary name and renamed into place at the end.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .. import __version__
from ..data import calibration_windows, finetune_examples, load_eval_text, parse_source
from ..errors import LosaZeroError
from ..finetune import MetricsWriter
from ..losa import Losa
from ..modeling import decoder_layers, load_model
from ..outputs import memory_now, peak_memory, write_json_atomic
from ..pipeline import sparsity_report
from .config import ZeroRunConfig

log = logging.getLogger("losa_zero")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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


def _same_choice_everywhere(info):
    """Rank 0's choice of checkpoint, on every rank (a shared filesystem may show ranks
    different things for a moment; they must not restore different checkpoints)."""
    import torch.distributed as dist

    from .checkpoint import read_complete

    if dist.get_world_size() == 1:
        return info
    box = [str(info.path) if info is not None else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    if info is not None and str(info.path) == box[0]:
        return info
    chosen = read_complete(Path(box[0]))
    if chosen is None:
        raise LosaZeroError(f"rank {dist.get_rank()} cannot read checkpoint {box[0]} that rank 0 chose: "
                            "checkpoint_dir must be on a filesystem shared by all ranks")
    return chosen


def run_train(cfg: ZeroRunConfig, command: str = "losa-zero train", config_file: str | None = None) -> dict | None:
    from transformers.integrations import HfDeepSpeedConfig

    from .checkpoint import (Checkpointer, check_resumable, load_activations, resolve_resume, truncate_metrics,
                             write_activation_manifest)
    from .dist_env import init_distributed
    from .ds_config import fill_ds_config, load_ds_config, offloads_params
    from .engine import ZeroTrainer
    from .evaluate import perplexity
    from .export import export_model, parse_size
    from .runtime import ZeroRuntime

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    env = init_distributed(cfg.dist_backend, cfg.dist_timeout_minutes)
    out = Path(cfg.out)
    ckpt_dir = cfg.checkpoint_path
    if out.exists() and not cfg.overwrite:
        raise LosaZeroError(f"output directory {out} already exists: choose another out or pass overwrite=true")
    info = resolve_resume(cfg.resume, ckpt_dir)  # before any heavy work: a bad resume fails at once
    info = _same_choice_everywhere(info)
    if info is not None:
        check_resumable(info, cfg, env.world_size)
    max_shard = parse_size(cfg.export_shard_size)
    ds_path = resolve_ds_config_path(cfg.deepspeed, config_file)
    raw_ds = load_ds_config(ds_path)
    eval_texts = {spec: load_eval_text(spec) for spec in cfg.ppl}  # fail early on bad paths
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise LosaZeroError(f"cannot read the model config in {cfg.model} ({type(exc).__name__}): "
                            "pass a folder made by save_pretrained") from exc
    ds_config = fill_ds_config(raw_ds, cfg, env.world_size, int(hf_config.hidden_size), str(ds_path))
    offload = offloads_params(ds_config)
    # Must exist (and stay referenced) before from_pretrained: transformers then builds the
    # model under deepspeed.zero.Init and loads each tensor straight into its shards.
    hf_ds = HfDeepSpeedConfig(ds_config)
    runtime = ZeroRuntime(env.device, ds_config, cfg.calib_batch_size, mask_device="cpu" if offload else None)
    runtime.info(f"{env.world_size} rank(s) via {env.launcher}, backend {env.backend}, DeepSpeed config {ds_path}; "
                 f"rank 0 on {env.device_note}")
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
    seconds["load"] = time.perf_counter() - t0
    memory = {"load": memory_now()}
    runtime.model = model
    ctx = int(getattr(model.config, "max_position_embeddings", 2048))
    seqlen = cfg.seqlen or min(2048, ctx)
    if seqlen > ctx:
        raise LosaZeroError(f"seqlen {seqlen} exceeds the model's context length {ctx}")
    t0 = time.perf_counter()
    calib = calibration_windows(tokenizer, cfg.calib, cfg.nsamples, seqlen, seed=cfg.seed)
    total_examples = (cfg.steps - 1) * cfg.samples_per_step + cfg.final_step_samples
    examples = finetune_examples(tokenizer, cfg.train, cfg.max_length, limit=total_examples, seed=cfg.seed,
                                 train_on_inputs=cfg.train_on_inputs)
    seconds["data"] = time.perf_counter() - t0
    memory["data"] = memory_now()

    if runtime.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(ImportError):
            from .. import preemption

            preemption.clear_marker(ckpt_dir)  # a stop marker from an earlier run is history now
        metrics_path = ckpt_dir / "metrics.jsonl"
        if info is None and metrics_path.exists():
            metrics_path.unlink()
        elif info is not None:
            truncate_metrics(metrics_path, info.key)
    runtime.barrier()
    metrics = MetricsWriter(ckpt_dir / "metrics.jsonl" if runtime.is_main else None)
    algo = Losa(model, cfg, runtime, calib, examples, 0, metrics)
    n_layers = len(decoder_layers(model))
    dense_dir = ckpt_dir / "dense_targets"
    t0 = time.perf_counter()
    if info is None:
        if runtime.is_main and dense_dir.exists():
            shutil.rmtree(dense_dir)
        runtime.barrier()
        runtime.activation_dir = dense_dir
        algo.prepare()
        runtime.activation_dir = None
        write_activation_manifest(dense_dir, runtime, n_layers, calib.shape[0])
    else:
        algo.dense_targets = load_activations(dense_dir, runtime, n_layers, calib.shape[0])
        algo.attach_adapters()
    seconds["prepare"] = time.perf_counter() - t0
    memory.update(algo.memory)
    memory["prepare"] = memory_now()
    trainer = ZeroTrainer(model, runtime, cfg, ds_config)
    algo.trainer = trainer
    checkpointer = Checkpointer(ckpt_dir, runtime, trainer, cfg, every=cfg.checkpoint_every,
                                keep=cfg.keep_checkpoints)
    if info is not None:
        checkpointer.load(info, algo)
    algo.on_event = checkpointer.on_event
    try:
        history = algo.run()
    finally:
        metrics.close()
    memory.update(algo.memory)  # the steps' phases and the merge, after the ones above: in time order
    for key, value in algo.seconds.items():
        seconds[key] = seconds.get(key, 0.0) + value

    # -- evaluation and export ----------------------------------------------------------------------
    t0 = time.perf_counter()
    ppl = {}
    with trainer.hooks_active():
        for spec, text in eval_texts.items():
            name = parse_source(spec)[1].name
            r = perplexity(model, tokenizer, text, runtime, seqlen=cfg.eval_seqlen, batch_size=cfg.eval_batch_size)
            ppl[name] = r
            runtime.info(f"perplexity {name}: {r['ppl']:.4f} (seqlen {r['seqlen']}, {r['tokens']} tokens)")
    seconds["eval"] = time.perf_counter() - t0
    memory["eval"] = memory_now()
    achieved, per_linear = sparsity_report(model, runtime)
    tmp = out.with_name(f"{out.name}.partial")
    if runtime.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    runtime.barrier()
    t0 = time.perf_counter()
    exported = export_model(model, tokenizer, tmp, runtime, max_shard)
    seconds["save"] = time.perf_counter() - t0
    memory["save"] = memory_now()
    seconds["total"] = time.perf_counter() - t_start
    mask_bytes = runtime.all_gather_object(runtime.masks.local_bytes())
    peaks = runtime.all_gather_object(peak_memory())
    by_phase = runtime.all_gather_object(memory)
    summary = {
        "method": "losa", "pruner": cfg.pruner, "allocation": cfg.allocation,
        "rank_allocation": cfg.rank_allocation, "target_sparsity": cfg.sparsity, "nm": None,
        "per_layer": [dict(layer) for layer in history[-1]["layers"]],
        "steps": history,
        "perplexity": ppl,
        "losa_zero_version": __version__,
        "command": command,
        "achieved_sparsity": achieved,
        "per_linear_sparsity": per_linear,
        "seconds": seconds,
        "peak_memory": peaks[0],
        "config": {k: v for k, v in vars(cfg).items()},
        # ZeRO-3 additions
        "world_size": runtime.world_size,
        "launcher": env.launcher,
        "backend": env.backend,
        "optimizer": trainer.optimizer_choice.record(),
        "deepspeed_config": str(ds_path),
        "peak_memory_per_rank": peaks,
        # per rank, in time order: {phase: {"peak_rss_bytes": peak so far, "rss_bytes": current}} at
        # each phase's end (load, data, dense_targets, prepare, step1.importance ... merge, eval, save)
        "memory_by_phase_per_rank": by_phase,
        "mask_bytes_per_rank": mask_bytes,
        "export": exported,
        "resumed_from": checkpointer.resumed_from,
        "checkpoint_dir": str(ckpt_dir),
    }
    if runtime.is_main:
        if (ckpt_dir / "metrics.jsonl").exists():
            shutil.copyfile(ckpt_dir / "metrics.jsonl", tmp / "metrics.jsonl")
        write_json_atomic(tmp / "summary.json", summary)
        old = None
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        ppl_text = ", ".join(f"{k} {v['ppl']:.3f}" for k, v in ppl.items())
        log.info(f"done: losa sparsity {achieved:.4f}" + (f", perplexity {ppl_text}" if ppl_text else "")
                 + f", {seconds['total']:.1f}s on {runtime.world_size} rank(s); wrote {out}")
    runtime.barrier()
    del hf_ds  # referenced to the end: transformers' ZeRO-3 integration holds it only weakly
    return summary
