"""The benchmark scripts run end to end on tiny settings, so they cannot rot between the
sessions that record their numbers. These check that each script finishes and prints its
tables with finite, positive measurements; they time nothing."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0].startswith(first_cell):
            rows.append(cells)
    return rows


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_with_a_tiny_model():
    out = run_bench("gpu_llama7b.py", "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--nsamples", "4",
                    "--seqlen", "64", "--blocks", "2", "--ft-batch", "2", "--ft-seqlen", "64", "--ft-steps", "2",
                    "--ft-warmup", "1", "--no-record")
    # The first table has one row per pruner (the projection table repeats the names later).
    prune = {name: [float(x) for x in table_rows(out, name)[0][1:]] for name in ("wanda", "sparsegpt")}
    # Pruning a block includes its calibration forward, so it cannot be cheaper than that.
    for name, (capture, forward, prune_block) in prune.items():
        assert 0 < forward < prune_block, (name, forward, prune_block)
    ft = table_rows(out, "sparse LoRA")
    assert len(ft) == 1 and float(ft[0][1]) > 0
    assert re.search(r"2:4 semi-structured kernels: not run", out)
