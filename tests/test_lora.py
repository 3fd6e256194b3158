"""Sparse LoRA (method doc section 1) against dense references, torchao-style: a tiny layer,
the sparse path compared with the formula computed directly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from losa_zero.lora import SparseLoRALinear, unwrap_linear, wrap_linear
from losa_zero.losa import attach_sparse_lora, merge_and_unwrap, merge_block_adapters, unmerge_block_adapters
from losa_zero.modeling import decoder_layers, layer_linears
from losa_zero.runtime import Runtime


def _layer(out_f=12, in_f=20, max_rank=6, rank=4, scale=2.0, seed=0, density=0.5):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
    keep = torch.rand(out_f, in_f, generator=g) < density
    with torch.no_grad():
        lin.weight.mul_(keep)
    layer = wrap_linear(lin, max_rank, scale, dropout=0.0, init_seed=seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_f, max_rank, generator=g))
    layer.set_keep_mask(keep)
    layer.set_rank(rank)
    return layer, keep


def test_merged_weight_is_masked_formula():
    layer, keep = _layer()
    r, s = layer.rank, layer.scale
    expected = (layer.weight.detach() + s * layer.lora_B[:, :r].detach() @ layer.lora_A[:r].detach()) * keep
    merged = layer.weight.detach() + layer.delta_weight()
    torch.testing.assert_close(merged, expected)
    assert (merged[~keep] == 0).all()


def test_forward_equals_merged_linear():
    layer, keep = _layer()
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float32)
    merged = layer.weight.detach() + layer.delta_weight()
    ref = nn.functional.linear(x, merged, layer.bias.detach())
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_custom_backward_matches_autograd_reference():
    layer, keep = _layer()
    x = torch.randn(4, 7, layer.in_features, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    grads = (x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())

    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    r = layer.rank
    w = layer.weight.detach() + layer.scale * (B[:, :r] @ A[:r]) * keep
    (nn.functional.linear(x2, w, layer.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(grads[0], x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[2], B.grad, rtol=1e-5, atol=1e-5)
    # components beyond the active rank get no gradient at all
    assert (grads[1][r:] == 0).all() and (grads[2][:, r:] == 0).all()


def test_training_never_revives_pruned_weights():
    layer, keep = _layer()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1)
    for _ in range(20):
        x = torch.randn(8, layer.in_features)
        loss = (layer(x) - torch.randn(8, layer.out_features)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not layer.weight.requires_grad
    merged = layer.weight.detach() + layer.delta_weight()
    assert (merged[~keep] == 0).all()
    assert (merged[keep] != 0).float().mean() > 0.99


def test_rank_change_is_a_slice_not_a_reshape():
    layer, _ = _layer(max_rank=8, rank=3)
    a_ptr, b_ptr = layer.lora_A.data_ptr(), layer.lora_B.data_ptr()
    shapes = (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape))
    d3 = layer.delta_weight().clone()
    layer.set_rank(8)
    layer.set_rank(5)
    assert (layer.lora_A.data_ptr(), layer.lora_B.data_ptr()) == (a_ptr, b_ptr)
    assert (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)) == shapes
    torch.testing.assert_close(layer.delta_weight(rank=3), d3)
    with pytest.raises(ValueError):
        layer.set_rank(9)


def test_rank_zero_is_exactly_the_base_linear():
    layer, _ = _layer(rank=0)
    x = torch.randn(2, layer.in_features)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_merge_unmerge_with_new_mask_and_rank_keeps_effective_weight():
    """Section 5 step 4: after unmerge with the new mask (and the new rank) the effective
    weight equals the pruned merged weight, whatever the rank change."""
    layer, keep = _layer(rank=5)
    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.down_proj = layer
    runtime = Runtime()
    merged = layer.weight.detach() + layer.delta_weight()
    # prune 30% more of the merged weight (by magnitude), as a LoSA step would
    new_keep = keep & (merged.abs() > merged[keep].abs().quantile(0.3))
    for new_rank in (2, 5, 6):
        lay = copy.deepcopy(layer)
        lay.weight.data.copy_(merged * new_keep)
        lay.set_keep_mask(new_keep)
        lay.set_rank(0)
        lay.set_rank(new_rank)
        lay.weight.data.sub_(lay.delta_weight())
        eff = lay.weight.detach() + lay.delta_weight()
        torch.testing.assert_close(eff, merged * new_keep, rtol=1e-6, atol=1e-6)
    assert runtime.count_pruned(layer)[0] == int((~keep).sum())


def test_unwrap_gives_plain_linear_sharing_the_weight():
    layer, _ = _layer()
    lin = unwrap_linear(layer)
    assert type(lin) is nn.Linear
    assert lin.weight is layer.weight


def test_attach_merge_roundtrip_on_real_model(stories_model_dir):
    """Adapters attached to every linear of the real model: the forward equals the model
    with merged weights, and merge_and_unwrap leaves a plain LlamaForCausalLM."""
    from losa_zero.modeling import load_model

    model, _ = load_model(stories_model_dir)
    attach_sparse_lora(model, max_rank=4, scale=2.0, dropout=0.0, seed=0)
    g = torch.Generator().manual_seed(1)
    for layer in decoder_layers(model):
        for lin in layer_linears(layer).values():
            assert isinstance(lin, SparseLoRALinear)
            keep = torch.rand(lin.weight.shape, generator=g) < 0.6
            lin.weight.data.mul_(keep)
            lin.set_keep_mask(keep)
            lin.lora_B.data.normal_(generator=g)
            lin.set_rank(3)
    ids = torch.randint(3, 512, (2, 32), generator=g)
    with torch.no_grad():
        with_adapters = model(input_ids=ids).logits
    runtime = Runtime()
    merge_and_unwrap(model, runtime)
    assert not any(isinstance(m, SparseLoRALinear) for m in model.modules())
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(with_adapters, merged, rtol=1e-4, atol=1e-4)


def test_block_merge_then_unmerge_restores_weights(stories_model_dir):
    """merge_block_adapters / unmerge_block_adapters (what every LoSA step does around its
    pruning) are inverse to each other when the mask does not change."""
    from losa_zero.modeling import load_model

    model, _ = load_model(stories_model_dir)
    attach_sparse_lora(model, max_rank=4, scale=2.0, dropout=0.0, seed=0)
    layer = decoder_layers(model)[1]
    g = torch.Generator().manual_seed(2)
    for lin in layer_linears(layer).values():
        keep = torch.rand(lin.weight.shape, generator=g) < 0.5
        lin.weight.data.mul_(keep)
        lin.set_keep_mask(keep)
        lin.lora_B.data.normal_(generator=g)
        lin.set_rank(4)
    before = {n: l.weight.detach().clone() for n, l in layer_linears(layer).items()}
    runtime = Runtime()
    merge_block_adapters(layer, runtime, rank_after=0)
    changed = any(not torch.equal(before[n], l.weight) for n, l in layer_linears(layer).items())
    assert changed and all(l.rank == 0 for l in layer_linears(layer).values())
    unmerge_block_adapters(layer, runtime, rank=4)
    for n, l in layer_linears(layer).items():
        torch.testing.assert_close(l.weight.detach(), before[n], rtol=1e-6, atol=1e-6)
        assert l.rank == 4
