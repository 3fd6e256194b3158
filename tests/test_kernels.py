"""The bitmask layout, the C++ sparse kernel and the model loader against dense references."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from losa_zero.kernels import BitmaskLinear, pack_bitmask, unpack_bitmask
from losa_zero.kernels import build as kbuild
from losa_zero.kernels.layout import PAD_VALUES, ROW_BLOCK, unpack_bits


def _sparse_weight(out, cols, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    w[torch.rand(out, cols, generator=g) < sparsity] = 0
    return w.to(dtype)


@pytest.fixture(scope="module")
def kernel():
    if not kbuild.kernel_available():
        pytest.skip("the C++ sparse kernel could not be built here (see the warning above): no compiler")
    return kbuild.load_kernel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (16, 64), (33, 100), (6, 9)])
def test_pack_roundtrip(shape, dtype):
    w = _sparse_weight(*shape, 0.6, dtype)
    bw = pack_bitmask(w)
    out, cols = shape
    blocks, groups = -(-out // ROW_BLOCK), -(-cols // 8)
    assert bw.mask.shape == (blocks, groups * ROW_BLOCK) and bw.out_features == out
    assert bw.nnz == int((w != 0).sum())
    assert bw.values.numel() == bw.nnz + PAD_VALUES and not bw.values[bw.nnz:].any()
    assert torch.equal(unpack_bits(bw)[:, :cols], w != 0)
    assert not unpack_bits(bw)[:, cols:].any()  # padding columns are empty
    assert torch.equal(unpack_bitmask(bw), w)
    # the layout order, written out independently: per block, per group of 8 columns, per row
    wp = F.pad(w, (0, 8 * groups - cols, 0, ROW_BLOCK * blocks - out))
    for b in range(blocks):
        lo, hi = bw.block_offsets[b], bw.block_offsets[b + 1]
        expect, mbytes = [], []
        for k in range(groups):
            for i in range(ROW_BLOCK):
                seg = wp[ROW_BLOCK * b + i, 8 * k: 8 * k + 8]
                expect.append(seg[seg != 0])
                mbytes.append(sum(1 << j for j in range(8) if seg[j] != 0))
        assert torch.equal(bw.values[lo:hi], torch.cat(expect))
        assert bw.mask[b].tolist() == mbytes
    assert not unpack_bits(bw)[out:].any()  # the padding rows of the last block are empty


def test_pack_bytes_at_70_percent():
    w = _sparse_weight(256, 512, 0.7, torch.bfloat16)
    ratio = pack_bitmask(w).nbytes() / (w.numel() * 2)
    assert 0.34 < ratio < 0.38  # 0.3 values + 1/16 mask + offsets


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _expected_isa() -> str | None:
    """What the run-time dispatch must pick on this CPU (None: cannot tell, e.g. no /proc)."""
    import platform

    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        return None if not flags else "scalar"
    if {"avx2", "fma", "f16c", "popcnt", "bmi1", "bmi2"} <= flags:
        return "avx512" if "avx512f" in flags else "avx2"
    return "scalar"


def test_dispatch_reports_the_cpus_isa(kernel, monkeypatch):
    monkeypatch.delenv("LOSA_ZERO_KERNEL_ISA", raising=False)
    expected = _expected_isa()
    if expected is None:
        pytest.skip("no /proc/cpuinfo flags to check the dispatch against")
    assert kernel.isa() == expected
    monkeypatch.setenv("LOSA_ZERO_KERNEL_ISA", "scalar")
    assert kernel.isa() == "scalar"
    monkeypatch.setenv("LOSA_ZERO_KERNEL_ISA", "avx2")  # narrower than AVX-512 only; never wider than the CPU
    assert kernel.isa() == ("avx2" if expected in ("avx2", "avx512") else "scalar")
    monkeypatch.setenv("LOSA_ZERO_KERNEL_ISA", "avx512")
    assert kernel.isa() == expected


def _isas():
    """Every path this CPU can run: the best one (AVX-512 where present), AVX2 beneath it, scalar."""
    best = _expected_isa()
    return ["best", "scalar"] + (["avx2"] if best == "avx512" else [])


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_dense(kernel, monkeypatch, isa, dtype):
    if isa != "best":
        monkeypatch.setenv("LOSA_ZERO_KERNEL_ISA", isa)
        assert kernel.isa() == isa
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for out, cols in [(9, 13), (64, 64), (67, 200), (5, 8), (19, 2100)]:  # 2100: several column chunks
        w = _sparse_weight(out, cols, 0.7, dtype, seed=out)
        lin = torch.nn.Linear(cols, out, dtype=dtype)
        lin.weight.data = w
        sp = BitmaskLinear.from_linear(lin)
        for batch in (1, 2, 3, 4, 5, 8, 11):  # 11: tiles of 8 then 3
            x = torch.randn(2, batch, cols).to(dtype)
            ref = x.double() @ w.double().T + lin.bias.double()
            y = sp(x)
            assert y.dtype == dtype and y.shape == (2, batch, out)
            scale = ref.abs().max().item() + 1
            assert (y.double() - ref).abs().max().item() <= tol * scale, (out, cols, batch)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_edge_cases(kernel, monkeypatch, isa, dtype):
    """All-zero rows, a fully dense row, widths that are not multiples of 8 / 16 / 64 (odd
    mask-byte counts exercise the 16-lane tail), row counts off the row block, batch 1..8."""
    if isa != "best":
        monkeypatch.setenv("LOSA_ZERO_KERNEL_ISA", isa)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for out, cols in [(1, 1), (3, 7), (6, 9), (13, 24), (10, 72), (21, 130), (37, 257), (4, 512)]:
        w = _sparse_weight(out, cols, 0.7, dtype, seed=cols)
        w[0] = 0  # an all-zero row
        if out > 2:
            w[out // 2] = torch.randn(cols).to(dtype) + 3  # a row without zeros
            w[-1] = 0
        sp = BitmaskLinear(pack_bitmask(w))
        for batch in range(1, 9):
            x = torch.randn(batch, cols).to(dtype)
            ref = x.double() @ w.double().T
            y = sp(x)
            assert torch.all(y[:, 0] == 0)
            scale = ref.abs().max().item() + 1
            assert (y.double() - ref).abs().max().item() <= tol * scale, (out, cols, batch)


def test_kernel_threads_split_rows_by_nonzeros(kernel):
    """Rows of very uneven density, large enough to run on several threads: every row once."""
    torch.manual_seed(0)
    w = torch.zeros(1000, 700)
    w[:50] = torch.randn(50, 700)  # the first rows hold most nonzeros
    w[50:] = torch.where(torch.rand(950, 700) < 0.05, torch.randn(950, 700), torch.zeros(()))
    x = torch.randn(3, 700)
    y = BitmaskLinear(pack_bitmask(w))(x)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_kernel_fp32_equals_dense_closely(kernel):
    w = _sparse_weight(300, 1000, 0.7, torch.float32)
    x = torch.randn(4, 1000)
    y = BitmaskLinear(pack_bitmask(w))(x)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_large_batch_and_grad_take_the_dense_path(kernel):
    w = _sparse_weight(32, 48, 0.5, torch.float32)
    sp = BitmaskLinear(pack_bitmask(w), dense_above=4)
    x = torch.randn(10, 48, requires_grad=True)
    y = sp(x)
    torch.testing.assert_close(y, F.linear(x, w))
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(10, 48))
    assert torch.equal(sp.dense_weight(), w)


def test_kernel_rejects_bad_layout(kernel):
    rows = ROW_BLOCK + 2  # two row blocks, which hold ROW_BLOCK + 1 to 2 * ROW_BLOCK rows
    bw = pack_bitmask(_sparse_weight(rows, 16, 0.5, torch.float32))
    args = (bw.mask, bw.values, bw.block_offsets)
    with pytest.raises(RuntimeError, match="x has 8 columns"):
        kernel.matmul(torch.zeros(1, 8), *args, rows)
    with pytest.raises(RuntimeError, match="padding"):
        kernel.matmul(torch.zeros(1, 16), bw.mask, bw.values[:-1], bw.block_offsets, rows)
    with pytest.raises(RuntimeError, match="floating-point"):
        kernel.matmul(torch.zeros(1, 16, dtype=torch.int32), *args, rows)
    for out in (ROW_BLOCK, 2 * ROW_BLOCK + 1):
        with pytest.raises(RuntimeError, match="does not fit"):
            kernel.matmul(torch.zeros(1, 16), *args, out)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernel.decompress(*args, 2 * ROW_BLOCK + 1, torch.float32)


def test_no_compiler_falls_back_to_dense(monkeypatch, caplog):
    monkeypatch.setattr(kbuild, "_STATE", {})
    monkeypatch.setattr(kbuild, "_compiler", lambda: None)
    from losa_zero.kernels import linear as klinear

    w = _sparse_weight(8, 16, 0.5, torch.float32)
    with caplog.at_level(logging.WARNING):
        assert kbuild.load_kernel() is None
        y = BitmaskLinear(pack_bitmask(w))(torch.ones(1, 16))  # still correct, through unpacking
    assert klinear.load_kernel() is None
    torch.testing.assert_close(y, F.linear(torch.ones(1, 16), w))
    msgs = [r.getMessage() for r in caplog.records]
    assert any("no C++ compiler found" in m and "stay dense" in m for m in msgs)
    assert all("\n" not in m for m in msgs)


def _prune_magnitude(model, sparsity):
    from losa_zero.modeling import decoder_layers, layer_linears

    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in layer_linears(layer).values():
                w = lin.weight
                k = int(w.numel() * sparsity)
                thresh = w.abs().flatten().kthvalue(k).values
                w[w.abs() <= thresh] = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixture_model_generates_same_tokens(kernel, stories_model_dir, tmp_path, dtype):
    from losa_zero.kernels.loader import load_sparse_model
    from losa_zero.modeling import decoder_layers, load_model, save_model

    model, tok = load_model(stories_model_dir)
    _prune_magnitude(model, 0.7)
    save_model(model, tok, tmp_path / "sparse")
    dense, tok = load_model(tmp_path / "sparse", dtype=dtype)
    sparse, _, summary = load_sparse_model(tmp_path / "sparse", dtype=dtype)
    n_linears = 7 * len(decoder_layers(dense))
    assert summary["swapped"] == n_linears and summary["kept_dense"] == 0
    assert summary["compressed_bytes"] < 0.45 * summary["dense_bytes"]
    assert sum(isinstance(m, BitmaskLinear) for m in sparse.modules()) == n_linears
    ids = tok("Once upon a time, there was a little", return_tensors="pt").input_ids.repeat(3, 1)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits,
                                   **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.1}))
        kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id or 0)
        out_s = sparse.generate(ids, **kw)
        out_d = dense.generate(ids, **kw)
    assert torch.equal(out_s, out_d)


def test_dense_linears_are_kept(kernel, stories_model_dir):
    from losa_zero.kernels.loader import sparsify_linears
    from losa_zero.modeling import load_model

    model, _ = load_model(stories_model_dir)
    summary = sparsify_linears(model)
    assert summary["swapped"] == 0 and summary["kept_dense"] > 0


# --- GPU paths: format logic on CPU ---------------------------------------------------------

def test_pattern_weights_and_2to4_check():
    from losa_zero.kernels.bench_speed import pattern_weight
    from losa_zero.kernels.gpu import is_2to4

    w24 = pattern_weight(64, 128, "2:4", torch.bfloat16)
    assert is_2to4(w24) and float((w24 == 0).float().mean()) == 0.5
    w70 = pattern_weight(64, 128, "70%", torch.float32)
    assert abs(float((w70 == 0).float().mean()) - 0.7) < 1e-3 and not is_2to4(w70)
    kept = w70 != 0  # magnitude pruning keeps the largest weights
    assert w70[kept].abs().min() >= pattern_weight(64, 128, "0%", torch.float32)[~kept].abs().max()


def test_interleaved_rotates_the_order():
    from losa_zero.kernels.bench_speed import interleaved

    calls = []
    ms = interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, repeats=3, warmup=1)
    assert set(ms) == set("abc")
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"  # warm-up, then one rotation per repeat


def test_semi_structured_rejects_unstructured():
    from losa_zero.errors import LosaZeroError
    from losa_zero.kernels.gpu import to_semi_structured

    with pytest.raises(LosaZeroError, match="not 2:4"):
        to_semi_structured(_sparse_weight(8, 16, 0.5, torch.float16))


_TRITON_CHECK = """
import torch
from losa_zero.kernels import pack_bitmask
from losa_zero.kernels.gpu import triton_bitmask_matmul
for out, cols, batch in [(5, 13, 1), (16, 300, 3), (9, 64, 8), (6, 200, 2)]:
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(out, cols, generator=g)
    w[torch.rand(out, cols, generator=g) < 0.7] = 0
    w = w.to(torch.bfloat16)
    x = torch.randn(batch, cols, generator=g).to(torch.bfloat16)
    y = triton_bitmask_matmul(x, pack_bitmask(w), block=64)
    torch.testing.assert_close(y, x.float() @ w.float().T, rtol=1e-5, atol=1e-5)
print("TRITON_OK")
"""


def test_triton_bitmask_kernel_interpreted():
    """The Triton kernel on CPU through triton's interpreter, which must be switched on
    before triton is imported (hence a fresh process)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed here (it comes with CUDA builds of torch): Triton kernel not run")
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "TRITON_OK" in proc.stdout, proc.stderr[-3000:]
