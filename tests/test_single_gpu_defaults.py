"""What lets one GPU hold a 7B LoSA run: ``--gradient-checkpointing`` (the same loss,
gradients and trained weights as without it) and ``dtype: auto`` (bf16 weights on a GPU,
fp32 on CPU), one option each for ``losa-zero losa`` and the ZeRO-3 run config."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from losa_zero.backend import LocalBackend
from losa_zero.config import LosaConfig
from losa_zero.finetune import LocalTrainer
from losa_zero.losa import attach_adapters
from losa_zero.modeling import decoder_layers, layer_linears, resolve_dtype
from losa_zero.runtime import Runtime

VOCAB = 61


def _adapted_llama(dropout: float, checkpointing: bool):
    """A tiny LLaMA with sparse-LoRA adapters attached the way a run attaches them, with
    non-zero B factors, random masks and a rank below the maximum (every path exercised)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32))
    cfg = SimpleNamespace(lora_max_rank=4, lora_scale=2.0, lora_dropout=dropout, seed=0,
                          gradient_checkpointing=checkpointing)
    attach_adapters(model, cfg, Runtime("cpu"))
    g = torch.Generator().manual_seed(1)
    for layer in decoder_layers(model):
        for lin in layer_linears(layer).values():
            with torch.no_grad():
                lin.lora_B.copy_(torch.randn(lin.lora_B.shape, generator=g) * 0.1)
            lin.set_keep_mask(torch.rand(lin.out_features, lin.in_features, generator=g) < 0.5)
            lin.set_rank(3)
    return model


def _train(dropout: float, checkpointing: bool, steps: int = 3):
    """First-step loss and gradients, and the adapter weights after ``steps`` AdamW steps."""
    model = _adapted_llama(dropout, checkpointing)
    assert model.is_activation_checkpointing == checkpointing
    mlp_calls = []
    # a pre-hook: non-reentrant recomputation stops as soon as the saved tensors are back
    decoder_layers(model)[1].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    trainer = LocalTrainer(model, "adamw", 1e-2, 0.001, 0.3)
    trainer.begin()
    data = torch.Generator().manual_seed(2)
    first = None
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (2, 16), generator=data)
        torch.manual_seed(100 + step)  # the same dropout masks in both runs
        loss = trainer.forward({"input_ids": ids, "labels": ids}, num_items=2 * 15).loss
        trainer.backward(loss, True)
        if first is None:
            first = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        trainer.step(1e-2)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(mlp_calls) == steps * (2 if checkpointing else 1)  # recomputed in backward: really checkpointed
    return first, weights


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_loss_gradients_and_weights(dropout):
    (loss0, grads0), w0 = _train(dropout, checkpointing=False)
    (loss1, grads1), w1 = _train(dropout, checkpointing=True)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)  # the forward is the same computation
    assert grads0.keys() == grads1.keys() and any("lora_A" in n for n in grads0)
    for n in grads0:
        assert grads0[n].abs().max() > 0, n
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-7)
    for n in w0:
        torch.testing.assert_close(w1[n], w0[n], rtol=1e-5, atol=1e-6)


def test_checkpointing_is_off_by_default_and_one_option_for_both_paths():
    from losa_zero.zero3.config import ZeroRunConfig

    declared = [c for c in (LosaConfig, ZeroRunConfig) if "gradient_checkpointing" in vars(c)["__annotations__"]]
    assert declared == [LosaConfig]
    assert "gradient_checkpointing" in {f.name for f in dataclasses.fields(ZeroRunConfig)}
    assert not _adapted_llama(0.0, checkpointing=False).is_activation_checkpointing


def test_dtype_auto_resolves_to_bf16_on_a_gpu_and_fp32_on_cpu():
    assert LosaConfig.__dataclass_fields__["dtype"].default == "auto"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("auto", torch.device("cuda", 3)) == "bfloat16"
    for explicit in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(explicit, torch.device("cuda")) == explicit == resolve_dtype(explicit, torch.device("cpu"))


@pytest.mark.parametrize("device,expected", [("cpu", "float32"), ("cuda", "bfloat16"), ("cuda:1", "bfloat16")])
def test_the_local_backend_resolves_auto_for_the_device_it_runs_on(device, expected):
    """The run (and summary.json's config) sees the concrete dtype, never "auto"."""
    cfg = SimpleNamespace(device=device, dtype="auto")
    backend = LocalBackend(cfg)
    assert backend.runtime.device.type == device.split(":")[0] and cfg.dtype == expected
    cfg = SimpleNamespace(device=device, dtype="float32")
    LocalBackend(cfg)
    assert cfg.dtype == "float32"


@pytest.mark.parametrize("device,expected", [("cpu", "float32"), ("cuda", "bfloat16")])
def test_eval_loads_in_the_dtype_auto_gives_for_its_device(device, expected, stories_model_dir, monkeypatch):
    """``losa-zero eval`` defaults to ``auto`` like the other commands: a 7B model scored on a
    GPU loads in bf16 (half the memory), on CPU in fp32. The load is stopped right there."""
    from losa_zero import eval_command
    from losa_zero.config import EvalConfig

    assert EvalConfig.__dataclass_fields__["dtype"].default == "auto"
    loaded = []

    class Loaded(Exception):
        pass

    def fake_load(path, dtype):
        loaded.append(dtype)
        raise Loaded

    monkeypatch.setattr(eval_command, "load_model", fake_load)
    monkeypatch.setattr(eval_command, "resolve_device", lambda name: torch.device(device))
    monkeypatch.setattr(eval_command, "Runtime", lambda dev: SimpleNamespace(device=torch.device(dev)))
    cfg = EvalConfig(model=str(stories_model_dir), ppl=[], tasks=["boolq"])
    monkeypatch.setattr("losa_zero.zeroshot.check_tasks", lambda *a, **k: None)
    with pytest.raises(Loaded):
        eval_command.run_eval(cfg)
    assert loaded == [expected]
