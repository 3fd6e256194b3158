"""The allocator registry beside the pruners': the CLI choices and config validation read
the registries, RMI's temperature default is written once, and the README's worked example
of a new allocator runs as written."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from losa_zero.allocators import ALLOCATORS, Allocation, Allocator, get_allocator, mixed_nm_allocators
from losa_zero.config import LosaConfig, PruneConfig
from losa_zero.errors import LosaZeroError
from losa_zero.pruners import PRUNERS

README = Path(__file__).resolve().parents[1] / "README.md"


def _choices(cls, name):
    return cls.__dataclass_fields__[name].metadata["choices"]


def test_cli_choices_come_from_the_registries():
    assert set(ALLOCATORS) == {"uniform", "rmi", "owl", "besa"}
    assert _choices(PruneConfig, "allocation") == tuple(ALLOCATORS) == _choices(LosaConfig, "allocation")
    assert _choices(PruneConfig, "method") == tuple(PRUNERS)
    assert _choices(LosaConfig, "pruner") == ("wanda", "sparsegpt")  # the calibrated ones
    assert mixed_nm_allocators() == ("rmi", "owl")
    with pytest.raises(LosaZeroError, match="unknown allocation 'nope'"):
        get_allocator("nope", None, "wanda")


@pytest.mark.parametrize("pruner, beta", [("wanda", 1.0), ("magnitude", 1.0), ("sparsegpt", 100.0)])
def test_rmi_temperature_default_by_pruner(pruner, beta):
    cfg = types.SimpleNamespace(beta=None)
    assert get_allocator("rmi", cfg, pruner).beta == beta
    assert get_allocator("rmi", types.SimpleNamespace(beta=3.0), pruner).beta == 3.0


def test_nm_rejects_allocators_that_cannot_mix(tmp_path):
    cfg = PruneConfig(model=str(tmp_path), out=str(tmp_path / "o"), calib="x.txt", nm="2:4", allocation="besa")
    with pytest.raises(LosaZeroError, match="use --allocation rmi or owl"):
        cfg.validate()


def _tiny_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_readme_worked_example_allocator_runs_as_written():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"`losa_zero/allocators/ramp.py`:\s*```python\n(.*?)```", text, re.S)
    assert block, "README Development section lost its worked allocator example"
    code = "\n".join(line[2:] if line.startswith("  ") else line for line in block.group(1).splitlines())
    module = types.ModuleType("losa_zero.allocators.ramp")
    module.__package__ = "losa_zero.allocators"
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "README.md (ramp.py)", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    cls = module.RampAllocator
    assert issubclass(cls, Allocator) and cls.name == "ramp"
    alloc = cls(types.SimpleNamespace(), "wanda").allocate(_tiny_llama(4), None, None, 0.5, 0.03)
    assert isinstance(alloc, Allocation)
    assert alloc.rates == sorted(alloc.rates) and abs(sum(alloc.rates) / 4 - 0.5) < 1e-12
    assert alloc.rates[0] == pytest.approx(0.47) and alloc.rates[-1] == pytest.approx(0.53)
