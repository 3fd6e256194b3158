"""SparseGPT 2:4 in bf16 against fp32 on CPU: is the perplexity drift a precision defect?

Prunes the stories260K fixture with ``losa-zero prune --method sparsegpt --nm 2:4`` (64 x
512 calibration, as part (a) of bench/gpu_acceptance.py) once with ``--dtype float32`` and
once with ``--dtype bfloat16``, then evaluates the dense model and both pruned models in
both dtypes on the first 40,000 characters of the held-out split, and compares the masks.
Evaluating one model in both dtypes separates the rounding of the forward pass from what the
bf16 run chose differently while pruning.

    LOSA_ZERO_DATA=../shared/data python bench/sparsegpt_bf16_drift.py [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from losa_zero.cli import main as cli
from losa_zero.convert_llama2c import convert_llama2c
from losa_zero.demo import EVAL_CHARS, fixture_paths
from losa_zero.evaluate import perplexity
from losa_zero.modeling import decoder_layers, layer_linears, load_model
from losa_zero.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/sparsegpt_bf16_drift")
    ap.add_argument("--eval-chars", type=int, default=40_000)
    args = ap.parse_args()
    w = Path(args.work)
    w.mkdir(parents=True, exist_ok=True)
    paths = fixture_paths(os.environ.get("LOSA_ZERO_DATA", "../shared/data"))
    text = paths["tinystories"].read_text()
    (w / "train.txt").write_text(text[EVAL_CHARS:])
    dense = convert_llama2c(paths["checkpoint"], paths["tokenizer"], w / "dense", overwrite=True)
    for dt in ("float32", "bfloat16"):
        cli(["-q", "prune", "--method", "sparsegpt", "--nm", "2:4", "--model", str(dense), "--calib",
             str(w / "train.txt"), "--nsamples", "64", "--seqlen", "512", "--device", "cpu", "--dtype", dt,
             "--out", str(w / dt), "--overwrite"])
    held_out = text[:EVAL_CHARS][:args.eval_chars]
    res, models = {}, {}
    for src in ("dense", "float32", "bfloat16"):
        for dt in ("float32", "bfloat16"):
            model, tok = load_model(w / src, dtype=getattr(torch, dt))
            res[f"{src} model, eval {dt}"] = perplexity(model, tok, held_out, Runtime("cpu"))["ppl"]
            if dt == "float32":
                models[src] = model
    agree = [((x.weight != 0) == (y.weight != 0)).float().mean().item()
             for la, lb in zip(decoder_layers(models["float32"]), decoder_layers(models["bfloat16"]))
             for x, y in zip(layer_linears(la).values(), layer_linears(lb).values())]
    res["mask agreement, fp32 vs bf16 run (mean over linears)"] = sum(agree) / len(agree)
    res["mask agreement, lowest linear"] = min(agree)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
