"""Validated run configurations: one dataclass per command, one field per option.

The same field names are the CLI flags (``--samples-per-step``), the YAML recipe keys
(``samples_per_step``) and, for the ZeRO-3 entry point, the run-config keys, so a run reads
the same way everywhere. Precedence: dataclass default < YAML file (``--config``) <
command-line flag. Defaults are the released LoSA hyperparameters (docs/method.md section 6)
unless a field's help says otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import LosaZeroError
from .allocators import ALLOCATORS, mixed_nm_allocators
from .modeling import DTYPES
from .outputs import check_writable_file
from .pruners import PRUNERS
from .runtime import check_device
from .shards import parse_size
from .yaml_layers import load_yaml

#: how LoSA's steps reach an N:M pattern (losa_zero.nm.NMSteps)
NM_SCHEDULES = ("capped", "descend", "patterns", "project")
FINETUNE_SCHEDULES = ("per_step", "continuous")


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: ``lo``/``hi`` (None: unbounded), each end
    closed unless marked open. Every number must also be finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


AT_LEAST_1, AT_LEAST_0, POSITIVE = Range(1), Range(0), Range(0, lo_open=True)
FRACTION = Range(0, 1, hi_open=True)  # [0, 1)


def opt(default: Any, help: str, choices: tuple | None = None, required: bool = False, range: Range | None = None,
        **cli):
    """A config field: its help, choices, whether it is required, and the range of a number
    (checked by :func:`check_fields`); ``cli`` holds extra command-line behaviour (``const``:
    the value of the flag given without one)."""
    return field(default=default,
                 metadata={"help": help, "choices": choices, "required": required, "range": range, **cli})


def flag(name: str) -> str:
    """The command-line flag of field ``name``."""
    return "--" + name.replace("_", "-")


def check_fields(cfg) -> None:
    """Required options given, choices respected, every number finite and within its
    range: the one check shared by the CLI, YAML recipes and key=value overrides (all of
    them build the same dataclass, :func:`build_config`)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        name = cfg.option_name(f.name)
        if f.metadata.get("required") and value in (None, "", []):
            raise LosaZeroError(f"missing required option {name}")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise LosaZeroError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
        check_number(f, value, name)


def check_number(f: dataclasses.Field, value, name: str) -> None:
    """A numeric option's ``value``: finite and within field ``f``'s range (named ``name``
    in the message)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise LosaZeroError(f"{name} must be a finite number (got {value})")
        bounds = f.metadata.get("range")
        if bounds is not None and value not in bounds:
            raise LosaZeroError(f"{name} must be {bounds} (got {value})")


class Options:
    """How messages name an option: the flag of the command line (run configs, which are
    YAML files and key=value overrides, name the key instead)."""

    @staticmethod
    def option_name(field_name: str) -> str:
        return flag(field_name)


def check_model_dir(path: str) -> None:
    if not Path(path).is_dir():
        raise LosaZeroError(f"model directory not found: {path} (convert or download the model first)")


def listing(help: str):
    """A list option: comma-separated on the command line, a list or a string in YAML."""
    return field(default_factory=list, metadata={"help": help})


@dataclass
class CommonConfig(Options):
    model: str | None = opt(None, "Hugging Face model directory (local)", required=True)
    out: str | None = opt(None, "output directory (written atomically)", required=True)
    calib: str | None = opt(None, "calibration text: [text|jsonl|alpaca|wikitext2:]PATH", required=True)
    nsamples: int = opt(128, "calibration sequences", range=AT_LEAST_1)
    seqlen: int | None = opt(None, "calibration sequence length (default: min(2048, model context))", range=Range(2))
    seed: int = opt(0, "seed for calibration windows, data order and LoRA init", range=AT_LEAST_0)
    dtype: str = opt("auto", "weight dtype during the run (auto: bfloat16 when computing on a GPU, float32 on CPU)",
                     ("auto", *DTYPES))
    device: str = opt("auto", "torch device (auto: cuda if available)")
    attn_implementation: str | None = opt(
        None, "attention kernel: sdpa, flash_attention_2 (needs the [gpu] extra) or eager (default: the "
        "architecture's, sdpa except eager for Gemma 2)", ("sdpa", "flash_attention_2", "eager"))
    calib_batch_size: int = opt(8, "sequences per block forward during calibration", range=AT_LEAST_1)
    rounding: str = opt("nearest", "per-linear pruned count: nearest to the rate (default) or the released int() per row",
                        ("nearest", "floor"))
    blocksize: int = opt(128, "SparseGPT column block size", range=AT_LEAST_1)
    percdamp: float = opt(0.01, "SparseGPT dampening, fraction of the mean Hessian diagonal", range=FRACTION)
    cka_nsamples: int = opt(64, "calibration sequences used for the CKA importance (released: 64 for 7B)",
                            range=AT_LEAST_1)
    beta: float | None = opt(None, "RMI importance temperature (default: 1 with Wanda, 100 with SparseGPT)",
                             range=POSITIVE)
    besa_granularity: str = opt("row", "BESA: learn a rate per output row (published headline) or per linear",
                                ("row", "layer"))
    besa_sigmoid: str = opt("auto", "BESA: probabilities softmax(sigmoid(logits)) (released default; rates then stay "
                            "within about [0.376, 0.624]) or softmax(logits); auto = on for targets in [0.4, 0.6] on "
                            "blocks with no weight pruned yet (LoSA's later steps: off), off otherwise",
                            ("auto", "on", "off"))
    besa_lambda: float = opt(5.0, "BESA: weight of the sparsity penalty lambda ((s_block - S) / S)^2 (released: 5)",
                             range=AT_LEAST_0)
    besa_d_coef: float | None = opt(None, "BESA: Prodigy d_coef (default by parameter count as released: 5 up to "
                                    "13B, 10 for 30B, 50 for 65B/70B)", range=POSITIVE)
    besa_epochs: int = opt(1, "BESA: epochs over the calibration sequences per block, batch 1 (released: 1)",
                           range=AT_LEAST_1)
    owl_m: float = opt(5.0, "OWL: a weight is an outlier when its Wanda score exceeds M times its layer's mean",
                       range=POSITIVE)
    owl_lambda: float = opt(0.08, "OWL: layer rates stay within target +- lambda", range=FRACTION)
    nm: str | None = opt(None, "N:M pattern (N kept of every M), e.g. 2:4, which sets the sparsity; or one N:M per "
                         "layer, comma-separated")
    nm_spread: int = opt(1, "mixed N:M: each layer's N stays within the mean N +- this (and 1 .. M-1)",
                         range=AT_LEAST_0)
    ppl: list[str] = listing("texts to score after the run, comma-separated source specs")
    eval_seqlen: int | None = opt(None, "perplexity window length (default: min(the model's context length, 4096))",
                                  range=Range(2))
    eval_batch_size: int = opt(4, "perplexity windows per forward", range=AT_LEAST_1)
    overwrite: bool = opt(False, "replace an existing output directory")
    save_format: str = opt("dense", "exported weights: dense safetensors, or compressed (the compressed-tensors "
                           "sparse-bitmask format; sparse-24-bitmask when every pruned linear is 2:4)",
                           ("dense", "compressed"))
    export_shard_size: str = opt("5GB", "largest safetensors file of the exported model")

    def make_pruner(self, name: str):
        """The pruner ``name`` built with the options of this config that it takes."""
        from .pruners import get_pruner

        return get_pruner(name, **{k: getattr(self, k) for k in PRUNERS[name].options if hasattr(self, k)})

    def validate(self) -> "CommonConfig":
        """Every field on its own (:func:`check_fields`), then the command's combinations of
        fields (:meth:`check_combinations`), then what needs the machine (device, model)."""
        check_fields(self)
        self.check_combinations()
        check_device(self.device)
        parse_size(self.export_shard_size)
        check_model_dir(self.model)
        return self

    def check_combinations(self) -> None:
        """Checks and defaults that involve several fields (none here)."""

    def input_paths(self) -> list[tuple[str, str | Path]]:
        """What the run reads, as (option, path): ``--out`` may not be, hold or lie in any."""
        from .data import split_source

        return ([("--model", self.model), ("--calib", split_source(self.calib)[1])]
                + [("--ppl", split_source(spec)[1]) for spec in self.ppl])


def nm_patterns(spec: str) -> list[tuple[int, int]]:
    """The (N, M) pairs of an ``--nm`` spec: one ``N:M``, or one per layer, comma-separated."""
    out = []
    for part in (p.strip() for p in str(spec).split(",") if p.strip()):
        try:
            n, m = (int(x) for x in part.split(":"))
        except ValueError:
            raise LosaZeroError(f"--nm {part!r} is not of the form N:M (e.g. 2:4)") from None
        if m < 1 or n < 1 or n > m:
            raise LosaZeroError(f"--nm {part}: need 1 <= N <= M (N weights kept in every M)")
        out.append((n, m))
    if not out:
        raise LosaZeroError("--nm is empty: give N:M (e.g. 2:4) or one N:M per layer")
    return out


def nm_sparsity(spec: str) -> float:
    """The sparsity an ``--nm`` spec means: 1 - N/M, averaged over a per-layer list."""
    rates = [1 - n / m for n, m in nm_patterns(spec)]
    return sum(rates) / len(rates)


def check_sparsity_or_nm(cfg) -> None:
    """--sparsity, or --nm (whose pattern sets the sparsity: a different --sparsity is an
    error); with --nm the allocation can only choose a mixed N per layer."""
    if cfg.nm is None:
        if cfg.sparsity is None:
            raise LosaZeroError("missing required option --sparsity (or give --nm N:M)")
        return
    nm_patterns(cfg.nm)  # the pattern's syntax, before any work
    if cfg.sparsity is not None and abs(cfg.sparsity - nm_sparsity(cfg.nm)) > 1e-9:
        raise LosaZeroError(f"--nm {cfg.nm} prunes {nm_sparsity(cfg.nm):g} of the weights but --sparsity is "
                            f"{cfg.sparsity:g}: drop --sparsity (the pattern sets it) or make them agree")
    if cfg.allocation != "uniform" and not ALLOCATORS[cfg.allocation].mixed_nm:
        raise LosaZeroError(f"--allocation {cfg.allocation} learns unstructured rates: it does not apply to --nm "
                            f"(for a mixed N per layer use --allocation {' or '.join(mixed_nm_allocators())})")
    if cfg.allocation != "uniform" and "," in str(cfg.nm):
        raise LosaZeroError("--nm lists one N:M per layer already: drop --allocation, or give one N:M "
                            f"and --allocation {'|'.join(mixed_nm_allocators())} to choose a mixed N per layer")


@dataclass
class PruneConfig(CommonConfig):
    method: str = opt("wanda", "one-shot pruning method", tuple(PRUNERS))
    sparsity: float | None = opt(None, "target fraction of pruned weights, in [0, 1) (with --nm: none, or the "
                                 "pattern's 1 - N/M)", range=FRACTION)
    allocation: str = opt("uniform", "layer-wise sparsity rates: uniform, RMI (LoSA), OWL, or BESA's learned "
                          "row/linear rates; with one --nm N:M, rmi or owl choose a mixed N per layer",
                          tuple(ALLOCATORS))

    def check_combinations(self) -> None:
        check_sparsity_or_nm(self)


@dataclass
class LosaConfig(CommonConfig):
    sparsity: float | None = opt(None, "final target sparsity S, in [0, 1) (with --nm: the pattern's)", range=FRACTION)
    steps: int = opt(5, "LoSA steps T (released: 5)", range=AT_LEAST_1)
    pruner: str = opt("wanda", "pruner applied to the merged weights at each step (one that uses calibration data)",
                      tuple(name for name, cls in PRUNERS.items() if cls.calibrated))
    allocation: str | None = opt(None, "layer-wise sparsity rates per step: RMI (LoSA; the default), uniform, OWL, or "
                                 "BESA's learned row/linear rates (the step's pruner then prunes to them); with --nm: "
                                 "uniform (the default), or rmi / owl choose a mixed N per layer at step 1",
                                 tuple(ALLOCATORS))
    nm_schedule: str = opt("patterns", "with --nm, how the steps reach the pattern: patterns (an N:M pattern every "
                           "step, N falling with the schedule), descend (N falls by one per step from M-1, e.g. 3:4 "
                           "then 2:4), capped (unstructured steps that never prune more than M-N of a group of M, "
                           "exact N:M at the last) or project (unstructured steps, N:M at the last; ends sparser)", NM_SCHEDULES)
    delta: float | None = opt(None, "rate band half-width (default: released 0.01/0.02/0.03 by step target)",
                              range=FRACTION)
    train: str | None = opt(None, "fine-tuning data: [text|jsonl|alpaca:]PATH", required=True)
    samples_per_step: int = opt(1000, "fine-tuning samples for steps t < T (released: 1000)", range=AT_LEAST_1)
    final_step_samples: int = opt(6000, "fine-tuning samples for the last step (released: 6000)", range=AT_LEAST_1)
    max_length: int = opt(1024, "fine-tuning example length in tokens (released: 1024)", range=Range(2))
    train_on_inputs: bool = opt(True, "compute the loss on prompt tokens too (instruction data)")
    lora_max_rank: int = opt(16, "LoRA factors' rank at creation = the largest allocatable rank", range=AT_LEAST_1)
    lora_alpha: float = opt(16.0, "LoRA alpha (released: 16)", range=POSITIVE)
    lora_scale_rank: int = opt(8, "rank in the fixed scale s = alpha / this (released: initial rank 8, s = 2)",
                               range=AT_LEAST_1)
    lora_dropout: float = opt(0.1, "LoRA dropout (released: 0.1)", range=FRACTION)
    rank_start: float = opt(6.0, "mean LoRA rank at step 1 (released: 6)", range=AT_LEAST_1)
    rank_end: float = opt(10.0, "mean LoRA rank at step T (released: 10)", range=AT_LEAST_1)
    rank_allocation: str = opt("error", "per-layer ranks from reconstruction error (LoSA) or uniform (ablation)",
                               ("error", "uniform"))
    optimizer: str = opt("paged_adamw_8bit", "LoRA optimizer", ("paged_adamw_8bit", "adamw_8bit", "adamw"))
    lr: float = opt(2e-4, "learning rate (released: 2e-4)", range=POSITIVE)
    weight_decay: float = opt(0.001, "weight decay (released: 0.001)", range=AT_LEAST_0)
    max_grad_norm: float = opt(0.3, "gradient clipping: the largest global gradient norm (released: 0.3)",
                               range=POSITIVE)
    warmup_ratio: float = opt(0.3, "linear warmup fraction of each step's schedule (released: 0.3)",
                              range=Range(0, 1))
    finetune_schedule: str = opt("per_step", "per_step (released: a fresh optimizer and warmup/decay schedule at "
                                 "every step) or continuous (one optimizer and one schedule over all steps' samples, "
                                 "the steps' pruning in between)", FINETUNE_SCHEDULES)
    batch_size: int = opt(8, "effective batch size (released: 8 for 7B)", range=AT_LEAST_1)
    micro_batch_size: int = opt(8, "examples per forward; gradients accumulate up to --batch-size", range=AT_LEAST_1)
    gradient_checkpointing: bool = opt(False, "recompute each decoder layer's activations in backward instead of "
                                       "keeping them (fine-tuning memory of big models and long sequences)")

    def check_combinations(self) -> None:
        if self.allocation is None:
            self.allocation = "uniform" if self.nm else "rmi"
        o = self.option_name
        check_sparsity_or_nm(self)
        if self.nm is not None:
            self.sparsity = nm_sparsity(self.nm)
        if not self.rank_start <= self.lora_max_rank or not self.rank_end <= self.lora_max_rank:
            raise LosaZeroError(f"{o('rank_start')}/{o('rank_end')} must be in [1, {o('lora_max_rank')}="
                                f"{self.lora_max_rank}]")
        if self.batch_size % self.micro_batch_size:
            raise LosaZeroError(f"{o('batch_size')} must be a multiple of {o('micro_batch_size')}")

    def input_paths(self) -> list[tuple[str, str | Path]]:
        from .data import split_source

        return super().input_paths() + [("--train", split_source(self.train)[1])]

    @property
    def total_examples(self) -> int:
        """Fine-tuning examples the whole run consumes: T - 1 steps of --samples-per-step, then
        --final-step-samples."""
        return (self.steps - 1) * self.samples_per_step + self.final_step_samples

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_scale_rank


@dataclass
class EvalConfig(Options):
    """``losa-zero eval``: score any model directory (ours or not)."""

    model: str | None = opt(None, "Hugging Face model directory", required=True)
    ppl: list[str] = listing("texts to score, comma-separated [text|jsonl|alpaca|wikitext2:]PATH")
    seqlen: int | None = opt(None, "perplexity window length (default: min(the model's context length, 4096))",
                             range=Range(2))
    tasks: list[str] = listing("zero-shot tasks through lm-eval, comma-separated")
    limit: int | None = opt(None, "at most this many items per zero-shot task", range=AT_LEAST_1)
    tasks_data: str | None = opt(None, "folder of the zero-shot JSONL files (default: $LOSA_ZERO_DATA/lm-eval-slices)")
    batch_size: int = opt(8, "zero-shot requests per forward", range=AT_LEAST_1)
    dtype: str = opt("auto", "weight dtype (auto: bfloat16 when evaluating on a GPU, float32 on CPU)",
                     ("auto", *DTYPES))
    device: str = opt("auto", "torch device (auto: cuda if available)")
    json: str | None = opt(None, "write the results to this JSON file")

    def validate(self) -> "EvalConfig":
        check_fields(self)
        if not self.ppl and not self.tasks:
            raise LosaZeroError("nothing to evaluate: give --ppl FILE[,FILE...] and/or --tasks NAME[,NAME...]")
        check_device(self.device)
        check_model_dir(self.model)
        if self.json:
            check_writable_file(self.json, "--json")
        return self


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field; defaults are suppressed so only given flags override
    the YAML recipe and the dataclass defaults."""
    parser.add_argument("--config", help="YAML recipe setting any of these options (flags override it)")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta.get("help", "")}
        default = f.default if f.default is not dataclasses.MISSING else None
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if "bool" in str(f.type):
            kwargs["action"] = argparse.BooleanOptionalAction
        if "const" in meta:  # the flag alone means `const`
            kwargs.update(nargs="?", const=meta["const"])
        if default not in (None, False, dataclasses.MISSING) and not meta.get("required"):
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(flag(f.name), **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    """The config ``cls`` from parsed flags over the YAML file of ``--config`` (if any)."""
    layers = []
    if getattr(args, "config", None):
        layers.append(load_yaml(args.config))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    layers.append(given)
    return build_config(cls, *layers)


def build_config(cls, *layers: dict):
    """Merge option layers (later wins) into a validated ``cls`` instance; unknown keys are errors."""
    known = {f.name: f for f in fields(cls)}
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            k = key.replace("-", "_")
            if k not in known:
                raise LosaZeroError(f"unknown option {key!r} (see --help for the valid options)")
            merged[k] = value
    for f in fields(cls):
        if _is_list(f) and isinstance(merged.get(f.name), str):
            merged[f.name] = [s for s in merged[f.name].split(",") if s]
    try:
        cfg = cls(**merged)
    except TypeError as e:
        raise LosaZeroError(str(e)) from None
    for f in fields(cfg):
        _coerce(cfg, f)
    return cfg.validate()


def _is_list(f) -> bool:
    return str(f.type).startswith("list")


def _kind(f) -> type | None:
    """The declared scalar type of a field (``int | None`` -> int)."""
    t = str(f.type)
    for kind in (bool, float, int, str):
        if kind.__name__ in t.replace("None", "").split(" | ") or t == kind.__name__:
            return kind
    return None


def _to_int(value) -> int:
    """An integer option from YAML, key=value or the CLI: 2 and 2.0 are 2; 2.7, "2.5" and
    True are errors (never silently truncated)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            value = float(text)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value)


def _coerce(cfg, f) -> None:
    """YAML and key=value overrides arrive as str/int/float/bool; give each field its
    declared type, refusing what would change the value (2.7 for an integer, 3 for a flag)."""
    value = getattr(cfg, f.name)
    kind = _kind(f)
    if value is None or kind is None or _is_list(f):
        return
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                value = value.lower() in ("true", "1", "yes")
            elif not isinstance(value, bool) and value not in (0, 1):
                raise ValueError(value)
            value = bool(value)
        elif kind is int:
            value = _to_int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError, OverflowError):
        what = {int: "an integer", float: "a number", bool: "true or false", str: "text"}[kind]
        raise LosaZeroError(f"{cfg.option_name(f.name)} expects {what} (got {value!r})") from None
    setattr(cfg, f.name, value)
