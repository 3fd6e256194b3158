"""The sparse-LoRA precision policy (losa_zero.lora module docstring), checked by tracing
every matrix product of a forward + backward with a TorchDispatchMode: weight-sized
products (x update^T, g update, g^T x, and the base linear's own two) in the compute dtype,
the masked update s (B A) ⊙ M formed in float32, for the single-process layer and for the
layer whose factors the ZeRO-3 runtime creates (zero.Init, bf16 DeepSpeed config)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from precision_trace import IN_F, MAX_RANK, OUT_F, RANK, TOKENS, build_layer, run_traced
from zero3_helpers import base_env, free_port

WEIGHT_SIZED = TOKENS * IN_F * OUT_F      # flops of a product over all tokens and the whole weight
UPDATE = RANK * IN_F * OUT_F              # flops of B_r A_r (and of the factor gradients)


def _classify(products):
    weight_sized = [p for p in products if p[0] >= WEIGHT_SIZED]
    update = [p for p in products if p[0] == UPDATE]
    return weight_sized, update


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_bf16_layer_runs_weight_sized_products_in_bf16(dropout):
    layer, keep = build_layer(torch.bfloat16, dropout)
    layer.train()
    assert layer.lora_A.dtype == torch.float32  # master factors stay float32 on one process
    products = run_traced(layer, keep, torch.bfloat16)
    weight_sized, update = _classify(products)
    # base forward + input gradient, adapter forward + input gradient, g^T x
    assert len(weight_sized) == 5, products
    assert all(p[1] == ["torch.bfloat16"] * 2 and p[2] == "torch.bfloat16" for p in weight_sized), weight_sized
    # B_r A_r (forward, and again in backward): float32 from the float32 master factors
    products_of_update = [p for p in update if p[2] == "torch.float32"]
    assert len(products_of_update) == 2, update
    assert all(p[1] == ["torch.float32"] * 2 for p in products_of_update)
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_fp32_layer_stays_fp32_on_the_merged_path():
    layer, keep = build_layer(torch.float32)
    products = run_traced(layer, keep, torch.float32)
    weight_sized, _ = _classify(products)
    # merged: one forward and one input-gradient product on W + s (B A) ⊙ M, plus g^T x
    assert len(weight_sized) == 3, products
    assert all(p[1] == ["torch.float32"] * 2 for p in weight_sized)


@pytest.mark.distributed
def test_zero3_layer_has_the_single_process_precision_policy(tmp_path):
    """Factors made under ZeroRuntime.adapter_init (bf16 config: DeepSpeed's bf16 compute
    copies of its fp32 master) run exactly the products, in exactly the dtypes, of the
    single-process layer."""
    env = base_env(tmp_path)
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_RANK": "0"})
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("precision_trace.py")), "zero3"],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("TRACE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    zero3 = json.loads(lines[-1][len("TRACE "):])
    assert zero3["factor_dtype"] == "torch.bfloat16"
    layer, keep = build_layer(torch.bfloat16)
    single = run_traced(layer, keep, torch.bfloat16)
    assert [tuple(p[:1]) + (tuple(p[1]), p[2]) for p in zero3["products"]] == \
        [tuple(p[:1]) + (tuple(p[1]), p[2]) for p in single]
    weight_sized, _ = _classify(single)
    assert len(weight_sized) == 5 and all(p[2] == "torch.bfloat16" for p in weight_sized)
    assert MAX_RANK > RANK  # the trace covers a sliced (rank < max rank) adapter
