"""Bytes on disk of the compressed-tensors sparse export against the dense bf16 export.

    python bench/compressed_sizes.py [--no-record] [--quick]

For one decoder layer of LLaMA-7B shape (q/k/v/o 4096x4096, gate/up 11008x4096, down
4096x11008), in bf16: random weights pruned to 50% and 70% (unstructured, exact count per
linear), 2:4, and mixed N:4 (a 3:4, a 2:4 and a 1:4 layer: 50% on average, stored as
bitmasks because the 2:4 format holds only 2:4). Each case is written twice through the
export's shard writer, dense and compressed, as safetensors files; the table gives the
compressed file's size over the dense file's (what a user sees on disk), and per linear
kind the stored tensor bytes over the dense bf16 bytes. Sizes depend only on the shapes
and the number of nonzeros, not on the values. ``--quick`` uses 1/8-scale shapes.
About a minute on the project's 2-core machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import append_benchmark, machine_header, markdown_table, this_command  # noqa: E402
from losa_zero.compressed import BITMASK, BITMASK_24, GroupCompressor  # noqa: E402
from losa_zero.shards import ShardWriter  # noqa: E402

KINDS = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
         "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
         "mlp.down_proj": (4096, 11008)}


def pruned(shape, case: str, gen: torch.Generator) -> torch.Tensor:
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    if case.endswith("%"):
        k = round(float(case[:-1]) / 100 * w.numel())
        drop = torch.randperm(w.numel(), generator=gen)[:k]
        return w.view(-1).index_fill(0, drop, 0.0).view(rows, cols)
    n, m = (int(x) for x in case.split(":"))
    groups = w.reshape(rows, cols // m, m)
    idx = groups.float().abs().topk(m - n, dim=-1, largest=False).indices
    return groups.scatter(-1, idx, 0.0).reshape(rows, cols)


def measure(name: str, patterns: list[str], scale: int, tmp: Path) -> dict:
    """Write ``len(patterns)`` layers (layer i pruned to patterns[i]) dense and compressed."""
    gen = torch.Generator().manual_seed(0)
    fmt = BITMASK_24 if all(p == "2:4" for p in patterns) else BITMASK
    layers = []
    for i, p in enumerate(patterns):
        layers.append({f"model.layers.{i}.{k}.weight": pruned((r // scale, c // scale), p, gen)
                       for k, (r, c) in KINDS.items()})
    targets = {n.rsplit(".", 1)[0] for layer in layers for n in layer}
    comp = GroupCompressor(fmt, targets, {t: "Linear" for t in targets})
    sizes = {}
    for label, transform in (("dense", None), ("compressed", comp)):
        out = tmp / f"{name}-{label}"
        out.mkdir()
        writer = ShardWriter(out, len(layers), transform)
        for i, layer in enumerate(layers):
            writer.write(i, layer)
        sizes[label] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    report = comp.stats.size_report()
    return {"case": name, "format": fmt, "file_ratio": sizes["compressed"] / sizes["dense"],
            "dense_mb": sizes["dense"] / 1e6, "compressed_mb": sizes["compressed"] / 1e6,
            "linears_ratio": report["compressed_linears"]["ratio"],
            "per_kind": {k: v["ratio"] for k, v in report["per_kind"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1/8-scale shapes (a smoke run)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = ap.parse_args()
    scale = 8 if args.quick else 1
    cases = [("50%", ["50%"]), ("70%", ["70%"]), ("2:4", ["2:4"]), ("mixed 3:4/2:4/1:4", ["3:4", "2:4", "1:4"])]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, patterns in cases:
            r = measure(name.split()[0].replace(":", "").replace("%", "pct"), patterns, scale, Path(d))
            r["case"] = name
            rows.append(r)
            print(f"{name}: {r['format']}, file {r['compressed_mb']:.1f} MB / {r['dense_mb']:.1f} MB = "
                  f"{r['file_ratio']:.4f}; linears {r['linears_ratio']:.4f}", flush=True)
    kinds = list(KINDS)
    table = markdown_table(["case", "format", "dense MB", "compressed MB", "file ratio", "linears ratio"]
                           + [k.split(".")[-1] for k in kinds],
                           [[r["case"], r["format"], round(r["dense_mb"], 1), round(r["compressed_mb"], 1),
                             round(r["file_ratio"], 4), round(r["linears_ratio"], 4)]
                            + [round(r["per_kind"][k], 4) for k in kinds] for r in rows])
    shape = "LLaMA-7B" if scale == 1 else f"1/{scale}-scale LLaMA-7B"
    body = (f"One decoder layer of {shape} shape per case (mixed: three layers), bf16, random weights, "
            "written through the export's shard writer dense and compressed (compressed-tensors "
            "sparse formats). Ratios are compressed over dense bf16 bytes: of the safetensors files, of "
            "all compressed linears, and per linear kind.\n\n" + table + "\n")
    print(body)
    if not args.no_record:
        append_benchmark("Compressed export: bytes on disk against dense bf16", this_command(), machine_header(), body)


if __name__ == "__main__":
    main()
