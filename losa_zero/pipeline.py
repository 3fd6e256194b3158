"""End-to-end runs behind the ``prune`` and ``losa`` commands: load, calibrate, compress,
evaluate, save, summarise. Everything is written into a temporary directory that is renamed
to ``--out`` only when the whole run succeeded, so a failed run leaves no half model."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .allocation import band_delta, mixed_nm_allocation, rmi_importance, solve_layer_rates
from .besa import BesaOptions, besa_allocate
from .blockwise import capture_inputs, layer_input_grams, sequential_prune
from .config import CommonConfig, LosaConfig, PruneConfig
from .data import calibration_windows, finetune_examples, load_eval_text, parse_source
from .errors import LosaZeroError
from .evaluate import perplexity
from .finetune import MetricsWriter
from .losa import Losa
from .modeling import TARGET_LINEARS, decoder_layers, layer_linears, load_model, save_model
from .outputs import atomic_output_dir, peak_memory, write_json_atomic
from .optimizers import choose_optimizer
from .owl import owl_outlier_ratios, owl_rates
from .pruners import SparsityTarget
from .runtime import Runtime

log = logging.getLogger("losa_zero")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Timer:
    """Seconds per named phase, accumulated."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def phase(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.add(name, time.perf_counter() - self.t0)

        return _Phase()

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self._start}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise LosaZeroError(f"unknown --device {name!r}: use auto, cpu or cuda[:N]") from None


def parse_nm(spec: str, n_layers: int) -> list[tuple[int, int]]:
    """'2:4' for every layer, or one 'N:M' per layer, comma-separated (mixed N per layer)."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    out = []
    for p in parts:
        try:
            n, m = (int(x) for x in p.split(":"))
        except ValueError:
            raise LosaZeroError(f"--nm {p!r} is not of the form N:M (e.g. 2:4)") from None
        if m < 1 or n < 1 or n > m:
            raise LosaZeroError(f"--nm {p}: need 1 <= N <= M (N weights kept in every M)")
        out.append((n, m))
    if len(out) == 1:
        out = out * n_layers
    if len(out) != n_layers:
        raise LosaZeroError(f"--nm lists {len(out)} patterns for a model of {n_layers} layers: give one, or one per layer")
    return out


def check_nm_fits(model: nn.Module, patterns: list[tuple[int, int]]) -> None:
    for l, layer in enumerate(decoder_layers(model)):
        n, m = patterns[l]
        for name, lin in layer_linears(layer).items():
            if lin.in_features % m:
                raise LosaZeroError(
                    f"N:M {n}:{m} needs input width divisible by {m}; {name} of layer {l} has {lin.in_features} "
                    "inputs: use 2:4 or unstructured")


def sparsity_report(model: nn.Module, runtime: Runtime) -> tuple[float, dict[str, float]]:
    """Realised sparsity of the target linears: global and per linear (full names)."""
    per_linear, pruned_total, total = {}, 0, 0
    for l, layer in enumerate(decoder_layers(model)):
        with runtime.gathered(layer):
            for name, lin in layer_linears(layer).items():
                p, t = runtime.count_pruned(lin)
                per_linear[f"model.layers.{l}.{name}"] = p / t
                pruned_total += p
                total += t
    return pruned_total / total, per_linear


class Run:
    """What every command that writes a model shares: setup, evaluation, outputs."""

    def __init__(self, cfg: CommonConfig, command: str, runtime: Runtime | None = None):
        self.cfg = cfg
        self.command = command
        self.timer = Timer()
        self.runtime = runtime or Runtime(resolve_device(cfg.device))
        with self.timer.phase("load"):
            self.model, self.tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
            self.model.to(self.runtime.device)
        ctx = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.seqlen = cfg.seqlen or min(2048, ctx)
        if self.seqlen > ctx:
            raise LosaZeroError(f"--seqlen {self.seqlen} exceeds the model's context length {ctx}")
        self.eval_specs = list(cfg.ppl)
        self.eval_texts = {spec: load_eval_text(spec) for spec in self.eval_specs}  # fail early on bad paths

    def calibration(self) -> torch.Tensor:
        with self.timer.phase("data"):
            return calibration_windows(self.tokenizer, self.cfg.calib, self.cfg.nsamples, self.seqlen, seed=self.cfg.seed)

    def evaluate(self) -> dict:
        results = {}
        with self.timer.phase("eval"):
            for spec, text in self.eval_texts.items():
                name = parse_source(spec)[1].name
                r = perplexity(self.model, self.tokenizer, text, seqlen=self.cfg.eval_seqlen)
                results[name] = r
                self.runtime.info(f"perplexity {name}: {r['ppl']:.4f} (seqlen {r['seqlen']}, {r['tokens']} tokens)")
        return results

    def finish(self, out_dir: Path, summary: dict) -> dict:
        """Evaluate, save the model and write summary.json into the (temporary) output dir."""
        summary["perplexity"] = self.evaluate()
        with self.timer.phase("save"):
            save_model(self.model, self.tokenizer, out_dir)
        achieved, per_linear = sparsity_report(self.model, self.runtime)
        summary.update({
            "losa_zero_version": __version__,
            "command": self.command,
            "achieved_sparsity": achieved,
            "per_linear_sparsity": per_linear,
            "seconds": self.timer.total(),
            "peak_memory": peak_memory(),
            "config": {k: v for k, v in vars(self.cfg).items()},
        })
        write_json_atomic(out_dir / "summary.json", summary)
        return summary


def run_prune(cfg: PruneConfig, command: str = "losa-zero prune") -> dict:
    """One-shot magnitude / Wanda / SparseGPT pruning, block by block."""
    with atomic_output_dir(Path(cfg.out), overwrite=cfg.overwrite) as out_dir:
        run = Run(cfg, command)
        model, runtime = run.model, run.runtime
        model.eval()
        n_layers = len(decoder_layers(model))
        patterns = parse_nm(cfg.nm, n_layers) if cfg.nm else None
        if patterns:
            check_nm_fits(model, patterns)
        calib = run.calibration()
        pruner = cfg.make_pruner(cfg.method)
        importance = redundancy = besa = None

        def all_inputs():
            return capture_inputs(model, calib[runtime.local_indices(calib.shape[0])], runtime, cfg.calib_batch_size)

        def rmi():
            n = min(cfg.cka_nsamples, calib.shape[0])
            acts = capture_inputs(model, calib[runtime.local_indices(n)], runtime, cfg.calib_batch_size)
            grams = layer_input_grams(model, acts, runtime, cfg.calib_batch_size, n)
            beta = cfg.beta if cfg.beta is not None else (100.0 if cfg.method == "sparsegpt" else 1.0)
            imp, red = rmi_importance(grams, beta)
            return [float(x) for x in imp], [float(x) for x in red]

        def owl():  # outlier ratios of the dense model: more outliers = more important
            return owl_outlier_ratios(model, all_inputs(), runtime, cfg.calib_batch_size, cfg.owl_m)

        with run.timer.phase("importance"):
            if patterns:
                if cfg.allocation in ("rmi", "owl"):
                    # Mixed N:M (LoSA method doc section 7): one N:M given, N per layer from the
                    # allocation's importance, mean N exactly the given one.
                    if cfg.allocation == "rmi":
                        importance, redundancy = rmi()
                    else:
                        importance = owl()
                    n, m = patterns[0]
                    ns = mixed_nm_allocation(importance, n, m, n_min=min(n, max(1, n - cfg.nm_spread)),
                                             n_max=max(n, min(m - 1, n + cfg.nm_spread)))
                    patterns = [(k, m) for k in ns]
                    check_nm_fits(model, patterns)
                rates = [1 - n / m for n, m in patterns]
            elif cfg.allocation == "rmi":
                importance, redundancy = rmi()
                rates = solve_layer_rates(importance, cfg.sparsity, band_delta(cfg.sparsity))
            elif cfg.allocation == "owl":
                importance = owl()
                rates = owl_rates(importance, cfg.sparsity, cfg.owl_lambda)
            elif cfg.allocation == "besa":
                # BESA learns per-row (or per-linear) pruned counts on Wanda's ranking; the
                # pruner realises them below (with Wanda: exactly BESA's masks).
                besa = besa_allocate(model, all_inputs(), runtime, cfg.sparsity, BesaOptions.from_config(cfg),
                                     cfg.calib_batch_size)
                rates = besa.layer_rates
            else:
                rates = [cfg.sparsity] * n_layers

        def targets(l: int) -> dict[str, SparsityTarget]:
            if patterns:
                return {name: SparsityTarget.nm_pattern(*patterns[l]) for name in TARGET_LINEARS}
            if besa is not None:
                return besa.targets[l]
            return {name: SparsityTarget.unstructured(rates[l]) for name in TARGET_LINEARS}

        with run.timer.phase("prune"):
            acts = capture_inputs(model, calib[runtime.local_indices(calib.shape[0])], runtime, cfg.calib_batch_size)
            results = sequential_prune(model, acts, pruner, targets, runtime, cfg.calib_batch_size)
            del acts
        summary = {
            "method": cfg.method, "pruner": cfg.method,
            "allocation": ("nm" if cfg.allocation == "uniform" else f"mixed-nm-{cfg.allocation}") if patterns
            else cfg.allocation,
            "target_sparsity": (sum(rates) / len(rates)) if patterns else cfg.sparsity,
            "nm": cfg.nm,
            "per_layer": [{"layer": l, "rate": rates[l], "importance": None if importance is None else importance[l],
                           "redundancy": None if redundancy is None else redundancy[l],
                           "sparsity": results[l].sparsity} for l in range(n_layers)],
            "steps": [],
        }
        for l, row in enumerate(summary["per_layer"]):
            if patterns:
                row["nm"] = f"{patterns[l][0]}:{patterns[l][1]}"
            if besa is not None:
                row["besa"] = besa.blocks[l].record()
        summary = run.finish(out_dir, summary)
    _log_summary(summary)
    return summary


def run_losa(cfg: LosaConfig, command: str = "losa-zero losa") -> dict:
    """LoSA (method doc section 5) end to end, ending in a plain sparse HF model."""
    with atomic_output_dir(Path(cfg.out), overwrite=cfg.overwrite) as out_dir:
        run = Run(cfg, command)
        calib = run.calibration()
        total_examples = (cfg.steps - 1) * cfg.samples_per_step + cfg.final_step_samples
        with run.timer.phase("data"):
            examples = finetune_examples(run.tokenizer, cfg.train, cfg.max_length, limit=total_examples,
                                         seed=cfg.seed, train_on_inputs=cfg.train_on_inputs)
        # Padding is masked out of attention and loss, so its id only has to be a valid
        # embedding row; a tokenizer's pad id need not be (Qwen2's lies past the vocabulary
        # of small models), 0 always is.
        pad_id = 0
        metrics = MetricsWriter(out_dir / "metrics.jsonl" if run.runtime.is_main else None)
        torch.manual_seed(cfg.seed)  # LoRA dropout masks
        algo = Losa(run.model, cfg, run.runtime, calib, examples, pad_id, metrics)
        try:
            history = algo.run()
        finally:
            metrics.close()
        for key, value in algo.seconds.items():
            run.timer.add(key, value)
        summary = {
            "method": "losa", "pruner": cfg.pruner, "allocation": cfg.allocation,
            "rank_allocation": cfg.rank_allocation, "target_sparsity": cfg.sparsity, "nm": None,
            "per_layer": [{k: v for k, v in layer.items()} for layer in history[-1]["layers"]],
            "steps": history,
            "optimizer": choose_optimizer(cfg.optimizer, run.runtime.device.type).record(),
        }
        summary = run.finish(out_dir, summary)
    _log_summary(summary)
    return summary


def _log_summary(summary: dict) -> None:
    ppl = ", ".join(f"{k} {v['ppl']:.3f}" for k, v in summary.get("perplexity", {}).items())
    log.info(f"done: {summary['method']} sparsity {summary['achieved_sparsity']:.4f}"
             + (f", perplexity {ppl}" if ppl else "") + f", {summary['seconds']['total']:.1f}s")
