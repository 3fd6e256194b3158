"""Sparse LoRA (docs/method.md section 1) against dense references, torchao-style: a tiny layer,
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
from zero3_helpers import DictMaskStore


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


# -- the masked paths ("merged" default, "separate") against a dense autograd reference ---------

# (model dtype, adapter dtype): fp32; a bf16 model with fp32 adapters (one process); all bf16
# (DeepSpeed bf16 casts the adapters too)
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16-model": (torch.bfloat16, torch.float32),
          "bf16-all": (torch.bfloat16, torch.bfloat16)}


def _typed_layer(dtypes, path, store, out_f=40, in_f=24, rank=5, bias=True):
    w_dtype, a_dtype = DTYPES[dtypes]
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(out_f, in_f, generator=g) < 0.5
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * keep)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    layer = wrap_linear(lin, 8, 2.0, dropout=0.0, init_seed=0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_f, 8, generator=g))
    layer.weight.data = layer.weight.data.to(w_dtype)
    if bias:
        layer.bias.data = layer.bias.data.to(w_dtype)
    layer.lora_A.data = layer.lora_A.data.to(a_dtype)
    layer.lora_B.data = layer.lora_B.data.to(a_dtype)
    if store:
        layer.mask_store = DictMaskStore()
    layer.set_keep_mask(keep)
    layer.set_rank(rank)
    layer.masked_path = path
    return layer, keep


@pytest.fixture(params=["whole", "blocks"])
def blocking(request, monkeypatch):
    """"blocks": tiny row / token blocks, so the blocked CPU code paths run on a small layer."""
    import losa_zero.lora as lora_mod

    if request.param == "blocks":
        monkeypatch.setattr(lora_mod, "_CPU_BLOCK_ELEMENTS", 3 * 24)
    return request.param


@pytest.mark.parametrize("store", [False, True], ids=["mask", "keep_fn"])
@pytest.mark.parametrize("path", ["merged", "separate"])
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_masked_paths_match_dense_reference(dtypes, path, store, blocking):
    """Output and gradients of x, A, B equal autograd through F.linear(x, W + s (B A) ⊙ M, b)
    (computed in float32 from the same values), for each path, dtype, and mask source."""
    layer, keep = _typed_layer(dtypes, path, store)
    w_dtype, a_dtype = DTYPES[dtypes]
    x = torch.randn(3, 7, layer.in_features).to(w_dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == w_dtype
    g = torch.randn_like(y)
    calls = layer.mask_store.calls if store else 0
    y.backward(g)
    if store:
        assert layer.mask_store.calls == calls + 1  # the backward rebuilt the mask instead of keeping it
    assert layer.weight.grad is None and layer.bias.grad is None

    r, s = layer.rank, layer.scale
    A = layer.lora_A.detach().float().requires_grad_(True)
    B = layer.lora_B.detach().float().requires_grad_(True)
    x2 = x.detach().float().requires_grad_(True)
    w = layer.weight.detach().float() + s * (B[:, :r] @ A[:r]) * keep
    ref = nn.functional.linear(x2, w, layer.bias.detach().float())
    (ref * g.float()).sum().backward()
    ref = ref.detach()
    if dtypes == "fp32":
        tol = dict(rtol=1e-5, atol=1e-5)
        tols = (tol, tol, tol, tol)
    else:  # bf16: every product runs in bf16 (the precision policy), so bf16 rounding everywhere
        bf = dict(rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        gx = dict(rtol=2e-2, atol=2e-2 * float(x2.grad.abs().max()))
        ga = dict(rtol=2e-2, atol=2e-2 * float(A.grad.abs().max()))
        gb = dict(rtol=2e-2, atol=2e-2 * float(B.grad.abs().max()))
        tols = (bf, gx, ga, gb)
    torch.testing.assert_close(y.float(), ref, **tols[0])
    torch.testing.assert_close(x.grad.float(), x2.grad, **tols[1])
    assert layer.lora_A.grad.dtype == a_dtype and layer.lora_B.grad.dtype == a_dtype
    torch.testing.assert_close(layer.lora_A.grad.float(), A.grad, **tols[2])
    torch.testing.assert_close(layer.lora_B.grad.float(), B.grad, **tols[3])
    # components beyond the active rank get exactly zero
    assert (layer.lora_A.grad[r:] == 0).all() and (layer.lora_B.grad[:, r:] == 0).all()


@pytest.mark.parametrize("store", [False, True], ids=["mask", "keep_fn"])
def test_merged_and_separate_paths_agree_fp32(store, blocking):
    """The two paths are the same function: outputs and gradients agree to float rounding."""
    results = []
    for path in ("merged", "separate"):
        layer, _ = _typed_layer("fp32", path, store, out_f=64, in_f=48, rank=6)
        x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(5), requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtypes", ["bf16-model", "bf16-all"])
def test_bf16_weight_takes_the_separate_path(dtypes):
    """A merged bf16 weight would round the update to W's precision per element: a bf16
    layer computes exactly what the separate path computes."""
    results = []
    for path in ("merged", "separate"):
        layer, _ = _typed_layer(dtypes, path, False)
        x = torch.randn(2, 9, layer.in_features, generator=torch.Generator().manual_seed(5)).bfloat16()
        x.requires_grad_(True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["merged", "separate"])
def test_training_never_revives_pruned_weights_on_either_path(path):
    layer, keep = _layer()
    layer.masked_path = path
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1)
    for _ in range(10):
        loss = (layer(torch.randn(8, layer.in_features)) - torch.randn(8, layer.out_features)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    merged = layer.weight.detach() + layer.delta_weight()
    assert (merged[~keep] == 0).all() and (merged[keep] != 0).float().mean() > 0.99


@pytest.mark.parametrize("store", [False, True], ids=["mask", "keep_fn"])
@pytest.mark.parametrize("path", ["merged", "separate"])
def test_no_weight_sized_tensor_saved_for_backward(path, store):
    """What a training forward keeps alive until backward: the input, the parameters
    themselves and at most the layer's own mask; nothing weight-sized is made for it (no
    merged weight, no B @ A), and with a ``keep_fn`` not even the mask."""
    layer, keep = _typed_layer("fp32", path, store, out_f=64, in_f=48)
    numel = layer.weight.numel()
    own = {layer.weight.data_ptr(), layer.lora_A.data_ptr(), layer.lora_B.data_ptr(), layer.bias.data_ptr()}
    if not store:
        own.add(layer._keep.data_ptr())
    big = []

    def pack(t):
        if t.numel() >= numel and t.data_ptr() not in own:
            big.append((tuple(t.shape), t.dtype))
        if store and t.dtype == torch.bool:
            big.append(("mask", tuple(t.shape)))
        return t

    x = torch.randn(4, 48, requires_grad=True)  # fewer tokens than weight rows: x is smaller than W
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert big == []
    y.sum().backward()


def test_dropout_takes_the_separate_path_and_eval_the_merged_one():
    """With LoRA dropout active the adapter sees dropout(x) and the base x, so "merged" must
    give exactly what "separate" gives (it falls back); in eval mode dropout is the identity
    and the merged forward equals the dense formula."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(20, 12)
    keep = torch.rand(12, 20, generator=g) < 0.5
    with torch.no_grad():
        lin.weight.mul_(keep)
    layer = wrap_linear(lin, 6, 2.0, dropout=0.3, init_seed=0)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)
    layer.set_keep_mask(keep)
    layer.set_rank(4)
    x = torch.randn(5, 20)
    outs = {}
    for path in ("merged", "separate"):
        layer.masked_path = path
        torch.manual_seed(7)
        outs[path] = layer(x)
    assert torch.equal(outs["merged"], outs["separate"])
    layer.eval()
    layer.masked_path = "merged"
    ref = nn.functional.linear(x, layer.weight.detach() + layer.delta_weight(), layer.bias.detach())
    torch.testing.assert_close(layer(x).detach(), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs["merged"], ref)  # dropout really was active in training mode


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_trainable_base_parameter_falls_back_and_gets_its_gradient(which):
    layer, keep = _layer()
    getattr(layer, which).requires_grad_(True)
    x = torch.randn(6, layer.in_features)
    layer(x).sum().backward()
    expected = torch.ones(6, layer.out_features).t() @ x if which == "weight" else torch.full((layer.out_features,), 6.0)
    torch.testing.assert_close(getattr(layer, which).grad, expected)


def test_masked_path_is_validated():
    layer, _ = _layer()
    layer.masked_path = "fused"
    with pytest.raises(ValueError, match="masked_path"):
        layer(torch.randn(2, layer.in_features))
