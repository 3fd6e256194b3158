"""Quality table on the stories260K fixture: dense, one-shot magnitude / Wanda / SparseGPT
at 50%, 2:4 and 70%, LoSA 70% with each pruner, and the ablation "one-shot Wanda 70% +
sparse LoRA at uniform rank, same data and optimizer steps". Prints a Markdown table with
perplexity (held-out TinyStories, seqlen 512), realised sparsity and seconds per phase.

    LOSA_ZERO_DATA=../shared/data python bench/fixture_quality.py [--workdir runs/quality]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from losa_zero.config import LosaConfig, PruneConfig, build_config, load_yaml
from losa_zero.convert_llama2c import convert_llama2c
from losa_zero.demo import EVAL_CHARS, RECIPE, fixture_paths
from losa_zero.evaluate import perplexity
from losa_zero.modeling import load_model
from losa_zero.lifecycle import run_losa, run_prune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/quality")
    ap.add_argument("--only", default="", help="comma-separated row labels to run (default: all)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = fixture_paths(os.environ.get("LOSA_ZERO_DATA"))
    text = paths["tinystories"].read_text(encoding="utf-8")
    (work / "eval.txt").write_text(text[:EVAL_CHARS], encoding="utf-8")
    (work / "train.txt").write_text(text[EVAL_CHARS:], encoding="utf-8")
    dense = convert_llama2c(paths["checkpoint"], paths["tokenizer"], work / "dense", overwrite=True)
    recipe = load_yaml(RECIPE)
    common = {"model": str(dense), "calib": str(work / "train.txt"), "ppl": [str(work / "eval.txt")],
              "seqlen": 512, "nsamples": recipe["nsamples"], "overwrite": True}
    total = (recipe["steps"] - 1) * recipe["samples_per_step"] + recipe["final_step_samples"]
    runs = [("dense", None, None)]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for label, extra in (("50%", {"sparsity": 0.5}), ("2:4", {"nm": "2:4"}), ("70%", {"sparsity": 0.7})):
            runs.append((f"{method} {label}", PruneConfig, {**extra, "method": method}))
    for pruner in ("wanda", "sparsegpt"):
        runs.append((f"LoSA 70% ({pruner})", LosaConfig, {**recipe, "pruner": pruner}))
    runs.append(("ablation: one-shot Wanda 70% + sparse LoRA, uniform rank 10", LosaConfig,
                 {**recipe, "steps": 1, "allocation": "uniform", "rank_allocation": "uniform",
                  "final_step_samples": total}))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows = []
    for label, cls, extra in runs:
        if only and label not in only:
            continue
        t0 = time.perf_counter()
        if cls is None:
            model, tok = load_model(dense)
            r = perplexity(model, tok, (work / "eval.txt").read_text(encoding="utf-8"), seqlen=512)
            rows.append((label, r["ppl"], 0.0, {"eval": time.perf_counter() - t0}))
            continue
        name = label.split(":")[0].replace(" ", "_").replace("%", "").replace("(", "").replace(")", "")
        layers = [common, extra, {"out": str(work / name)}]
        if cls is LosaConfig:
            layers.append({"train": str(work / "train.txt")})
        s = (run_losa if cls is LosaConfig else run_prune)(build_config(cls, *layers), command=f"bench: {label}")
        rows.append((label, s["perplexity"]["eval.txt"]["ppl"], s["achieved_sparsity"], s["seconds"]))
        print(f"[{label}] ppl {rows[-1][1]:.3f} sparsity {rows[-1][2]:.4f}", file=sys.stderr, flush=True)
    print("\n| run | perplexity | sparsity | seconds by phase |")
    print("|---|---:|---:|---|")
    for label, ppl, sp, secs in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in secs.items())
        print(f"| {label} | {ppl:.3f} | {sp:.4f} | {phases} |")


if __name__ == "__main__":
    main()
