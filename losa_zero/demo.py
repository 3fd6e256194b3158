"""``losa-zero demo``: the whole pipeline on the bundled stories260K fixture.

convert the llama2.c checkpoint -> dense perplexity -> one-shot Wanda 70% -> LoSA 70%
(Wanda pruner, recipe ``recipes/stories260k.yaml``) -> a table of perplexity and sparsity.
TinyStories validation text is split into a held-out evaluation part (the first 200,000
characters) and the calibration / fine-tuning rest, so no evaluated token is trained on.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .config import EvalConfig, LosaConfig, PruneConfig, build_config, load_yaml
from .errors import LosaZeroError

log = logging.getLogger("losa_zero")

EVAL_CHARS = 200_000
RECIPE = Path(__file__).with_name("recipes") / "stories260k.yaml"
QUICK = {"samples_per_step": 80, "final_step_samples": 240, "nsamples": 32, "cka_nsamples": 16}


def fixture_paths(data_dir: str | None) -> dict[str, Path]:
    root = data_dir or os.environ.get("LOSA_ZERO_DATA")
    if not root:
        raise LosaZeroError("fixture data not found: set LOSA_ZERO_DATA to the shared data folder "
                            "(e.g. export LOSA_ZERO_DATA=../shared/data) or pass --data")
    root = Path(root)
    paths = {
        "checkpoint": root / "stories260K" / "stories260K.bin",
        "tokenizer": root / "stories260K" / "tok512.model",
        "tinystories": root / "tinystories" / "tinystories_val.txt",
    }
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise LosaZeroError(f"fixture files missing under {root}: {', '.join(missing)} "
                            "(LOSA_ZERO_DATA must point at the shared data folder)")
    return paths


def run_demo(workdir: Path, data_dir: str | None = None, quick: bool = False) -> list[dict]:
    from .convert_llama2c import convert_llama2c
    from .eval_command import run_eval
    from .lifecycle import run_losa, run_prune

    paths = fixture_paths(data_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = paths["tinystories"].read_text(encoding="utf-8")
    eval_txt, train_txt = workdir / "tinystories_eval.txt", workdir / "tinystories_train.txt"
    eval_txt.write_text(text[:EVAL_CHARS], encoding="utf-8")
    train_txt.write_text(text[EVAL_CHARS:], encoding="utf-8")
    t0 = time.perf_counter()
    dense = convert_llama2c(paths["checkpoint"], paths["tokenizer"], workdir / "dense", overwrite=True)

    recipe = load_yaml(RECIPE)
    common = {"model": str(dense), "calib": str(train_txt), "ppl": [str(eval_txt)], "overwrite": True,
              "seqlen": recipe["seqlen"], "nsamples": recipe["nsamples"], "seed": 0}
    if quick:
        recipe.update(QUICK)
        common["nsamples"] = QUICK["nsamples"]

    dense_eval = run_eval(build_config(EvalConfig, {"model": str(dense), "ppl": [str(eval_txt)],
                                                    "json": str(workdir / "dense_eval.json")}))
    rows = [{"run": "dense", "ppl": dense_eval["perplexity"][eval_txt.name]["ppl"], "sparsity": dense_eval["sparsity"],
             "seconds": time.perf_counter() - t0}]
    wanda = run_prune(build_config(PruneConfig, common, {"method": "wanda", "sparsity": recipe["sparsity"],
                                                         "out": str(workdir / "wanda70")}),
                      command="losa-zero demo (one-shot wanda)")
    rows.append({"run": "one-shot Wanda 70%", "ppl": wanda["perplexity"][eval_txt.name]["ppl"],
                 "sparsity": wanda["achieved_sparsity"], "seconds": wanda["seconds"]["total"]})
    losa = run_losa(build_config(LosaConfig, recipe, common, {"train": str(train_txt), "out": str(workdir / "losa70")}),
                    command="losa-zero demo (LoSA)")
    rows.append({"run": "LoSA 70% (Wanda)", "ppl": losa["perplexity"][eval_txt.name]["ppl"],
                 "sparsity": losa["achieved_sparsity"], "seconds": losa["seconds"]["total"]})

    print()
    print(f"stories260K, held-out TinyStories perplexity (first {EVAL_CHARS:,} characters, seqlen 512)")
    print(f"{'model':<22}{'perplexity':>12}{'sparsity':>10}{'seconds':>9}")
    for r in rows:
        print(f"{r['run']:<22}{r['ppl']:>12.3f}{r['sparsity']:>10.4f}{r['seconds']:>9.1f}")
    from .report import write_report

    report = write_report([workdir / "wanda70", workdir / "losa70"], workdir / "report")
    print(f"\noutputs in {workdir}/ (dense, wanda70, losa70: HF model directories with summary.json)")
    print(f"report with plots: {report}")
    return rows
