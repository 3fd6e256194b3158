"""Run reports: plots and Markdown from run directories written in the documented format.

The run directories are built here by hand (a LoSA run with steps and training metrics,
a one-shot Wanda run without either) so the test needs no model and runs in seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from losa_zero.errors import LosaZeroError
from losa_zero.report import IMAGE_PIXELS, load_run, loss_series, update_summary_with_zeroshot, write_report

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
N_LAYERS = 5


def _per_linear(base: float) -> dict[str, float]:
    return {f"model.layers.{i}.{p}": round(base + 0.01 * i - 0.002 * j, 4)
            for i in range(N_LAYERS) for j, p in enumerate(PROJ)}


def _losa_run(root: Path) -> Path:
    d = root / "losa_rmi"
    d.mkdir()
    steps = []
    for k in range(1, 4):
        target = 0.7 * k / 3
        layers = [{"layer": i, "rate": target + 0.02 * (i - 2), "importance": 0.1 + 0.05 * i + 0.01 * k,
                   "redundancy": 0.2, "error": 0.01 * k, "rank": 8 - k - (i % 2), "sparsity": target + 0.02 * (i - 2)}
                  for i in range(N_LAYERS)]
        steps.append({"step": k, "target": target, "delta": 0.01, "mean_rank": 6.0 - k, "layers": layers,
                      "train_loss": 2.0 - 0.1 * k, "seconds": {"importance": 0.5, "prune": 1.2, "finetune": 9.0}})
    summary = {
        "losa_zero_version": "0.1.0", "command": "losa-zero losa --model m --sparsity 0.7",
        "method": "losa", "pruner": "wanda", "allocation": "rmi", "target_sparsity": 0.7, "nm": None,
        "achieved_sparsity": 0.7003, "per_linear_sparsity": _per_linear(0.68),
        "per_layer": [{"layer": i, "rate": 0.66 + 0.02 * i, "importance": 0.2, "sparsity": 0.66 + 0.02 * i, "rank": 4}
                      for i in range(N_LAYERS)],
        "steps": steps,
        "perplexity": {"eval.txt": {"ppl": 5.1, "seqlen": 512, "tokens": 40000},
                       "wikitext": {"ppl": 130.2, "seqlen": 512, "tokens": 80000}},
        "zeroshot": {"tasks": {"boolq": {"acc": 0.6, "acc_norm": None, "n": 50},
                               "piqa": {"acc": 0.55, "acc_norm": 0.52, "n": 50}}, "mean_acc": 0.575},
        "seconds": {"load": 0.1, "prune": 3.0, "finetune": 40.0, "eval": 2.0, "total": 50.0},
        "peak_memory": {"host_rss_bytes": 3 * 2**30, "cuda_bytes": None},
    }
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    lines = []
    opt = 0
    for k in range(1, 4):
        for _ in range(6):
            opt += 1
            lines.append(json.dumps({"losa_step": k, "opt_step": opt, "loss": 2.5 - 0.04 * opt, "lr": 1e-4,
                                     "tokens_per_s": 5000.0}))
    lines.append('{"losa_step": 3, "opt_st')  # a run killed mid-write leaves a truncated line
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def _wanda_run(root: Path) -> Path:
    d = root / "wanda_uniform"
    d.mkdir()
    summary = {
        "losa_zero_version": "0.1.0", "command": "losa-zero prune --method wanda", "method": "wanda",
        "pruner": "wanda", "allocation": "uniform", "target_sparsity": 0.7, "nm": None,
        "achieved_sparsity": 0.6999, "per_linear_sparsity": _per_linear(0.69), "steps": [],
        "perplexity": {"eval.txt": {"ppl": 9.7, "seqlen": 512, "tokens": 40000}},
        "seconds": {"load": 0.1, "prune": 2.0, "eval": 2.0, "total": 4.5},
        "peak_memory": {"host_rss_bytes": 2 * 2**30, "cuda_bytes": 2**31},
    }
    (d / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return d


def _check_png(path: Path) -> None:
    assert path.is_file(), path
    img = mpimg.imread(path)
    height, width = img.shape[:2]
    assert (width, height) == IMAGE_PIXELS, (path.name, width, height)
    rgb = img[..., :3]
    assert float(rgb.std()) > 0.01, f"{path.name} looks blank"
    # a plot has a white background plus drawn lines/bars: many distinct colours
    assert len(np.unique(rgb.reshape(-1, 3).round(2), axis=0)) > 10, f"{path.name} looks blank"


def test_write_report_two_runs(tmp_path):
    losa, wanda = _losa_run(tmp_path), _wanda_run(tmp_path)
    out = tmp_path / "report"
    md_path = write_report([losa, wanda], out)
    md = md_path.read_text(encoding="utf-8")

    expected = {
        "compare_layer_sparsity.png",
        "losa_rmi_layer_sparsity.png", "losa_rmi_layer_rank.png", "losa_rmi_layer_importance.png",
        "losa_rmi_train_loss.png", "losa_rmi_linear_sparsity.png",
        "wanda_uniform_linear_sparsity.png",
    }
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == expected  # and nothing the data cannot support (no empty Wanda step plots)
    for name in expected:
        _check_png(out / name)
        assert f"]({name})" in md  # embedded in the Markdown

    assert "losa_rmi" in md and "wanda_uniform" in md
    # the comparison table: both perplexity columns, the zero-shot mean and the resources
    assert "ppl eval.txt" in md and "ppl wikitext" in md
    row = next(line for line in md.splitlines() if line.startswith("| losa_rmi |"))
    for cell in ("losa", "wanda", "rmi", "0.70", "0.7003", "5.100", "130.200", "0.5750", "50.0", "3.00"):
        assert f"| {cell} |" in row, (cell, row)
    wrow = next(line for line in md.splitlines() if line.startswith("| wanda_uniform |"))
    assert "| 9.700 | - |" in wrow and "| 2.00 |" in wrow  # no wikitext ppl, CUDA 2 GiB
    assert "0.5500 / 0.5200" in md  # per-task zero-shot table with acc / acc_norm


def test_single_run_and_bad_inputs(tmp_path):
    wanda = _wanda_run(tmp_path)
    md = write_report([wanda], tmp_path / "r1").read_text(encoding="utf-8")
    assert "wanda_uniform" in md and "compare_layer_sparsity" not in md
    with pytest.raises(LosaZeroError, match="summary.json"):
        write_report([tmp_path / "nope"], tmp_path / "r2")
    with pytest.raises(LosaZeroError, match="no run directories"):
        write_report([], tmp_path / "r3")


def test_update_summary_with_zeroshot(tmp_path):
    wanda = _wanda_run(tmp_path)
    result = {"tasks": {"rte": {"acc": 0.5, "acc_norm": None, "n": 10}}, "mean_acc": 0.5, "limit": 10}
    update_summary_with_zeroshot(wanda, result)
    summary = load_run(wanda)["summary"]
    assert summary["zeroshot"] == result and summary["method"] == "wanda"


def test_same_named_runs_do_not_clash(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _wanda_run(a), _wanda_run(b)
    out = tmp_path / "rep"
    md = write_report([a / "wanda_uniform", b / "wanda_uniform"], out).read_text(encoding="utf-8")
    assert {p.name for p in out.glob("*linear_sparsity.png")} == {
        "wanda_uniform_linear_sparsity.png", "wanda_uniform-2_linear_sparsity.png"}
    assert "wanda_uniform-2" in md


def test_loss_series_continues_restarted_step_counts():
    """Trainers that count optimizer steps from 1 in every LoSA step still get one axis."""
    metrics = [{"losa_step": k, "opt_step": i, "loss": 3.0 - 0.1 * k} for k in (1, 2) for i in (1, 2, 3)]
    metrics.insert(2, {"losa_step": 1, "opt_step": 9, "lr": 1e-4})  # no loss: ignored
    groups, restarted = loss_series(metrics)
    assert restarted
    assert [x for x, _ in groups[1]] == [1, 2, 3] and [x for x, _ in groups[2]] == [4, 5, 6]
    groups, restarted = loss_series([{"losa_step": 1, "opt_step": i, "loss": 1.0} for i in (1, 2)]
                                    + [{"losa_step": 2, "opt_step": i, "loss": 1.0} for i in (3, 4)])
    assert not restarted and [x for x, _ in groups[2]] == [3, 4]
