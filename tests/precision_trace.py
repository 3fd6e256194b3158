"""The matmuls one sparse-LoRA layer runs in a forward + backward, with their dtypes.

Shared by tests/test_precision_policy.py and the ZeRO-3 worker it launches (run as a script:
``python precision_trace.py zero3``), so both layers are built, run and traced by the same code.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

OUT_F, IN_F, MAX_RANK, RANK, TOKENS = 48, 40, 8, 4, 96
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addmm_", "mm.out", "addmm.out"}


class MatmulTrace(TorchDispatchMode):
    """Records (flops, input dtypes, output dtype) of every matrix product dispatched."""

    def __init__(self):
        super().__init__()
        self.products: list[tuple[int, list[str], str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm"):
            a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            flops = batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            self.products.append((int(flops), [str(a.dtype), str(b.dtype)], str(out.dtype)))
        return out


def build_layer(weight_dtype: torch.dtype, dropout: float = 0.0, adapter_init=None, holder: nn.ModuleDict | None = None):
    """A wrapped bf16/fp32 linear and its mask; the factors are created inside
    ``adapter_init`` (a runtime's context) when given, and the layer is put into ``holder``
    there (the model that context registers the masks of)."""
    import contextlib

    from losa_zero.lora import wrap_linear

    g = torch.Generator().manual_seed(11)
    keep = torch.rand(OUT_F, IN_F, generator=g) < 0.5
    lin = nn.Linear(IN_F, OUT_F, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(OUT_F, IN_F, generator=g) * keep)
    lin = lin.to(weight_dtype)
    with adapter_init if adapter_init is not None else contextlib.nullcontext():
        layer = wrap_linear(lin, MAX_RANK, 2.0, dropout=dropout, init_seed=3)
        if holder is not None:
            holder["layer"] = layer
    return layer, keep


def run_traced(layer, keep, dtype: torch.dtype) -> list:
    """Set B, mask and rank, then trace one forward + backward on TOKENS tokens."""
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(OUT_F, MAX_RANK, generator=torch.Generator().manual_seed(5)))
    layer.set_keep_mask(keep)
    layer.set_rank(RANK)
    x = torch.randn(2, TOKENS // 2, IN_F, generator=torch.Generator().manual_seed(7)).to(dtype).requires_grad_(True)
    with MatmulTrace() as trace:
        y = layer(x)
        y.float().square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    return trace.products


def zero3_worker() -> None:
    """One ZeRO-3 rank (gloo, CPU): factors created under ZeroRuntime.adapter_init with a
    bf16 DeepSpeed config, block gathered, traced; the trace and factor dtype on stdout."""
    import torch.distributed as dist

    from losa_zero.zero3.dist_env import init_distributed
    from losa_zero.zero3.runtime import ZeroRuntime

    init_distributed("gloo")  # as a run does (no DeepSpeed shared-memory op build on CPU)
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    runtime = ZeroRuntime("cpu", ds, calib_batch_size=1)
    holder = nn.ModuleDict()
    layer, keep = build_layer(torch.bfloat16, adapter_init=runtime.adapter_init(holder), holder=holder)
    assert hasattr(layer.lora_A, "ds_id"), "the factors were not partitioned by zero.Init"
    with runtime.gathered(layer):
        products = run_traced(layer, keep, torch.bfloat16)
    print("TRACE " + json.dumps({"products": products, "factor_dtype": str(layer.lora_A.dtype)}))
    dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:] == ["zero3"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    zero3_worker()
