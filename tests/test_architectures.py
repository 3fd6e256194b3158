"""Every supported architecture, on a tiny random model of its real transformers config class.

The reference is always the model itself: the block-by-block forward that every algorithm
calibrates with must reproduce the model's own forward at every layer, including layers
whose attention is sliding-window (calibration sequences are longer than the window).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from archs import ALL_KINDS, MIXED_KINDS, WINDOW, tiny_config, tiny_model
from losa_zero.architectures import ARCHITECTURES, linear_shapes, widths
from losa_zero.blockwise import call_block, capture_inputs, forward_block
from losa_zero.errors import LosaZeroError
from losa_zero.modeling import (attn_implementation_for, check_supported, decoder_layers, input_groups, layer_linears,
                                linear_full_names, target_names)
from losa_zero.runtime import Runtime

SEQ = 3 * WINDOW - 8  # 40 tokens: crosses the sliding window


def _own_layer_outputs(model, ids):
    """Each decoder layer's output in the model's own forward (forward hooks)."""
    outs = []
    hooks = [l.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
             for l in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_blockwise_forward_equals_model_forward(kind):
    """Block by block with the per-layer arguments == the model's forward, every layer; a
    partial last batch (3 sequences, batch 2) checks that the captured masks broadcast."""
    model = tiny_model(kind)
    ids = torch.randint(3, 512, (3, SEQ), generator=torch.Generator().manual_seed(1))
    ref = _own_layer_outputs(model, ids)
    acts = capture_inputs(model, ids, Runtime("cpu"), batch_size=2)
    for l, layer in enumerate(decoder_layers(model)):
        acts.hidden = forward_block(layer, acts, 2, torch.device("cpu"), layer=l)
        torch.testing.assert_close(acts.hidden, ref[l], rtol=1e-5, atol=1e-5, msg=f"{kind} layer {l}")


@pytest.mark.parametrize("kind", MIXED_KINDS)
def test_layer_zero_arguments_would_be_wrong(kind):
    """The per-layer arguments matter: a sliding-window layer run with a full-attention
    layer's arguments (what calibrating every layer with layer 0's gave) is off."""
    model = tiny_model(kind)
    types = model.config.layer_types
    full, sliding = types.index("full_attention"), types.index("sliding_attention")
    ids = torch.randint(3, 512, (2, SEQ), generator=torch.Generator().manual_seed(2))
    acts = capture_inputs(model, ids, Runtime("cpu"), batch_size=2)
    layer = decoder_layers(model)[sliding]
    with torch.no_grad():
        right = call_block(layer, acts.hidden, acts.layer_kwargs[sliding])
        wrong = call_block(layer, acts.hidden, acts.layer_kwargs[full])
    assert (right - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_targets_found_from_the_model(kind):
    """The registry's names and widths match the modules the model really has, the groups
    share an input, and no nn.Linear of a layer is left out."""
    model = tiny_model(kind)
    arch = ARCHITECTURES[model.config.model_type]
    layer = decoder_layers(model)[0]
    lins = layer_linears(layer)
    assert tuple(lins) == target_names(model) == arch.target_names
    assert {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)} == set(lins)
    shapes = linear_shapes(arch, widths(model.config))
    assert {n: (l.in_features, l.out_features) for n, l in lins.items()} == shapes
    for group in input_groups(layer):
        assert len({lins[n].in_features for n in group}) == 1
    names = linear_full_names(model)
    assert len(names) == 3 * len(lins) and all(isinstance(model.get_submodule(n), nn.Linear) for n in names)


def test_input_groups_llama_and_phi3():
    assert input_groups(decoder_layers(tiny_model("llama3"))[0]) == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    assert input_groups(decoder_layers(tiny_model("phi3"))[0]) == [
        ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)]


def test_unsupported_architecture_one_line_error():
    with pytest.raises(LosaZeroError, match="model type 'gpt2' is not supported") as err:
        check_supported(type("C", (), {"model_type": "gpt2"})())
    msg = str(err.value)
    assert "\n" not in msg and all(t in msg for t in ARCHITECTURES)


def test_attn_implementation_choice(monkeypatch):
    assert attn_implementation_for(tiny_config("llama3")) == "sdpa"
    assert attn_implementation_for(tiny_config("gemma2")) == "eager"  # soft-capping: no SDPA kernel
    assert attn_implementation_for(tiny_config("qwen3"), "eager") == "eager"
    with pytest.raises(LosaZeroError, match="not available for gemma2"):
        attn_implementation_for(tiny_config("gemma2"), "sdpa")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    with pytest.raises(LosaZeroError, match="needs the flash-attn package"):
        attn_implementation_for(tiny_config("llama3"), "flash_attention_2")


def test_adapter_seeds_distinct_and_world_size_free():
    """One seed per linear, from (layer, position) only: LLaMA keeps its previous seeds."""
    from losa_zero.losa import adapter_seed

    seeds = {adapter_seed(0, l, j, 4) for l in range(5) for j in range(4)}
    assert len(seeds) == 20
    assert adapter_seed(3, 2, 5, 7) == 3 * 100003 + 2 * 7 + 5


def _reloaded_sparsity(out_dir, kind) -> float:
    """Sparsity of the target linears of an output directory loaded with plain transformers,
    which must give the same model class as the tiny model it came from."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    assert type(model) is type(tiny_model(kind))
    zeros = total = 0
    for name in linear_full_names(model):
        w = model.get_submodule(name).weight
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total


@pytest.fixture(scope="module")
def tiny_dirs(stories_model_dir, tmp_path_factory):
    from archs import save_tiny_model

    base = tmp_path_factory.mktemp("tiny_archs")
    return {kind: save_tiny_model(kind, base / kind, stories_model_dir) for kind in ALL_KINDS}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_prune_and_losa_every_architecture(kind, tiny_dirs, tinystories_split, tmp_path):
    """SparseGPT at 50% and 2:4, and a two-step LoSA run, on every architecture; each export
    reloads with AutoModelForCausalLM as the same class at the target sparsity."""
    from losa_zero.config import LosaConfig, PruneConfig, build_config
    from losa_zero.lifecycle import run_losa, run_prune
    from losa_zero.pruners import satisfies_nm

    _, train_txt = tinystories_split
    common = {"model": str(tiny_dirs[kind]), "calib": str(train_txt), "nsamples": 4, "seqlen": SEQ,
              "calib_batch_size": 2}
    s = run_prune(build_config(PruneConfig, common, {"method": "sparsegpt", "sparsity": 0.5, "out": str(tmp_path / "p")}))
    assert abs(s["achieved_sparsity"] - 0.5) < 0.005
    assert abs(_reloaded_sparsity(tmp_path / "p", kind) - 0.5) < 0.005
    s = run_prune(build_config(PruneConfig, common, {"method": "sparsegpt", "nm": "2:4", "out": str(tmp_path / "nm")}))
    assert s["achieved_sparsity"] == pytest.approx(0.5)
    from transformers import AutoModelForCausalLM

    nm = AutoModelForCausalLM.from_pretrained(tmp_path / "nm", local_files_only=True)
    assert all(satisfies_nm(nm.get_submodule(n).weight != 0, 2, 4) for n in linear_full_names(nm))
    s = run_losa(build_config(LosaConfig, common, {"train": str(train_txt), "sparsity": 0.5, "steps": 2,
                                                   "samples_per_step": 4, "final_step_samples": 4, "max_length": SEQ,
                                                   "cka_nsamples": 4, "lora_max_rank": 4, "rank_start": 2, "rank_end": 3,
                                                   "optimizer": "adamw", "batch_size": 2, "micro_batch_size": 2,
                                                   "out": str(tmp_path / "l")}))
    assert abs(s["achieved_sparsity"] - 0.5) < 0.005
    assert abs(_reloaded_sparsity(tmp_path / "l", kind) - 0.5) < 0.005


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["qwen3", "gemma2"])
def test_zero3_train_two_ranks(kind, tiny_dirs, tinystories_split, tmp_path):
    """``losa-zero train`` (ZeRO-3, 2 CPU ranks) on models whose layers mix sliding and full
    attention; the export reloads as the same class at the achieved sparsity."""
    pytest.importorskip("deepspeed")
    from zero3_helpers import REPO, launch, summary, write_config

    _, train_txt = tinystories_split
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", {
        "model": str(tiny_dirs[kind]), "calib": str(train_txt), "train": str(train_txt), "sparsity": 0.5,
        "steps": 2, "nsamples": 4, "seqlen": SEQ, "cka_nsamples": 4, "calib_batch_size": 2, "samples_per_step": 4,
        "final_step_samples": 4, "max_length": SEQ, "batch_size": 2, "micro_batch_size": 1, "optimizer": "adamw",
        "lora_max_rank": 4, "rank_start": 2, "rank_end": 3, "out": str(out),
        "deepspeed": str(REPO / "ds_configs" / "zero3_cpu_test.json")})
    run = launch(cfg, [], 2, tmp_path, tmp_path / "run.log", out)
    rc = run.wait(600)
    assert rc == 0, f"run failed (exit {rc}); log tail:\n{run.text()[-6000:]}"
    s = summary(out)
    assert s["world_size"] == 2 and abs(s["achieved_sparsity"] - 0.5) < 0.005
    assert _reloaded_sparsity(out, kind) == pytest.approx(s["achieved_sparsity"], abs=1e-6)
