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


def load_bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_acceptance_cpu_smoke(tmp_path):
    """bench/gpu_acceptance.py --cpu-smoke: all three parts on tiny sizes. (b) must really pass
    (a SIGKILLed and resumed fp32 ZeRO-3 run equals the uninterrupted one bit for bit); (a)
    must compare every CLI run on both sides; (c) runs bench/gpu_llama7b.py, whose tables are
    checked here too."""
    import json

    out = tmp_path / "acc"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_acceptance.py"), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=6600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OUT": str(tmp_path / "ignored")})
    text = proc.stdout
    assert "(a) fixture CLI" in text and "(b) ZeRO-3 train" in text and "(c) 7B-shape" in text, proc.stderr[-3000:]
    summary = json.loads((out / "acceptance.json").read_text())
    assert set(summary["parts"]) == {"a", "b", "c"}
    for key in "abc":
        assert (out / f"part_{key}.md").read_text().startswith(f"## ({key})")
    assert json.loads((out / "environment.json").read_text())["mode"] == "cpu-smoke"

    a = json.loads((out / "part_a.json").read_text())["results"]
    runs = {label for side in a.values() for label in side}
    assert len(a) == 2 and runs == {"dense", "wanda 50%", "sparsegpt 2:4", "LoSA 70% (wanda, quick)"}
    for side in a.values():
        for label, r in side.items():
            assert "error" not in r, (label, r)
            assert 1 < r["ppl"] < 1e4
    b = json.loads((out / "part_b.json").read_text())
    assert b["ok"] and b["bitwise"] and b["same_pattern"], b.get("error")
    assert b["killed_at"] >= 9 and b["summaries"]["resumed"]["resumed_from"]
    assert b["summaries"]["resumed"]["optimizer"]["used"] == "paged_adamw_8bit"
    c = json.loads((out / "part_c.json").read_text())
    assert c["ok"], c.get("error")

    log = (out / "part_c_llama7b.log").read_text()
    prune = {name: [float(x) for x in table_rows(log, name)[0][1:]] for name in ("wanda", "sparsegpt")}
    for name, (capture, forward, prune_block) in prune.items():   # pruning a block includes its forward
        assert 0 < forward < prune_block, (name, forward, prune_block)
    ft = table_rows(log, "sparse LoRA")
    assert len(ft) == 1 and float(ft[0][1]) > 0
    assert re.search(r"2:4 semi-structured kernels: not run", log)


def test_acceptance_comparisons_catch_disagreements():
    import torch

    acc = load_bench("gpu_acceptance")
    labels = [("dense", "eval"), ("wanda 50%", "prune"), ("LoSA", "losa")]
    ref = {"dense": {"ppl": 4.0, "sparsity": 0.0}, "wanda 50%": {"ppl": 20.0, "sparsity": 0.5},
           "LoSA": {"ppl": 12.0, "sparsity": 0.7}}
    close = {"dense": {"ppl": 4.04, "sparsity": 0.0}, "wanda 50%": {"ppl": 20.4, "sparsity": 0.5},
             "LoSA": {"ppl": 12.5, "sparsity": 0.7}}
    assert acc.compare_fixture_runs(close, ref, labels)[0]
    for label, bad in (("wanda 50%", {"ppl": 21.0, "sparsity": 0.5}),        # 5% off a one-shot run
                       ("LoSA", {"ppl": 12.0, "sparsity": 0.69}),            # other sparsity
                       ("dense", {"error": "RuntimeError: CUDA error"})):    # crashed
        ok, rows = acc.compare_fixture_runs({**close, label: bad}, ref, labels)
        assert not ok and [r[-1] for r in rows if r[0] == label][0].startswith("FAIL")
    # SparseGPT 2:4 has its own bound (its adaptive N:M choices flip under bf16): 5% passes there only
    sg = [("sparsegpt 2:4", "prune")]
    assert acc.compare_fixture_runs({"sparsegpt 2:4": {"ppl": 21.0, "sparsity": 0.5}},
                                    {"sparsegpt 2:4": {"ppl": 20.0, "sparsity": 0.5}}, sg)[0]
    assert not acc.compare_fixture_runs({"sparsegpt 2:4": {"ppl": 21.4, "sparsity": 0.5}},
                                        {"sparsegpt 2:4": {"ppl": 20.0, "sparsity": 0.5}}, sg)[0]

    w = {"a": torch.tensor([[0.0, 1.0], [2.0, 0.0]]), "b": torch.ones(3)}
    assert acc.compare_weights(w, {k: v.clone() for k, v in w.items()}, 1e-5)["bitwise"]
    nudged = {"a": w["a"] * (1 + 1e-3), "b": w["b"]}
    r = acc.compare_weights(nudged, w, 1e-2)
    assert r["ok"] and not r["bitwise"]
    assert not acc.compare_weights(nudged, w, 1e-5)["ok"]
    moved = {"a": torch.tensor([[1e-3, 1.0], [2.0, 0.0]]), "b": w["b"]}   # a pruned weight came back
    assert not acc.compare_weights(moved, w, 1.0)["same_pattern"]
