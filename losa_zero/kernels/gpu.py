"""GPU paths for sparse models: a Triton kernel for the bitmask layout (decode) and PyTorch's
semi-structured sparse tensors for 2:4 models (prefill).

Both read the formats the CPU path uses (:mod:`losa_zero.kernels.layout`); their logic is
tested on CPU (Triton through ``TRITON_INTERPRET=1`` where triton is installed) and their
speed is measured by :func:`run_gpu_bench` on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LosaZeroError
from .layout import ROW_BLOCK, BitmaskWeight, pack_bitmask

try:  # triton comes with CUDA builds of torch; CPU machines may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def triton_available() -> bool:
    return triton is not None


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive input weights has at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).view(weight.shape[0], -1, 4).sum(-1) <= 2).all())


if triton is not None:

    def _bitmask_matvec(x_ptr, mask_ptr, values_ptr, offsets_ptr, y_ptr, in_pad, out_features, batch,
                        GROUPS: tl.constexpr, ROWS: tl.constexpr, BATCH: tl.constexpr):
        """One program per block of ROWS rows: walk the block's mask bits in layout order
        (column group, row, column), GROUPS groups of 8 columns at a time, find each
        nonzero's position in the packed values by a prefix count of those bits, and
        accumulate each row's products against BATCH tokens at once."""
        blk = tl.program_id(0)
        groups = in_pad // 8
        f = tl.arange(0, 8 * ROWS * GROUPS)  # bit index in a chunk: group, row, column
        grp = f // (8 * ROWS)
        row = (f // 8) % ROWS
        col = f % 8
        toks = tl.arange(0, BATCH)
        rows = tl.arange(0, ROWS)
        pick = row[None, :] == rows[:, None]  # [ROWS, bits]: which bits belong to which row
        acc = tl.zeros((BATCH, ROWS), dtype=tl.float32)
        seen = tl.load(offsets_ptr + blk)
        for k0 in range(0, groups, GROUPS):
            k = k0 + grp
            inside = k < groups
            byte = tl.load(mask_ptr + (blk * groups + k) * ROWS + row, mask=inside, other=0).to(tl.int32)
            bit = (byte >> col) & 1
            pos = seen + tl.cumsum(bit, axis=0) - bit
            w = tl.load(values_ptr + pos, mask=bit != 0, other=0.0).to(tl.float32)
            xt = tl.load(x_ptr + toks[:, None] * in_pad + (8 * k + col)[None, :],
                         mask=(toks[:, None] < batch) & inside[None, :], other=0.0).to(tl.float32)
            prod = xt * w[None, :]  # [BATCH, bits]
            acc += tl.sum(tl.where(pick[None, :, :], prod[:, None, :], 0.0), axis=2)
            seen += tl.sum(bit, axis=0)
        r = blk * ROWS + rows
        tl.store(y_ptr + toks[:, None] * out_features + r[None, :], acc,
                 mask=(toks[:, None] < batch) & (r[None, :] < out_features))


_JIT: dict = {}


def _kernel():
    """The jitted kernel, compiled at first use: ``TRITON_INTERPRET=1`` (the CPU test mode)
    is read by ``triton.jit`` when it wraps the function, so wrapping waits until then."""
    import os

    key = os.environ.get("TRITON_INTERPRET", "0")
    if key not in _JIT:
        _JIT[key] = triton.jit(_bitmask_matvec)
    return _JIT[key]


def triton_bitmask_matmul(x: torch.Tensor, packed: BitmaskWeight, block: int = 128) -> torch.Tensor:
    """``x @ W^T`` (fp32 result) for x [batch <= 8, in] with W in the bitmask layout, by Triton
    (``block``: columns per step of a program, a power of two >= 8; the step handles
    ``block * ROW_BLOCK`` mask bits at once, 1024 by default)."""
    if triton is None:
        raise LosaZeroError("triton is not installed: install torch for CUDA (which brings triton) to use the GPU path")
    batch = x.shape[0]
    if not 1 <= batch <= 8:
        raise ValueError(f"the Triton bitmask kernel is for decode batches of 1-8 tokens, got {batch}")
    xp = F.pad(x.float(), (0, packed.in_padded - packed.in_features)).contiguous()
    y = torch.empty(batch, packed.out_features, dtype=torch.float32, device=x.device)
    _kernel()[(packed.mask.shape[0],)](
        xp, packed.mask, packed.values, packed.block_offsets, y, packed.in_padded, packed.out_features, batch,
        GROUPS=block // 8, ROWS=ROW_BLOCK, BATCH=8)
    return y


def to_semi_structured(weight: torch.Tensor):
    """A 2:4 weight as PyTorch's semi-structured sparse tensor (CUDA, fp16/bf16)."""
    if not is_2to4(weight):
        raise LosaZeroError("weight is not 2:4 sparse: prune with --nm 2:4 first")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight)


def _cuda_ms(fn, repeats: int) -> float:
    import statistics

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_gpu_bench(patterns=("50%", "70%", "2:4"), shapes=((4096, 4096), (11008, 4096), (4096, 11008)),
                  batches=(1, 8), prefill_tokens: int = 2048, repeats: int = 50) -> dict:
    """GPU timings, bf16: Triton bitmask decode and semi-structured 2:4 prefill vs dense."""
    from .bench_speed import pattern_weight

    if not torch.cuda.is_available():
        raise LosaZeroError("bench-speed --device cuda needs a CUDA GPU; none is visible")
    dev = torch.device("cuda")
    decode_rows, prefill_rows = [], []
    for out, cols in shapes:
        for pattern in patterns:
            w = pattern_weight(out, cols, pattern, torch.bfloat16).to(dev)
            packed = pack_bitmask(w.cpu())
            packed = BitmaskWeight(packed.mask.to(dev), packed.values.to(dev), packed.block_offsets.to(dev), cols, out)
            ceiling = w.numel() * 2 / packed.nbytes()
            for b in batches:
                x = torch.randn(b, cols, device=dev, dtype=torch.bfloat16)
                got = triton_bitmask_matmul(x, packed)
                torch.testing.assert_close(got, x.float() @ w.float().T, rtol=2e-2, atol=2e-2)
                dense = _cuda_ms(lambda: F.linear(x, w), repeats)
                sparse = _cuda_ms(lambda: triton_bitmask_matmul(x, packed), repeats)
                decode_rows.append((out, cols, pattern, b, sparse, dense, ceiling))
            if pattern == "2:4":
                ws = to_semi_structured(w)
                x = torch.randn(prefill_tokens, cols, device=dev, dtype=torch.bfloat16)
                torch.testing.assert_close(F.linear(x, ws), F.linear(x, w), rtol=2e-2, atol=2e-1)
                dense = _cuda_ms(lambda: F.linear(x, w), repeats)
                sparse = _cuda_ms(lambda: F.linear(x, ws), repeats)
                prefill_rows.append((out, cols, prefill_tokens, sparse, dense))
    dtab = ["| out x in | sparsity | batch | Triton bitmask ms | dense bf16 ms | speedup | traffic ceiling |",
            "|---|---|---|---|---|---|---|"]
    dtab += [f"| {o} x {i} | {p} | {b} | {s:.3f} | {d:.3f} | {d / s:.2f}x | {c:.2f}x |"
             for o, i, p, b, s, d, c in decode_rows]
    ptab = ["| out x in | tokens | 2:4 semi-structured ms | dense bf16 ms | speedup |", "|---|---|---|---|---|"]
    ptab += [f"| {o} x {i} | {t} | {s:.3f} | {d:.3f} | {d / s:.2f}x |" for o, i, t, s, d in prefill_rows]
    return {"device": torch.cuda.get_device_name(0), "dtype": "bfloat16", "isa": "triton",
            "decode": decode_rows, "prefill": prefill_rows,
            "tables": [("decode (Triton bitmask)", "\n".join(dtab)), ("prefill (2:4 semi-structured)", "\n".join(ptab))]}
