"""DeepSpeed configs: read a ds_configs/*.json file and fill its ``"auto"`` fields from the
run config, so batch sizes, precision and clipping are stated once (in the run config).

losa-zero owns some settings outright and says so instead of silently overriding them:
- the optimizer is a client optimizer (``optimizer:`` in the run config, bitsandbytes
  paged 8-bit AdamW by default), reset at every LoSA step: a DeepSpeed ``optimizer`` or
  ``scheduler`` section is an error;
- gradient clipping is done by losa-zero with a norm that does not depend on the number of
  ranks (DeepSpeed's own is turned off): ``gradient_clipping`` must be auto or equal to
  ``max_grad_norm``;
- features that keep a second copy of frozen weights or quantise them are refused (the
  pruned weights are written shard by shard).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import LosaZeroError

AUTO = "auto"


def load_ds_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LosaZeroError(f"DeepSpeed config {p} not found: pass deepspeed=ds_configs/zero3.json (or another file)")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise LosaZeroError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LosaZeroError(f"DeepSpeed config {p} must be a JSON object")
    return data


def _fill(d: dict, key: str, value, what: str, flag: str) -> None:
    """Set ``d[key]`` to ``value`` when absent or "auto"; a different explicit value is an error."""
    cur = d.get(key, AUTO)
    if cur == AUTO or cur is None:
        d[key] = value
    elif cur != value:
        raise LosaZeroError(f"DeepSpeed config sets {what}={cur} but the run config gives {value}: "
                            f"set it to \"auto\" there and use {flag} in the run config")


def fill_ds_config(ds: dict, cfg, world_size: int, hidden_size: int, path: str = "") -> dict:
    """A complete ZeRO-3 config for this run (a copy; ``ds`` is not modified)."""
    ds = copy.deepcopy(ds)
    where = f" ({path})" if path else ""
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise LosaZeroError(f"DeepSpeed config{where} has an '{section}' section: losa-zero builds the LoRA "
                                "optimizer and its schedule itself (set optimizer/lr/warmup_ratio in the run config)")
    # Micro-batches of an optimizer batch go round-robin to ranks; with more ranks than
    # micro-batches the others run zero-weight filler passes (they still hold their shards).
    n_micro = -(-cfg.batch_size // cfg.micro_batch_size)
    gas = -(-n_micro // world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, "train_micro_batch_size_per_gpu",
          "micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", gas, "gradient_accumulation_steps", "batch_size")
    # DeepSpeed's own bookkeeping value (micro x accumulation x ranks); the real batch is batch_size
    _fill(ds, "train_batch_size", cfg.micro_batch_size * gas * world_size, "train_batch_size", "batch_size")
    clip = ds.get("gradient_clipping", AUTO)
    if clip not in (AUTO, None, 0, 0.0, cfg.max_grad_norm):
        raise LosaZeroError(f"DeepSpeed config{where} sets gradient_clipping={clip}: set it to \"auto\" and use "
                            "max_grad_norm in the run config (losa-zero clips with a world-size-independent norm)")
    ds["gradient_clipping"] = 0.0
    if cfg.dtype == "float16":
        raise LosaZeroError("dtype float16 is not supported under ZeRO-3 (loss scaling): use bfloat16 or float32")
    bf16 = cfg.dtype == "bfloat16"
    for key, enabled in (("bf16", bf16), ("fp16", False)):
        section = ds.setdefault(key, {})
        if section.get("enabled", AUTO) in (AUTO, None):
            section["enabled"] = enabled
        elif bool(section["enabled"]) != enabled:
            raise LosaZeroError(f"DeepSpeed config{where} has {key}.enabled={section['enabled']} but the run's dtype is "
                                f"{cfg.dtype}: set it to \"auto\"")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 3) != 3:
        raise LosaZeroError(f"DeepSpeed config{where} has zero_optimization.stage={zero.get('stage')}: losa-zero runs ZeRO-3")
    zero["stage"] = 3
    h = int(hidden_size)
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h), ("sub_group_size", int(1e9))):
        if zero.get(key, AUTO) == AUTO:
            zero[key] = value
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if zero.get(key):
            raise LosaZeroError(f"DeepSpeed config{where} enables {key}: pruned weights are written shard by shard "
                                "and cannot be quantised by DeepSpeed; remove it")
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise LosaZeroError(f"DeepSpeed config{where} enables ZeRO++ hpZ (zero_hpz_partition_size): its secondary copy "
                            "of the weights is not supported with pruning; remove it")
    opt_off = zero.get("offload_optimizer") or {}
    if str(opt_off.get("device", "none")).lower() == "nvme":
        raise LosaZeroError(f"DeepSpeed config{where} offloads the optimizer to NVMe: the LoRA optimizer state is "
                            "small, offload it to \"cpu\" instead")
    ds["zero_allow_untested_optimizer"] = True     # bitsandbytes / torch client optimizers
    ds["zero_force_ds_cpu_optimizer"] = False      # ... also with offload_optimizer
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def offloads_params(ds: dict) -> str | None:
    """'cpu' or 'nvme' when the config offloads parameters, else None."""
    dev = str(((ds.get("zero_optimization") or {}).get("offload_param") or {}).get("device", "none")).lower()
    return dev if dev in ("cpu", "nvme") else None
