"""Fine-tuning of the sparse-LoRA factors between LoSA steps (method doc section 5, step 6).

The base weights are frozen; only ``lora_A`` / ``lora_B`` train. Each LoSA step starts a
fresh optimizer and a fresh linear schedule with warmup, as the released code does (it
builds a new trainer per step). Released hyperparameters (section 6): paged 8-bit AdamW,
lr 2e-4, weight decay 0.001, gradient clipping 0.3, 30% linear warmup, effective batch 8.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .data import collate
from .errors import LosaZeroError
from .lora import SparseLoRALinear
from .runtime import Runtime


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for m in model.modules():
        if isinstance(m, SparseLoRALinear):
            params += [m.lora_A, m.lora_B]
    return params


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """paged_adamw_8bit (released default), adamw_8bit (bitsandbytes) or torch AdamW."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "adamw_8bit": bnb.optim.AdamW8bit}[name]
    # On CPU bitsandbytes warns at every first step that paged memory is unavailable and
    # falls back to plain 8-bit AdamW; that is expected there and not worth a warning per step.
    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    return cls(params, lr=lr, weight_decay=weight_decay)


def linear_warmup_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """HF Trainer's linear schedule: warmup over ceil(ratio * total) steps, then decay to 0."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, math.ceil(total_steps * warmup_ratio), total_steps)


class MetricsWriter:
    """JSON lines, one object per optimizer step (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train_adapters(
    model: nn.Module,
    examples: list[dict],
    *,
    pad_id: int,
    optimizer_name: str,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    warmup_ratio: float,
    batch_size: int,
    micro_batch_size: int,
    runtime: Runtime,
    metrics: MetricsWriter,
    losa_step: int,
) -> dict:
    """One LoSA step's fine-tuning pass over ``examples``; returns loss and throughput."""
    params = adapter_parameters(model)
    optimizer = make_optimizer(params, optimizer_name, lr, weight_decay)
    total = math.ceil(len(examples) / batch_size)
    schedule = linear_warmup_schedule(optimizer, total, warmup_ratio)
    was_training = model.training
    model.train()
    losses: list[float] = []
    tokens_total = 0
    start = time.perf_counter()
    bar = runtime.progress(range(total), desc=f"finetune step {losa_step}", unit="opt-step")
    for opt_step in bar:
        t0 = time.perf_counter()
        batch = examples[opt_step * batch_size:(opt_step + 1) * batch_size]
        n_micro = math.ceil(len(batch) / micro_batch_size)
        step_loss = 0.0
        step_tokens = 0
        for i in range(n_micro):
            micro = collate(batch[i * micro_batch_size:(i + 1) * micro_batch_size], pad_id)
            micro = {k: v.to(runtime.device) for k, v in micro.items()}
            out = model(**micro, use_cache=False)
            loss = out.loss / n_micro
            if not torch.isfinite(loss):
                raise LosaZeroError(
                    f"training loss is {loss.item()} at LoSA step {losa_step}, optimizer step {opt_step + 1}: "
                    "lower --lr or run in float32")
            loss.backward()
            step_loss += loss.item()
            step_tokens += int(micro["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        tokens_total += step_tokens
        dt = time.perf_counter() - t0
        metrics.write({"losa_step": losa_step, "opt_step": opt_step + 1, "loss": step_loss,
                       "lr": schedule.get_last_lr()[0], "tokens_per_s": step_tokens / dt if dt > 0 else None})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
    model.train(was_training)
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    del optimizer
    return {
        "opt_steps": total,
        "examples": len(examples),
        "train_loss": sum(tail) / len(tail),  # mean over the last 10% of the step
        "first_loss": losses[0] if losses else None,
        "tokens": tokens_total,
        "tokens_per_s": tokens_total / seconds if seconds > 0 else None,
        "seconds": seconds,
    }
