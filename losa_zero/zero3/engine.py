"""The DeepSpeed side of adapter training: one engine for the whole run, its optimizer
reset at every LoSA step, and the hooks switched off while LoSA calibrates.

``ZeroTrainer`` implements the trainer protocol of :func:`losa_zero.finetune.train_adapters`
(begin / local_micro_batches / forward / backward / sum_across_ranks / step / end), so the
fine-tuning loop is the single-process one. Design points:

- The engine is built once, after the sparse-LoRA factors exist (they are created at the
  maximum rank; a rank change is a slice, so nothing about the parameters ever changes).
- The optimizer is a client optimizer (bitsandbytes PagedAdamW8bit by default, AdamW8bit or
  torch AdamW) wrapped in :class:`ExactClipOptimizer`; a LoSA step's "fresh optimizer" is
  a reset of its state (the released code builds a new trainer per step), never a new engine.
- Micro-batches of an optimizer batch go round-robin to ranks; a rank with none left runs a
  zero-weight filler so every rank makes the same forwards (ZeRO-3 gathers collectively).
  Each loss is the micro-batch's token sum over the whole batch's label tokens, times the
  world size (DeepSpeed averages over ranks), so ranks add up to the token mean of the batch.
- Gradient clipping uses a float64 sum of squares over the partitions (DeepSpeed's own
  clipping is off): the norm, hence the update, does not depend on how the gradient is
  partitioned. With the same micro-batch split, 1 rank (accumulating 2 micro-batches) and
  2 ranks (one each) then compute bit-identical updates with torch AdamW.
- While LoSA calibrates, prunes and merges, DeepSpeed's module hooks are removed (as
  DeepSpeed's own ``unwrap_model_for_generation`` does) and blocks are gathered explicitly
  by the runtime; they are put back for fine-tuning and evaluation.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LosaZeroError
from ..finetune import adapter_parameters, clip_to_norm, grad_sum_of_squares
from ..optimizers import choose_optimizer, make_optimizer

log = logging.getLogger("losa_zero")


def _inner_attribute(name: str) -> property:
    """A property reading and writing ``self.inner.<name>``."""
    return property(lambda self: getattr(self.inner, name), lambda self, value: setattr(self.inner, name, value))


class ExactClipOptimizer(torch.optim.Optimizer):
    """Wraps the client optimizer DeepSpeed steps on each rank's flat fp32 partition:
    clips by the global gradient norm, computed as a float64 sum of squares all-reduced over
    ranks, then steps the wrapped optimizer. Everything else is the wrapped optimizer's."""

    def __init__(self, inner: torch.optim.Optimizer, max_norm: float, group=None):
        # No Optimizer.__init__: param_groups/state/defaults are the inner optimizer's own
        # objects, so DeepSpeed's rewiring of param_groups reaches the optimizer that steps.
        self.inner = inner
        self.max_norm = float(max_norm)
        self.group = group
        self.last_norm: float | None = None
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    # DeepSpeed reads and reassigns these on the optimizer it holds: forward both ways.
    param_groups = _inner_attribute("param_groups")
    state = _inner_attribute("state")
    defaults = _inner_attribute("defaults")

    def __getstate__(self):
        return self.inner.__getstate__()

    def __repr__(self):
        return f"ExactClipOptimizer({self.inner!r}, max_norm={self.max_norm})"

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        return self.inner.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True):
        return self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        return self.inner.add_param_group(param_group)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def global_norm(self) -> float:
        sq = grad_sum_of_squares(self._grads())
        if dist.is_initialized():
            comm = sq.to(self._comm_device())
            dist.all_reduce(comm, group=self.group)
            sq = comm
        return math.sqrt(float(sq))

    @staticmethod
    def _comm_device() -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm > 0:
            self.last_norm = self.global_norm()
            clip_to_norm(self._grads(), self.last_norm, self.max_norm)
        return self.inner.step(closure)


def reset_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Forget all per-parameter state (Adam moments, step counts): the next step starts as a
    freshly built optimizer would. bitsandbytes' paged state buffers are released too."""
    page_mng = getattr(opt, "page_mng", None)
    if page_mng is not None and getattr(page_mng, "paged_tensors", None):
        old = {id(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
        page_mng.paged_tensors = [t for t in page_mng.paged_tensors if id(t) not in old]
    opt.state.clear()


class ZeroTrainer:
    """Adapter trainer on a DeepSpeed ZeRO-3 engine (see the module docstring)."""

    def __init__(self, model: nn.Module, runtime, cfg, ds_config: dict):
        import deepspeed

        self.model, self.runtime, self.cfg = model, runtime, cfg
        self.rank, self.world_size = runtime.rank, runtime.world_size
        params = adapter_parameters(model)
        # With offload_optimizer DeepSpeed steps the client optimizer on the host's fp32 copy.
        offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
        step_device = "cpu" if str(offload).lower() in ("cpu", "nvme") else runtime.device.type
        self.optimizer_choice = choose_optimizer(cfg.optimizer, step_device)
        inner = make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay, step_device)
        self.optimizer = ExactClipOptimizer(inner, cfg.max_grad_norm)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        zopt = self.engine.optimizer
        if len(getattr(zopt, "fp16_groups", [None])) != 1:
            raise LosaZeroError("the LoRA factors were split into several ZeRO sub-groups: raise "
                                "zero_optimization.sub_group_size in the DeepSpeed config (1e9 is plenty)")
        self._offload = zopt.parameter_offload if hasattr(zopt, "parameter_offload") else zopt
        self._hooks_on = True
        self.hooks(False)

    # -- DeepSpeed's module hooks ---------------------------------------------------------------
    def hooks(self, active: bool) -> None:
        """Install (fine-tuning, evaluation) or remove (calibration) DeepSpeed's fetch/release hooks."""
        if active == self._hooks_on:
            return
        off = self._offload
        if active:
            coordinator = off.get_param_coordinator

            def start_of_forward(module, *args):
                coordinator().reset_step()

            off.fwd_pre_hook = off.module.register_forward_pre_hook(start_of_forward)
            off._register_deepspeed_module(off.module, count=[0])
        else:
            for h in off.forward_hooks + off.backward_hooks:
                h.remove()
            off.forward_hooks, off.backward_hooks = [], []
            if getattr(off, "fwd_pre_hook", None) is not None:
                off.fwd_pre_hook.remove()
                off.fwd_pre_hook = None
        self._hooks_on = active

    @contextlib.contextmanager
    def hooks_active(self):
        self.hooks(True)
        try:
            yield
        finally:
            self.hooks(False)

    # -- the train_adapters protocol ------------------------------------------------------------
    def begin(self, fresh: bool = True) -> None:
        if fresh:
            reset_optimizer_state(self.optimizer.inner)
        self.hooks(True)
        self.engine.train()

    def local_micro_batches(self, n_micro: int) -> list[int | None]:
        mine: list[int | None] = list(range(self.rank, n_micro, self.world_size))
        rounds = math.ceil(n_micro / self.world_size)
        return mine + [None] * (rounds - len(mine))

    def forward(self, inputs: dict, num_items: int):
        return self.engine(**inputs, use_cache=False, num_items_in_batch=num_items)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(boundary)
        # DeepSpeed averages gradients over ranks; the loss is a share of the batch's sum.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def sum_across_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.runtime.device)
        dist.all_reduce(t)
        return float(t.item())

    def step(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()

    def end(self, keep_optimizer: bool = False) -> None:
        # the state stays in the engine either way; the next begin(fresh=True) resets it
        self.engine.eval()
        self.hooks(False)

    # -- checkpoints --------------------------------------------------------------------------------
    def local_fp32(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's fp32 master slice of a trainable parameter (its partition layout)."""
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p).detach().float().cpu().clone()

    def set_local_fp32(self, p: nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_local_fp32_param

        safe_set_local_fp32_param(p, value.to(torch.float32))

    def optimizer_state(self) -> dict:
        sd = self.engine.optimizer.state_dict()
        return _to_cpu(sd)

    def load_optimizer_state(self, sd: dict | None) -> None:
        """Restore this rank's optimizer state (same world size) as DeepSpeed's ZeRO-3
        ``load_state_dict`` does, minus its copy into the 16-bit flat buffer: that buffer does
        not exist when parameters are offloaded to NVMe, and the module copies of the LoRA
        factors are restored with the weights (Checkpointer.load) anyway."""
        if sd is None:
            return
        zopt = self.engine.optimizer
        zopt.loss_scaler = sd["loss_scaler"]
        zopt.dynamic_loss_scale = sd["dynamic_loss_scale"]
        zopt.overflow = sd["overflow"]
        zopt._set_fp32_optimizer_param_groups()
        zopt.optimizer.load_state_dict(sd["optimizer_state_dict"])
        zopt._clear_fp32_optimizer_param_groups()
        for cur, saved in zip(zopt.fp32_partitioned_groups_flat, sd["fp32_flat_groups"]):
            cur.data.copy_(saved.data)


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj
