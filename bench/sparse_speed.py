"""Sparse-kernel speed on this machine, recorded to BENCHMARKS.md: ``losa-zero bench-speed``
on the stories260K fixture (70% magnitude), on a random LLaMA with 2048-wide layers (70%
magnitude; the fixture's 64-wide layers are too small to show anything but call overhead),
and on LLaMA-7B-shaped linears at 50/60/70/80% and 2:4.

    LOSA_ZERO_DATA=../shared/data python bench/sparse_speed.py          # full run, appends to BENCHMARKS.md
    LOSA_ZERO_DATA=../shared/data python bench/sparse_speed.py --quick --no-record
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import LLAMA_SHAPES, append_benchmark, describe_shape, machine_header, make_random_llama, this_command  # noqa: E402

LLAMA_SHAPES.setdefault("2048x4", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                                       num_attention_heads=16))


def prune_and_save(src: Path, out: Path, sparsity: float) -> Path:
    """Magnitude-prune every target linear of ``src`` to ``sparsity``; save in bf16 (once)."""
    import torch

    from losa_zero.modeling import decoder_layers, layer_linears, load_model, save_model

    if (out / "config.json").exists():
        return out
    model, tok = load_model(src, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in layer_linears(layer).values():
                w = lin.weight
                k = int(round(w.numel() * sparsity))
                drop = w.float().abs().flatten().topk(k, largest=False).indices
                w.view(-1)[drop] = 0
    save_model(model, tok, out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens (a smoke run)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    ap.add_argument("--parts", default="fixture,random,layers", help="which parts to run")
    ap.add_argument("--prompt-len", type=int, default=None, help="override the prompt length")
    ap.add_argument("--new-tokens", type=int, default=None, help="override the generated tokens")
    ap.add_argument("--repeats", type=int, default=None, help="override the generation repeats")
    ap.add_argument("--batch", default="1,8", help="generation / kernel batch sizes, comma-separated")
    ap.add_argument("--work", default=None, help="folder for the models (reused when present; default: a temp folder)")
    args = ap.parse_args()
    import torch

    from losa_zero.convert_llama2c import convert_llama2c
    from losa_zero.kernels.bench_speed import run_bench_speed

    data = Path(os.environ.get("LOSA_ZERO_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parts = args.parts.split(",")
    gen = dict(new_tokens=16, prompt_len=32, gen_repeats=1, layer_repeats=3) if args.quick else \
        dict(new_tokens=128, prompt_len=128, gen_repeats=3, layer_repeats=15)
    for key, val in (("prompt_len", args.prompt_len), ("new_tokens", args.new_tokens), ("gen_repeats", args.repeats)):
        if val is not None:
            gen[key] = val
    gen["batches"] = tuple(int(b) for b in args.batch.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sparse-speed-"))
    fixture = work / "stories260K"
    if not (fixture / "config.json").exists():
        convert_llama2c(data / "stories260K" / "stories260K.bin", data / "stories260K" / "tok512.model", fixture)
    runs = []
    if "fixture" in parts:
        model = prune_and_save(fixture, work / "stories260K-70", 0.7)
        runs.append(("stories260K (dim 64, 5 layers), 70% magnitude, bf16", model, False))
    if "random" in parts:
        dense = make_random_llama(work / "random-2048x4", "2048x4", tokenizer_from=str(fixture))
        model = prune_and_save(dense, work / "random-2048x4-70", 0.7)
        runs.append((f"random {describe_shape('2048x4')}, vocab 32000, 70% magnitude, bf16", model, False))
    if "layers" in parts:
        runs.append(("LLaMA-7B-shaped linears, bf16, magnitude-pruned random weights", None, True))
    for title, model, layers in runs:
        res = run_bench_speed(None if model is None else str(model), torch.bfloat16, layers=layers, **gen)
        body = (f"Threads: {res['threads']}; kernel path: {res['isa']}. Ratios are dense time / sparse time, "
                f"medians of interleaved repeats; the traffic ceiling is dense bytes / compressed bytes.\n\n"
                + "\n\n".join(f"{t}\n\n{tab}" for t, tab in res["tables"]))
        if args.no_record:
            print(f"\n## {title}\n\n{body}")
        else:
            append_benchmark(f"Sparse decode kernel: {title}", this_command(), machine_header(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
