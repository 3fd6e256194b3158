"""Fine-tuning of the sparse-LoRA factors between LoSA steps (docs/method.md section 5, step 6).

The base weights are frozen; only ``lora_A`` / ``lora_B`` train. Each LoSA step starts a
fresh optimizer and a fresh linear schedule with warmup, as the released code does (it
builds a new trainer per step); ``--finetune-schedule continuous`` instead runs the steps'
passes as one optimizer run with one schedule (:func:`train_adapters`' ``schedule``). Released hyperparameters (section 6): paged 8-bit AdamW,
lr 2e-4, weight decay 0.001, gradient clipping 0.3, 30% linear warmup, effective batch 8.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data import collate
from .errors import LosaZeroError
from .lora import SparseLoRALinear
from .optimizers import choose_optimizer, make_optimizer
from .runtime import Runtime


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for m in model.modules():
        if isinstance(m, SparseLoRALinear):
            params += [m.lora_A, m.lora_B]
    return params




class MetricsWriter:
    """JSON lines, one object per optimizer step (rank 0 only), mirrored to TensorBoard
    (``tensorboard/`` beside the file) when the tensorboard package is installed."""

    def __init__(self, path: Path | None, tensorboard: bool = True):
        self.path = path
        self._tb = None
        self._global_step = 0
        if path is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(Path(path).parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._global_step += 1
            for key in ("loss", "lr", "tokens_per_s"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"train/{key}", record[key], self._global_step)
            self._tb.add_scalar("train/losa_step", record.get("losa_step", 0), self._global_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def linear_warmup_factor(step: int, total_steps: int, warmup_ratio: float) -> float:
    """HF Trainer's linear schedule (warmup over ceil(ratio * total) steps, then decay to 0)
    at optimizer step ``step`` (0-based): the numbers of transformers'
    ``get_linear_schedule_with_warmup``, as a pure function so a resumed run (or a DeepSpeed
    engine) can set the learning rate of any step directly."""
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup)))


def micro_seed(seed: int, losa_step: int, opt_step: int, micro: int) -> int:
    """The RNG seed of one micro-batch's forward (LoRA dropout). Seeding every micro-batch
    from its position, not from a running stream, makes dropout the same whatever the number
    of ranks sharing the batch, and a resumed run needs no RNG state to continue exactly."""
    return ((int(seed) * 1_000_003 + int(losa_step)) * 1_000_033 + int(opt_step)) * 1_009 + int(micro)


@torch.no_grad()
def grad_sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of ``grads`` in float64, in chunks (no float64 copy of a large
    gradient): the same value however the gradient is split into tensors, partitions or
    ranks, which is what makes clipping the same on one process and on any ZeRO-3 world."""
    dev = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    for g in grads:
        flat = g.reshape(-1)
        for a in range(0, flat.numel(), 1 << 24):
            sq += flat[a:a + (1 << 24)].to(torch.float64).square().sum()
    return sq


@torch.no_grad()
def clip_to_norm(grads: list[torch.Tensor], norm: float, max_norm: float) -> None:
    """Scale ``grads`` by max_norm / (norm + 1e-6) when that is below 1 (the formula of
    ``torch.nn.utils.clip_grad_norm_``), with the norm from :func:`grad_sum_of_squares`."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)


class LocalTrainer:
    """Adapter training on one process: a torch / bitsandbytes optimizer over ``lora_A`` /
    ``lora_B``. :func:`train_adapters` drives any object with these methods; the ZeRO-3
    trainer (``losa_zero.zero3.engine.ZeroTrainer``) implements them on a DeepSpeed engine,
    so both run the same loop."""

    rank = 0
    world_size = 1

    def __init__(self, model: nn.Module, optimizer_name: str, lr: float, weight_decay: float, max_grad_norm: float):
        self.model = model
        self.optimizer_name, self.lr, self.weight_decay = optimizer_name, lr, weight_decay
        self.max_grad_norm = max_grad_norm
        self.params: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        device = next(model.parameters()).device.type
        #: the optimizer the adapters train with (torch AdamW when bitsandbytes cannot step here)
        self.optimizer_choice = choose_optimizer(optimizer_name, device)

    def begin(self, fresh: bool = True) -> None:
        """Start a LoSA step's fine-tuning: a fresh optimizer (released code: a new trainer per step)."""
        self.params = adapter_parameters(self.model)
        if fresh or self.optimizer is None:
            self.optimizer = make_optimizer(self.params, self.optimizer_name, self.lr, self.weight_decay)
        self.model.train()

    def local_micro_batches(self, n_micro: int) -> list[int | None]:
        """Indices of the batch's micro-batches this process runs (None: a zero-weight filler)."""
        return list(range(n_micro))

    def forward(self, inputs: dict, num_items: int):
        # num_items_in_batch: the loss is the sum over this micro-batch's tokens divided by the
        # label tokens of the whole optimizer batch, so micro-batches (and ranks) add up to the
        # token mean of the batch.
        return self.model(**inputs, use_cache=False, num_items_in_batch=num_items)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        loss.backward()

    def sum_across_ranks(self, value: float) -> float:
        return value

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.max_grad_norm > 0:
            grads = [p.grad for p in self.params if p.grad is not None]
            clip_to_norm(grads, math.sqrt(float(grad_sum_of_squares(grads))), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end(self, keep_optimizer: bool = False) -> None:
        """``keep_optimizer``: the next step continues this optimizer (``--finetune-schedule
        continuous``); otherwise its state is dropped (the pruning between steps needs no optimizer)."""
        if not keep_optimizer:
            self.optimizer = None


def accumulate_batch(trainer, batch: list[dict], micro_batch_size: int, pad_id: int, device: torch.device,
                     seed_of: Callable[[int], int], where: str) -> float:
    """Forward and backward of one optimizer batch, micro-batch by micro-batch (this rank's
    share of them, :meth:`LocalTrainer.local_micro_batches`); returns the batch's loss, the
    token mean over the whole batch (summed across ranks). ``seed_of(micro)`` seeds each
    micro-batch's forward (LoRA dropout)."""
    n_micro = math.ceil(len(batch) / micro_batch_size)
    label_tokens = sum(sum(1 for x in e.get("labels", e["input_ids"])[1:] if x != -100) for e in batch)
    step_loss = 0.0
    mine = trainer.local_micro_batches(n_micro)
    for j, i in enumerate(mine):
        # A rank with no micro-batch left makes a zero-weight pass on two tokens: ZeRO-3
        # forwards are collective, so every rank runs the same number of them.
        filler = i is None
        part = ([{"input_ids": batch[0]["input_ids"][:2], "labels": batch[0]["input_ids"][:2]}] if filler
                else batch[i * micro_batch_size:(i + 1) * micro_batch_size])
        micro = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        torch.manual_seed(seed_of(-1 if filler else i))
        loss = trainer.forward(micro, max(1, label_tokens)).loss
        if filler:
            loss = loss * 0.0
        elif not torch.isfinite(loss):
            raise LosaZeroError(f"training loss is {loss.item()} at {where}: the learning rate is too large or the "
                                "dtype too narrow; lower --lr (run config: lr) or run in float32")
        trainer.backward(loss, boundary=j == len(mine) - 1)
        if not filler:
            step_loss += loss.item()
    return trainer.sum_across_ranks(step_loss)


def train_adapters(
    model: nn.Module,
    examples: list[dict],
    trainer,
    *,
    pad_id: int,
    lr: float,
    warmup_ratio: float,
    batch_size: int,
    micro_batch_size: int,
    runtime: Runtime,
    metrics: MetricsWriter,
    losa_step: int,
    progress: dict | None = None,
    on_opt_step=None,
    seed: int = 0,
    schedule: tuple[int, int] | None = None,
    fresh_optimizer: bool = True,
    keep_optimizer: bool = False,
) -> dict:
    """One LoSA step's fine-tuning pass over ``examples``; returns loss and throughput.

    ``trainer`` (a :class:`LocalTrainer` or the ZeRO-3 one) owns the optimizer and the
    backward pass. ``progress`` is this step's resumable position (optimizer steps done,
    their losses and tokens), updated in place; a run restored from a mid-step checkpoint
    passes it back and continues at the next optimizer step. ``on_opt_step(progress)`` runs
    after every optimizer step (periodic checkpoints).

    ``schedule = (offset, total)`` places this pass inside one warmup/decay schedule of
    ``total`` optimizer steps starting at step ``offset`` (``--finetune-schedule continuous``);
    None: the pass has its own schedule. ``fresh_optimizer=False`` goes on with the trainer's
    optimizer state; ``keep_optimizer`` keeps it at the end for the next pass.
    """
    if progress is None:
        progress = {}
    progress.setdefault("opt_step", 0)
    progress.setdefault("losses", [])
    progress.setdefault("tokens", 0)
    progress.setdefault("seconds", 0.0)
    total = math.ceil(len(examples) / batch_size)
    offset, schedule_total = schedule if schedule is not None else (0, total)
    was_training = model.training
    trainer.begin(fresh=progress["opt_step"] == 0 and fresh_optimizer)
    start = time.perf_counter() - progress["seconds"]
    bar = runtime.progress(range(progress["opt_step"], total), desc=f"finetune step {losa_step}", unit="opt-step",
                           initial=progress["opt_step"], total=total)
    for opt_step in bar:
        t0 = time.perf_counter()
        batch = examples[opt_step * batch_size:(opt_step + 1) * batch_size]
        step_loss = accumulate_batch(trainer, batch, micro_batch_size, pad_id, runtime.device,
                                     lambda micro: micro_seed(seed, losa_step, opt_step, micro),
                                     where=f"LoSA step {losa_step}, optimizer step {opt_step + 1}")
        step_tokens = sum(len(e["input_ids"]) for e in batch)
        step_lr = lr * linear_warmup_factor(offset + opt_step, schedule_total, warmup_ratio)
        try:
            trainer.step(step_lr)
        except RuntimeError as exc:  # torch: "value cannot be converted to type float without overflow"
            if "overflow" not in str(exc):
                raise
            raise LosaZeroError(f"learning rate {step_lr:g} overflows the optimizer's update at LoSA step {losa_step}, "
                                f"optimizer step {opt_step + 1}: lower --lr (run config: lr)") from None
        progress["losses"].append(step_loss)
        progress["tokens"] += step_tokens
        progress["opt_step"] = opt_step + 1
        progress["seconds"] = time.perf_counter() - start
        dt = time.perf_counter() - t0
        metrics.write({"losa_step": losa_step, "opt_step": opt_step + 1, "loss": step_loss,
                       "lr": step_lr, "tokens_per_s": step_tokens / dt if dt > 0 else None})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
        if on_opt_step is not None:
            on_opt_step(progress)
    trainer.end(keep_optimizer=keep_optimizer)
    model.train(was_training)
    seconds = time.perf_counter() - start
    losses = progress["losses"]
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    return {
        "opt_steps": total,
        "examples": len(examples),
        "train_loss": sum(tail) / len(tail),  # mean over the last 10% of the step
        "first_loss": losses[0] if losses else None,
        "tokens": progress["tokens"],
        "tokens_per_s": progress["tokens"] / seconds if seconds > 0 else None,
        "seconds": seconds,
    }
