"""The run lifecycle behind ``prune``, ``losa`` and ``train``, in the style of a recipe:

    load -> calibrate -> compress -> merge -> evaluate -> export -> summary

:class:`Lifecycle` holds the phases every command shares; :class:`PruneRun` and
:class:`LosaRun` fill in calibrate / compress / merge and their part of the summary. What
differs between one process and a DeepSpeed ZeRO-3 rank (loading under ``zero.Init``,
the adapter trainer, checkpoints and resume, evaluation hooks, the streamed export) is
behind the backend (:class:`~losa_zero.backend.LocalBackend`,
:class:`~losa_zero.zero3.backend.ZeroBackend`), so ``losa-zero losa`` and ``losa-zero
train`` are one code path. Everything is written into a temporary directory that becomes
``--out`` only when the whole run succeeded (:func:`~losa_zero.outputs.atomic_output_dir`),
so a failed run leaves no half model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .allocation import band_delta
from .allocators import Allocation, get_allocator
from .backend import LocalBackend
from .compressed import compressor_for
from .blockwise import CalibrationInputs, sequential_prune
from .config import CommonConfig, LosaConfig, PruneConfig
from .data import PAD_ID, calibration_windows, finetune_examples, load_eval_text, parse_source
from .errors import LosaZeroError
from .evaluate import eval_token_ids, perplexity
from .finetune import MetricsWriter
from .losa import Losa, attach_adapters, dense_targets, merge_and_unwrap
from .modeling import decoder_layers, target_names
from .nm import check_nm_fits, mixed_patterns, parse_nm
from .outputs import PhaseRecorder, atomic_output_dir, write_json_atomic
from .pruners import SparsityTarget

log = logging.getLogger("losa_zero")


def calibration_seqlen(requested: int | None, model_config) -> int:
    """``--seqlen``, default min(2048, the model's context length); never beyond the context."""
    ctx = int(getattr(model_config, "max_position_embeddings", 2048))
    seqlen = requested or min(2048, ctx)
    if seqlen > ctx:
        raise LosaZeroError(f"--seqlen {seqlen} exceeds the model's context length {ctx}: pass a smaller --seqlen")
    return seqlen


class Lifecycle:
    """One compression run. Subclasses implement :meth:`calibrate`, :meth:`compress` and
    :meth:`record` (and :meth:`merge` when there is something to merge)."""

    def __init__(self, cfg: CommonConfig, command: str, backend=None, config_file: str | None = None):
        self.cfg = cfg
        self.command = command
        self.config_file = config_file
        self.backend = backend if backend is not None else LocalBackend(cfg)
        self.runtime = self.backend.runtime
        self.phases = PhaseRecorder()
        self.eval_texts = {spec: load_eval_text(spec) for spec in cfg.ppl}  # fail early on bad paths
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.seqlen: int | None = None
        self.out_dir: Path | None = None

    def run(self) -> dict:
        inputs = self.cfg.input_paths() + [("the config file", self.config_file)]
        with atomic_output_dir(self.cfg.out, overwrite=self.cfg.overwrite, runtime=self.runtime, inputs=inputs,
                               on_commit=self.backend.after_commit) as out_dir:
            self.out_dir = out_dir
            self.load()
            self.calibrate()
            self.compress()
            self.merge()
            ppl = self.evaluate()
            exported = self.export()
            summary = self.summary(ppl, exported)
        self.backend.close()
        self._log_done(summary)
        return summary

    # -- phases -------------------------------------------------------------------------------
    def load(self) -> None:
        with self.phases.phase("load"):
            self.model, self.tokenizer = self.backend.load_model()
        self.seqlen = calibration_seqlen(self.cfg.seqlen, self.model.config)
        for spec, text in self.eval_texts.items():  # each --ppl text long enough for one window
            eval_token_ids(self.model, self.tokenizer, text, self.cfg.eval_seqlen, name=f"--ppl {spec}")

    def calibration_windows(self) -> torch.Tensor:
        cfg = self.cfg
        return calibration_windows(self.tokenizer, cfg.calib, cfg.nsamples, self.seqlen, seed=cfg.seed)

    def calibrate(self) -> None:
        raise NotImplementedError

    def compress(self) -> None:
        raise NotImplementedError

    def merge(self) -> None:
        """Fold whatever the compression trained into plain weights (nothing by default)."""

    def evaluate(self) -> dict:
        results = {}
        with self.phases.phase("eval"), self.backend.evaluating():
            for spec, text in self.eval_texts.items():
                name = parse_source(spec)[1].name
                r = perplexity(self.model, self.tokenizer, text, self.runtime, seqlen=self.cfg.eval_seqlen,
                               batch_size=self.cfg.eval_batch_size)
                results[name] = r
                self.runtime.info(f"perplexity {name}: {r['ppl']:.4f} (seqlen {r['seqlen']}, {r['tokens']} tokens)")
        return results

    def export(self) -> dict | None:
        """Write the compressed model into the output folder (the one place a new output
        format plugs in): dense safetensors, or with ``save_format: compressed`` the pruned
        linears in the compressed-tensors sparse format (:mod:`losa_zero.compressed`)."""
        with self.phases.phase("save"):
            compressor = compressor_for(self.model, self.runtime) if self.cfg.save_format == "compressed" else None
            return self.backend.export(self.model, self.tokenizer, self.out_dir, compressor)

    def record(self) -> dict:
        """The command's own summary fields: method, pruner, allocation, rank_allocation,
        target_sparsity, nm, per_layer, steps, optimizer."""
        raise NotImplementedError

    def summary(self, ppl: dict, exported: dict | None) -> dict:
        """summary.json: the same fields for every command, plus the backend's extras."""
        rt = self.runtime
        achieved, per_linear = rt.sparsity_report(self.model)
        peaks = rt.all_gather_object(self.phases.peak_memory())
        summary = {
            **self.record(),
            "perplexity": ppl,
            "losa_zero_version": __version__,
            "command": self.command,
            "achieved_sparsity": achieved,
            "per_linear_sparsity": per_linear,
            "seconds": self.phases.total(),
            "peak_memory": peaks[0],
            "config": dict(vars(self.cfg)),
            "world_size": rt.world_size,
            "peak_memory_per_rank": peaks,
            # per rank, in time order: {phase: {"peak_rss_bytes", "rss_bytes"[, "cuda_peak_bytes"]}}
            # at each phase's end
            "memory_by_phase_per_rank": rt.all_gather_object(self.phases.memory),
            **self.backend.summary_extras(exported),
        }
        if rt.is_main:
            write_json_atomic(self.out_dir / "summary.json", summary)
        return summary

    def _log_done(self, summary: dict) -> None:
        ppl = ", ".join(f"{k} {v['ppl']:.3f}" for k, v in summary["perplexity"].items())
        self.runtime.info(f"done: {summary['method']} sparsity {summary['achieved_sparsity']:.4f}"
                          + (f", perplexity {ppl}" if ppl else "")
                          + f", {summary['seconds']['total']:.1f}s on {self.runtime.world_size} rank(s); "
                          f"wrote {self.cfg.out}")


class PruneRun(Lifecycle):
    """One-shot magnitude / Wanda / SparseGPT pruning, block by block (``losa-zero prune``)."""

    cfg: PruneConfig

    def calibrate(self) -> None:
        with self.phases.phase("data"):
            self.calib = self.calibration_windows()

    def compress(self) -> None:
        cfg, model, runtime = self.cfg, self.model, self.runtime
        model.eval()
        n_layers = len(decoder_layers(model))
        patterns = parse_nm(cfg.nm, n_layers) if cfg.nm else None
        if patterns:
            check_nm_fits(model, patterns)
        pruner = cfg.make_pruner(cfg.method)
        allocator = get_allocator(cfg.allocation, cfg, cfg.method)
        calib = CalibrationInputs(model, self.calib, runtime, cfg.calib_batch_size)
        with self.phases.phase("importance"):
            if patterns and allocator.mixed_nm:
                # Mixed N:M (docs/method.md section 7): one N:M given, N per layer from the
                # allocator's importance, mean N exactly the given one.
                importance, redundancy = allocator.importance(model, calib, runtime)
                patterns = mixed_patterns(importance, patterns[0], cfg.nm_spread)
                check_nm_fits(model, patterns)
                allocation = Allocation([1 - n / m for n, m in patterns], importance, redundancy)
            elif patterns:
                allocation = Allocation([1 - n / m for n, m in patterns])
            else:
                allocation = allocator.allocate(model, calib, runtime, cfg.sparsity, band_delta(cfg.sparsity))
        rates = allocation.rates

        def targets(l: int) -> dict[str, SparsityTarget]:
            if patterns:
                return {name: SparsityTarget.nm_pattern(*patterns[l]) for name in target_names(model)}
            if allocation.targets is not None:  # BESA's learned counts (with Wanda: exactly BESA's masks)
                return allocation.targets[l]
            return {name: SparsityTarget.unstructured(rates[l]) for name in target_names(model)}

        with self.phases.phase("prune"):
            results = sequential_prune(model, calib.capture(), pruner, targets, runtime, cfg.calib_batch_size)
        self.layers = []
        for l in range(n_layers):
            row = {"layer": l, "rate": rates[l],
                   "importance": None if allocation.importance is None else allocation.importance[l],
                   "redundancy": None if allocation.redundancy is None else allocation.redundancy[l],
                   "sparsity": results[l].sparsity}
            if patterns:
                row["nm"] = f"{patterns[l][0]}:{patterns[l][1]}"
            if allocation.records is not None:
                row[cfg.allocation] = allocation.records[l]
            self.layers.append(row)
        self.patterns, self.rates = patterns, rates

    def record(self) -> dict:
        cfg, patterns, rates = self.cfg, self.patterns, self.rates
        return {
            "method": cfg.method, "pruner": cfg.method,
            "allocation": ("nm" if cfg.allocation == "uniform" else f"mixed-nm-{cfg.allocation}") if patterns
            else cfg.allocation,
            "rank_allocation": None,
            "target_sparsity": (sum(rates) / len(rates)) if patterns else cfg.sparsity,
            "nm": cfg.nm,
            "per_layer": self.layers,
            "steps": [],
            "optimizer": None,
        }


class LosaRun(Lifecycle):
    """LoSA (docs/method.md section 5) end to end, ending in a plain sparse HF model
    (``losa-zero losa`` on one process, ``losa-zero train`` on a ZeRO-3 backend)."""

    cfg: LosaConfig

    def calibrate(self) -> None:
        cfg = self.cfg
        with self.phases.phase("data"):
            self.calib = self.calibration_windows()
            self.examples = finetune_examples(self.tokenizer, cfg.train, cfg.max_length, limit=cfg.total_examples,
                                              seed=cfg.seed, train_on_inputs=cfg.train_on_inputs)

    def compress(self) -> None:
        cfg, model, runtime, backend = self.cfg, self.model, self.runtime, self.backend
        n_layers = len(decoder_layers(model))
        metrics = MetricsWriter(backend.metrics_path(self.out_dir))
        with self.phases.phase("dense_targets"):
            targets = backend.dense_targets(lambda: dense_targets(model, self.calib, cfg, runtime), n_layers,
                                            self.calib.shape[0])
        with self.phases.phase("prepare"):
            attach_adapters(model, cfg, runtime)
            self.trainer = trainer = backend.adapter_trainer(model)
            torch.manual_seed(cfg.seed)  # LoRA dropout masks
            algo = Losa(model, cfg, runtime, self.calib, self.examples, PAD_ID, metrics, dense_targets=targets,
                        trainer=trainer, phases=self.phases, on_event=backend.on_losa_event)
            backend.restore(algo)
        try:
            self.history = algo.run()
        finally:
            metrics.close()

    def merge(self) -> None:
        """Merge the masked adapters for good: an ordinary sparse model, no adapter left."""
        with self.phases.phase("merge"):
            merge_and_unwrap(self.model, self.runtime)

    def record(self) -> dict:
        cfg = self.cfg
        return {
            "method": "losa", "pruner": cfg.pruner, "allocation": cfg.allocation,
            "rank_allocation": cfg.rank_allocation, "target_sparsity": cfg.sparsity, "nm": cfg.nm,
            "per_layer": [dict(layer) for layer in self.history[-1]["layers"]],
            "steps": self.history,
            "optimizer": self.trainer.optimizer_choice.record(),
        }


def run_prune(cfg: PruneConfig, command: str = "losa-zero prune", config_file: str | None = None) -> dict:
    return PruneRun(cfg, command, config_file=config_file).run()


def run_losa(cfg: LosaConfig, command: str = "losa-zero losa", config_file: str | None = None) -> dict:
    return LosaRun(cfg, command, config_file=config_file).run()


def run_train(cfg, command: str = "losa-zero train", config_file: str | None = None) -> dict:
    """LoSA under DeepSpeed ZeRO-3 on every rank that launched it (``losa-zero train``)."""
    from .zero3.backend import ZeroBackend

    return LosaRun(cfg, command, ZeroBackend(cfg, config_file), config_file=config_file).run()
