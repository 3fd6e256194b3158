"""Quality table on the stories260K fixture: dense, one-shot magnitude / Wanda / SparseGPT
at 50%, 2:4 and 70%, LoSA 70% with each pruner, the ablation "one-shot Wanda 70% +
sparse LoRA at uniform rank, same data and optimizer steps", and LoSA to 2:4 (each pruner,
and the alternative step schedules) against its baseline "one-shot 2:4 + sparse LoRA" at the
same budget. Prints a Markdown table with perplexity (held-out TinyStories, seqlen 512),
realised sparsity and seconds per phase.

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
    ap.add_argument("--only", action="append", default=[], help="a row label to run (repeatable; default: all)")
    ap.add_argument("--samples-scale", type=float, default=1.0,
                    help="scale the fine-tuning samples of every LoSA / LoRA row (the README's rows: 1)")
    ap.add_argument("--seed", type=int, default=0, help="the runs' --seed (calibration windows, data order, LoRA init)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = fixture_paths(os.environ.get("LOSA_ZERO_DATA"))
    text = paths["tinystories"].read_text(encoding="utf-8")
    (work / "eval.txt").write_text(text[:EVAL_CHARS], encoding="utf-8")
    (work / "train.txt").write_text(text[EVAL_CHARS:], encoding="utf-8")
    dense = convert_llama2c(paths["checkpoint"], paths["tokenizer"], work / "dense", overwrite=True)
    recipe = load_yaml(RECIPE)
    for key in ("samples_per_step", "final_step_samples"):
        recipe[key] = max(1, round(recipe[key] * args.samples_scale))
    common = {"model": str(dense), "calib": str(work / "train.txt"), "ppl": [str(work / "eval.txt")],
              "seqlen": 512, "nsamples": recipe["nsamples"], "overwrite": True, "seed": args.seed}
    total = (recipe["steps"] - 1) * recipe["samples_per_step"] + recipe["final_step_samples"]
    runs = [("dense", None, None)]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for label, extra in (("50%", {"sparsity": 0.5}), ("2:4", {"nm": "2:4"}), ("70%", {"sparsity": 0.7})):
            runs.append((f"{method} {label}", PruneConfig, {**extra, "method": method}))
    for pruner in ("wanda", "sparsegpt"):
        runs.append((f"LoSA 70% ({pruner})", LosaConfig, {**recipe, "pruner": pruner}))
    oneshot_lora = {"steps": 1, "allocation": "uniform", "rank_allocation": "uniform", "final_step_samples": total}
    runs.append(("ablation: one-shot Wanda 70% + sparse LoRA, uniform rank 10", LosaConfig, {**recipe, **oneshot_lora}))
    # LoSA to 2:4: the pattern sets the sparsity; uniform 2:4 in every layer.
    nm24 = {"nm": "2:4", "sparsity": None, "allocation": "uniform"}
    for pruner in ("wanda", "sparsegpt"):
        runs.append((f"LoSA 2:4 ({pruner})", LosaConfig, {**recipe, **nm24, "pruner": pruner}))
    for schedule in ("capped", "project"):  # the measured alternatives to the default "patterns"
        runs.append((f"LoSA 2:4 (sparsegpt, --nm-schedule {schedule})", LosaConfig,
                     {**recipe, **nm24, "pruner": "sparsegpt", "nm_schedule": schedule}))
    for pruner in ("wanda", "sparsegpt"):
        runs.append((f"baseline: one-shot {pruner} 2:4 + sparse LoRA, uniform rank 10", LosaConfig,
                     {**recipe, **nm24, **oneshot_lora, "pruner": pruner}))
    # Where LoSA 2:4 loses to the baseline: the same total samples split otherwise over the
    # steps, uniform rank 10 (--rank-allocation uniform --rank-start 10).
    sps = recipe["samples_per_step"]
    uniform10 = {"rank_allocation": "uniform", "rank_start": recipe["rank_end"]}
    for label, steps, per_step, extra in (
            ("2 steps, both 2:4 (the baseline's masks), error ranks", 2, sps, {}),
            ("2 steps, both 2:4 (the baseline's masks), uniform rank 10", 2, sps, uniform10),
            ("3 steps (3:4, 2:4, 2:4), uniform rank 10", 3, sps // 2, uniform10),
            ("5 steps --nm-schedule capped, uniform rank 10", 5, sps // 4, {**uniform10, "nm_schedule": "capped"}),
            ("2 steps --nm-schedule descend (3:4, 2:4), uniform rank 10", 2, sps, {**uniform10, "nm_schedule": "descend"}),
            ("2 steps --nm-schedule descend (3:4, 2:4), uniform rank 10, --finetune-schedule continuous", 2, sps,
             {**uniform10, "nm_schedule": "descend", "finetune_schedule": "continuous"}),
            ("2 steps --nm-schedule descend (3:4, 2:4), uniform rank 10, --finetune-schedule continuous, "
             "twice the 3:4 samples", 2, 2 * sps, {**uniform10, "nm_schedule": "descend", "finetune_schedule": "continuous"}),
            ("2 steps --nm-schedule descend (3:4, 2:4), uniform rank 10, --finetune-schedule continuous, "
             "half the 3:4 samples", 2, sps // 2, {**uniform10, "nm_schedule": "descend", "finetune_schedule": "continuous"}),
            ("2 steps --nm-schedule descend (3:4, 2:4), error ranks, --finetune-schedule continuous", 2, sps,
             {"nm_schedule": "descend", "finetune_schedule": "continuous"})):
        runs.append((f"LoSA 2:4 (sparsegpt), {label}, final-heavy", LosaConfig,
                     {**recipe, **nm24, "pruner": "sparsegpt", "steps": steps, "samples_per_step": per_step,
                      "final_step_samples": total - (steps - 1) * per_step, **extra}))
    only = {s.strip() for s in args.only if s.strip()}
    unknown = only - {label for label, _, _ in runs}
    if unknown:
        ap.error(f"unknown row label(s): {', '.join(sorted(unknown))}")
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
        name = "".join(c for c in label.replace(" ", "_").replace(":", "-") if c.isalnum() or c in "_-")
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
