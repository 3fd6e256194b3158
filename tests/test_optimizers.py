"""The LoRA optimizer falls back to torch AdamW, with one warning and a summary record, when
bitsandbytes cannot step where the optimizer runs (missing, too old for CPU, no kernels)."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from losa_zero import optimizers
from losa_zero.optimizers import choose_optimizer, make_optimizer


@pytest.fixture(autouse=True)
def fresh_choice():
    choose_optimizer.cache_clear()
    yield
    choose_optimizer.cache_clear()


def _params():
    return [torch.nn.Parameter(torch.randn(64, 128))]


def _build_twice(name, device_type=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opts = [make_optimizer(_params(), name, 1e-3, 0.0, device_type) for _ in range(2)]
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "torch AdamW instead" in str(w.message)]
    return opts, ours


def test_missing_bitsandbytes_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    opts, warned = _build_twice("paged_adamw_8bit")
    assert all(type(o) is torch.optim.AdamW for o in opts)
    assert len(warned) == 1 and "bitsandbytes cannot be imported" in str(warned[0].message)
    rec = choose_optimizer("paged_adamw_8bit", "cpu").record()
    assert rec["requested"] == "paged_adamw_8bit" and rec["used"] == "adamw"
    assert rec["fallback"].startswith("bitsandbytes cannot be imported")


def test_old_bitsandbytes_has_no_cpu_kernels(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bnb, "__version__", "0.49.2")
    opts, warned = _build_twice("adamw_8bit", "cpu")
    assert all(type(o) is torch.optim.AdamW for o in opts) and len(warned) == 1
    assert "0.49.2 has no CPU optimizer kernels (they arrived in 0.50.0)" in str(warned[0].message)


def test_unusable_device_falls_back():
    """A CUDA step requested where no CUDA exists: the probe step fails, so the fallback is taken."""
    pytest.importorskip("bitsandbytes")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    choice = choose_optimizer("adamw_8bit", "cuda")
    assert choice.used == "adamw" and "cannot step AdamW8bit on cuda" in choice.fallback


def test_working_bitsandbytes_is_used_and_trains_in_8bit():
    bnb = pytest.importorskip("bitsandbytes")
    if optimizers._version_tuple(bnb.__version__) < optimizers.BNB_MIN_CPU_VERSION:
        pytest.skip(f"bitsandbytes {bnb.__version__} predates CPU optimizer kernels")
    opts, warned = _build_twice("paged_adamw_8bit", "cpu")
    assert not warned and all(isinstance(o, bnb.optim.PagedAdamW8bit) for o in opts)
    p = torch.nn.Parameter(torch.zeros(64, 128))
    opt = make_optimizer([p], "adamw_8bit", 1e-2, 0.0)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8          # 8-bit state, not a silent fp32 path
    assert torch.allclose(p.detach(), torch.full_like(p, -1e-2), rtol=0.05)   # Adam's first step: -lr * sign(g)
    assert choose_optimizer("adamw", "cpu").record() == {"requested": "adamw", "used": "adamw", "fallback": None}


@pytest.mark.parametrize("text,expected", [("0.50.0", (0, 50, 0)), ("0.49.2", (0, 49, 2)),
                                           ("0.50.0.dev0", (0, 50, 0)), ("1.0.0+cu126", (1, 0, 0))])
def test_version_parsing(text, expected):
    assert optimizers._version_tuple(text) == expected


def test_losa_summary_records_the_fallback(monkeypatch, stories_model_dir, tinystories_split, tmp_path):
    """A short LoSA run without bitsandbytes: trains with AdamW, warns once, says so in summary.json."""
    import json

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from losa_zero.config import LosaConfig, build_config
    from losa_zero.lifecycle import run_losa

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(stories_model_dir).save_pretrained(tmp_path / "m")
    _, train_txt = tinystories_split
    cfg = build_config(LosaConfig, {"model": str(tmp_path / "m"), "calib": str(train_txt), "train": str(train_txt),
                                    "nsamples": 8, "seqlen": 64, "sparsity": 0.5, "steps": 2, "samples_per_step": 8,
                                    "final_step_samples": 8, "max_length": 64, "cka_nsamples": 4,
                                    "out": str(tmp_path / "out")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_losa(cfg)
    ours = [w for w in caught if "torch AdamW instead" in str(w.message)]
    assert len(ours) == 1   # two LoSA steps build two optimizers, one warning
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["optimizer"]["used"] == "adamw" and s["optimizer"]["requested"] == "paged_adamw_8bit"
    assert "bitsandbytes cannot be imported" in s["optimizer"]["fallback"]
