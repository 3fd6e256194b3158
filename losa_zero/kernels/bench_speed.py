"""``losa-zero bench-speed``: generation and per-linear speed, sparse kernel against dense.

Everything is measured side by side in one process, sparse and dense interleaved repeat by
repeat (shared machines drift), and reported as medians with the ratio beside the
memory-traffic ceiling (dense weight bytes / compressed bytes: decode reads each weight
once per step, so this is the most a bandwidth-bound kernel can gain).
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LosaZeroError
from ..outputs import cpu_model
from .layout import pack_bitmask
from .linear import BitmaskLinear

log = logging.getLogger(__name__)

# (out_features, in_features) of LLaMA-7B's projections: q/k/v/o, gate/up, down
LLAMA7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
PATTERNS = ("50%", "60%", "70%", "80%", "2:4")


def _median_ms(xs) -> float:
    return 1e3 * statistics.median(xs)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each callable, run round-robin ``repeats`` times.

    The order rotates by one each repeat, so no callable always runs right after the same
    one: a kernel runs slower right after a long memory-bound one (the fp32 reference), and
    a fixed order would hand that cost to the same side every time.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            times[k].append(_time(fns[k]))
    return {k: _median_ms(v) for k, v in times.items()}


def pattern_weight(out: int, cols: int, pattern: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random weight pruned by magnitude to ``pattern`` ('70%' unstructured or 'N:M')."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        groups = w.view(out, cols // m, m)
        drop = groups.abs().topk(m - n, dim=-1, largest=False).indices
        groups.scatter_(-1, drop, 0.0)
    else:
        k = int(round(w.numel() * float(pattern.rstrip("%")) / 100))
        if k:
            drop = w.abs().flatten().topk(k, largest=False).indices
            w.view(-1)[drop] = 0.0
    return w.to(dtype)


@dataclass
class LinearTiming:
    shape: tuple[int, int]
    pattern: str
    batch: int
    sparse_ms: float
    dense_ms: float
    dense_fp32_ms: float | None
    ceiling: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def time_linear(weight: torch.Tensor, pattern: str, batches=(1, 8), repeats: int = 20,
                with_fp32: bool = True) -> list[LinearTiming]:
    """Sparse kernel vs ``F.linear`` in the weight's dtype (and fp32 for reference)."""
    out, cols = weight.shape
    sparse = BitmaskLinear(pack_bitmask(weight))
    ceiling = weight.numel() * weight.element_size() / sparse.packed.nbytes()
    w32 = weight.float() if with_fp32 and weight.dtype != torch.float32 else None
    rows = []
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, cols).to(weight.dtype)
            fns = {"sparse": lambda: sparse(x), "dense": lambda: F.linear(x, weight)}
            if w32 is not None:
                x32 = x.float()
                fns["fp32"] = lambda: F.linear(x32, w32)
            ms = interleaved(fns, repeats)
            rows.append(LinearTiming((out, cols), pattern, b, ms["sparse"], ms["dense"], ms.get("fp32"), ceiling))
    return rows


def bench_llama7b_layers(patterns=PATTERNS, shapes=LLAMA7B_SHAPES, batches=(1, 8), repeats: int = 20,
                         dtype: torch.dtype = torch.bfloat16) -> list[LinearTiming]:
    rows = []
    for out, cols in shapes:
        for pattern in patterns:
            w = pattern_weight(out, cols, pattern, dtype)
            rows += time_linear(w, pattern, batches, repeats)
            log.info("%dx%d %s done", out, cols, pattern)
    return rows


def bench_model_linears(model, batches=(1, 8), repeats: int = 20) -> list[LinearTiming]:
    """Each distinct (shape, sparsity) of the model's swapped linears, once."""
    seen, rows = set(), []
    for name, mod in model.named_modules():
        if not isinstance(mod, BitmaskLinear):
            continue
        w = mod.dense_weight()
        density = mod.nnz / w.numel()
        key = (tuple(w.shape), round(density, 2))
        if key in seen:
            continue
        seen.add(key)
        rows += time_linear(w, f"{100 * (1 - density):.0f}% ({name.split('.')[-1]})", batches, repeats,
                            with_fp32=False)
    return rows


def generation_speed(dense, sparse, vocab_size: int, prompt_len: int = 128, new_tokens: int = 128,
                     batch: int = 1, repeats: int = 3, seed: int = 0) -> dict:
    """Greedy generation tokens/s (whole call, and decode alone) of both models, same prompt.

    ``same_tokens`` says whether the sparse model generated exactly the dense model's tokens.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, prompt_len), generator=g)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0,
              attention_mask=mask)
    results = {}
    with torch.no_grad():
        outs = {name: m.generate(ids, **kw) for name, m in (("dense", dense), ("sparse", sparse))}
        prefill = {"dense": [], "sparse": []}
        total = {"dense": [], "sparse": []}
        for _ in range(repeats):
            for name, m in (("dense", dense), ("sparse", sparse)):
                prefill[name].append(_time(lambda: m.generate(ids, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})))
                total[name].append(_time(lambda: m.generate(ids, **kw)))
    for name in ("dense", "sparse"):
        t, p = statistics.median(total[name]), statistics.median(prefill[name])
        results[name] = {"tokens_per_s": batch * new_tokens / t,
                         "decode_tokens_per_s": batch * (new_tokens - 1) / max(t - p, 1e-9),
                         "seconds": t, "prefill_seconds": p}
    results["same_tokens"] = bool(torch.equal(outs["dense"], outs["sparse"]))
    results["batch"] = batch
    return results


def format_linear_table(rows: list[LinearTiming], dtype_name: str) -> str:
    has32 = any(r.dense_fp32_ms is not None for r in rows)
    head = (f"| out x in | sparsity | batch | sparse ms | dense {dtype_name} ms | "
            + ("dense fp32 ms | " if has32 else "") + f"speedup vs {dtype_name} | traffic ceiling |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r.shape[0]} x {r.shape[1]} | {r.pattern} | {r.batch} | {r.sparse_ms:.2f} | {r.dense_ms:.2f} | "
                     + (f"{r.dense_fp32_ms:.2f} | " if has32 else "")
                     + f"{r.speedup:.2f}x | {r.ceiling:.2f}x |")
    return "\n".join(lines)


def format_generation_table(gens: list[dict], prompt_len: int, new_tokens: int) -> str:
    lines = ["| batch | dense tok/s | sparse tok/s | speedup | dense decode tok/s | sparse decode tok/s | "
             "decode speedup | same tokens |", "|---|---|---|---|---|---|---|---|"]
    for g in gens:
        d, s = g["dense"], g["sparse"]
        lines.append(f"| {g['batch']} | {d['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | "
                     f"{s['tokens_per_s'] / d['tokens_per_s']:.2f}x | {d['decode_tokens_per_s']:.1f} | "
                     f"{s['decode_tokens_per_s']:.1f} | {s['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x | "
                     f"{'yes' if g['same_tokens'] else 'NO'} |")
    return (f"greedy generation, prompt {prompt_len} + {new_tokens} new tokens (decode = after the first token)\n\n"
            + "\n".join(lines))


def run_bench_speed(model_dir: str | None, dtype: torch.dtype = torch.bfloat16, prompt_len: int = 128,
                    new_tokens: int = 128, batches=(1, 8), gen_repeats: int = 3, layer_repeats: int = 20,
                    layers: bool = True, patterns=PATTERNS, shapes=LLAMA7B_SHAPES) -> dict:
    """All of bench-speed's measurements; returns the results and the Markdown tables."""
    from .build import load_kernel
    from .loader import sparsify_linears

    kernel = load_kernel()
    if kernel is None:
        raise LosaZeroError("the sparse C++ kernel is not available (see the warning above): install a C++ "
                            "compiler (e.g. apt-get install g++) and rerun")
    dtype_name = str(dtype).replace("torch.", "")
    out = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "isa": kernel.isa(), "dtype": dtype_name,
           "tables": []}
    if model_dir is not None:
        from ..modeling import load_model

        dense, _ = load_model(model_dir, dtype=dtype)
        sparse, _ = load_model(model_dir, dtype=dtype)
        summary = sparsify_linears(sparse)
        if summary["swapped"] == 0:
            raise LosaZeroError(f"no linear of {model_dir} is sparse enough to swap: bench-speed needs a pruned model")
        out["model"] = {"dir": str(model_dir), **summary}
        gens = [generation_speed(dense, sparse, dense.config.vocab_size, prompt_len, new_tokens, b, gen_repeats)
                for b in batches]
        out["generation"] = gens
        out["tables"].append(("model generation", format_generation_table(gens, prompt_len, new_tokens)))
        model_rows = bench_model_linears(sparse, batches, layer_repeats)
        out["model_linears"] = [r.__dict__ | {"speedup": r.speedup} for r in model_rows]
        out["tables"].append(("model linears", format_linear_table(model_rows, dtype_name)))
        del dense, sparse
    if layers:
        rows = bench_llama7b_layers(patterns, shapes, batches, layer_repeats, dtype)
        out["llama7b_linears"] = [r.__dict__ | {"speedup": r.speedup} for r in rows]
        out["tables"].append(("LLaMA-7B-shaped linears", format_linear_table(rows, dtype_name)))
    return out


def _parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s)
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) != 2 for s in shapes):
        raise LosaZeroError(f"--shapes {text!r}: give OUTxIN pairs, comma-separated (e.g. 4096x11008)")
    return shapes


def run_bench_speed_cli(args) -> int:
    from ..outputs import write_json_atomic

    if args.model is None and not args.layers_only:
        raise LosaZeroError("bench-speed needs a MODEL_DIR (or --layers-only for the LLaMA-7B-shaped layers alone)")
    dtype = getattr(torch, args.dtype)
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError as exc:
        raise LosaZeroError(f"--batch {args.batch!r}: give integers, comma-separated") from exc
    patterns = tuple(p for p in args.patterns.split(",") if p)
    for p in patterns:
        if not (p.endswith("%") or ":" in p):
            raise LosaZeroError(f"--patterns: {p!r} is neither 'NN%' nor 'N:M'")
    shapes = _parse_shapes(args.shapes)
    if args.device == "cuda":
        from .gpu import run_gpu_bench

        res = run_gpu_bench(patterns=patterns, shapes=shapes, batches=batches, repeats=args.layer_repeats)
    else:
        res = run_bench_speed(None if args.layers_only else args.model, dtype, args.prompt_len, args.new_tokens,
                              batches, args.repeats, args.layer_repeats, layers=not args.no_layers,
                              patterns=patterns, shapes=shapes)
    print(f"bench-speed on {res.get('device', 'CPU ' + res.get('cpu', '?'))}, {res.get('threads', '?')} threads, "
          f"kernel {res.get('isa', '?')}, torch {torch.__version__}, {res.get('dtype', args.dtype)}")
    for title, table in res["tables"]:
        print(f"\n{title}\n\n{table}")
    if args.json:
        write_json_atomic(args.json, {k: v for k, v in res.items() if k != "tables"})
    return 0
