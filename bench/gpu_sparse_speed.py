"""GPU sparse paths against dense bf16 on LLaMA-7B-shaped linears, recorded to BENCHMARKS.md:
the Triton bitmask kernel for decode (1 and 8 tokens, 50/70/80% and 2:4) and PyTorch's
semi-structured 2:4 tensors for prefill. Each result is checked against the dense product
before it is timed.

    python bench/gpu_sparse_speed.py            # needs a CUDA GPU and triton
    python bench/gpu_sparse_speed.py --no-record
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import append_benchmark, machine_header, this_command  # noqa: E402


def measure(repeats: int = 50) -> dict:
    """The GPU measurement: results dict with Markdown tables (callable from other drivers)."""
    from losa_zero.kernels.gpu import run_gpu_bench

    return run_gpu_bench(patterns=("50%", "70%", "80%", "2:4"), repeats=repeats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    res = measure(args.repeats)
    body = "\n\n".join(f"{t}\n\n{tab}" for t, tab in res["tables"])
    if args.no_record:
        print(body)
    else:
        append_benchmark("Sparse GPU paths: Triton bitmask decode and 2:4 semi-structured prefill", this_command(),
                         machine_header(device=f"GPU {res['device']}"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
