"""The LoRA optimizer: the released paged 8-bit AdamW (bitsandbytes) when it can run where
the optimizer step runs, torch AdamW otherwise, with one warning and a record for summary.json.

Where the step runs matters: with DeepSpeed's ``offload_optimizer`` the step runs on the
host even on a GPU machine, and bitsandbytes has CPU optimizer kernels only from
:data:`BNB_MIN_CPU_VERSION` on (earlier releases refuse CPU tensors). Rather than trusting
version numbers alone, the choice builds the optimizer on a tiny tensor on that device and
takes one step: a missing package, a library without kernels for the device, or a broken
CUDA setup all show up there, once per process, before any real state exists.
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("losa_zero")

#: first bitsandbytes release whose optimizers run on CPU tensors (8-bit blockwise and
#: 32-bit update kernels for the CPU backend)
BNB_MIN_CPU_VERSION = (0, 50, 0)
BNB_OPTIMIZERS = {"paged_adamw_8bit": "PagedAdamW8bit", "adamw_8bit": "AdamW8bit"}
#: bitsandbytes keeps tensors smaller than this in 32-bit state: the probe must be larger
_PROBE_NUMEL = 8192


@dataclass(frozen=True)
class OptimizerChoice:
    requested: str
    used: str
    fallback: str | None  # why the requested optimizer could not be used (None: it is used)

    def record(self) -> dict:
        return {"requested": self.requested, "used": self.used, "fallback": self.fallback}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _bnb_problem(name: str, device_type: str) -> str | None:
    """Why bitsandbytes' ``name`` cannot step on ``device_type`` here (None: it can)."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a library that fails to load its binary
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    version = str(getattr(bnb, "__version__", "0"))
    if device_type == "cpu" and _version_tuple(version) < BNB_MIN_CPU_VERSION:
        need = ".".join(map(str, BNB_MIN_CPU_VERSION))
        return f"bitsandbytes {version} has no CPU optimizer kernels (they arrived in {need})"
    try:
        probe = torch.zeros(_PROBE_NUMEL, device=device_type, requires_grad=True)
        probe.grad = torch.full_like(probe, 1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = getattr(bnb.optim, BNB_OPTIMIZERS[name])([probe], lr=1e-3)
            opt.step()
        if not torch.isfinite(probe).all() or not bool((probe != 0).any()):
            return f"bitsandbytes {version} {BNB_OPTIMIZERS[name]} did not update a probe tensor on {device_type}"
        del opt
    except Exception as exc:
        return f"bitsandbytes {version} cannot step {BNB_OPTIMIZERS[name]} on {device_type} ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def choose_optimizer(name: str, device_type: str) -> OptimizerChoice:
    """The optimizer to build for ``name`` when the step runs on ``device_type`` ("cuda" /
    "cpu"); decided, and warned about, once per process."""
    if name not in BNB_OPTIMIZERS:
        return OptimizerChoice(name, name, None)
    problem = _bnb_problem(name, device_type)
    if problem is None:
        return OptimizerChoice(name, name, None)
    message = (f"optimizer {name} is not available: {problem}; training with torch AdamW instead "
               "(32-bit state: 4x the optimizer memory). Install bitsandbytes>="
               + ".".join(map(str, BNB_MIN_CPU_VERSION)) + " or set optimizer: adamw to silence this.")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    log.warning(message)
    return OptimizerChoice(name, "adamw", problem)


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float,
                   device_type: str | None = None) -> torch.optim.Optimizer:
    """paged_adamw_8bit (released default), adamw_8bit (bitsandbytes) or torch AdamW;
    ``device_type``: where the step runs (default: the parameters' device)."""
    if device_type is None:
        device_type = params[0].device.type if params else "cpu"
    choice = choose_optimizer(name, device_type)
    if choice.used == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    # On CPU bitsandbytes warns at every first step that paged memory is unavailable and
    # falls back to plain 8-bit AdamW; that is expected there and not worth a warning per step.
    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    return getattr(bnb.optim, BNB_OPTIMIZERS[choice.used])(params, lr=lr, weight_decay=weight_decay)
