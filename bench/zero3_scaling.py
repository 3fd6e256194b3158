"""ZeRO-3 LoSA on 1 rank vs 2 ranks (CPU, gloo): seconds and per-rank peak host memory of
every phase, the per-rank mask bytes, and whether both world sizes give the same result.

    LOSA_ZERO_DATA=../shared/data python bench/zero3_scaling.py [--repeats 3] [--quick] [--no-record]
        [--model 100m|stories260K] [--workdir runs/bench/zero3_scaling]

About 7 minutes on an idle 2-core machine with the default 3 repeats (6 runs of about a
minute each, plus making the model once); ``--quick`` (one repeat) about 3 minutes.

The same run config (``train/losa.py`` under torchrun, ``ds_configs/zero3_cpu_test.json``,
torch AdamW so that 1 and 2 ranks can agree bit for bit) is launched with
``--nproc_per_node 1`` and ``--nproc_per_node 2``, alternately, ``--repeats`` times; every
rank runs with one OMP/MKL thread in both cases. Seconds per phase come from each run's
summary.json (``seconds``), memory from ``memory_by_phase_per_rank`` (the peak RSS each
rank has reached by the end of each phase, and its RSS at that moment). The model is a
random-initialised LLaMA of the "100m" shape from bench/common.py (106M parameters, 423 MB
in fp32) with the stories260K fixture's 512-piece tokenizer, so that TinyStories text can
calibrate and fine-tune it; ``--model stories260K`` runs the real 260K fixture instead (its
memory is all process baseline). A random model's perplexity means nothing, but it must
still be the same on 1 and 2 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from bench.common import (REPO, append_benchmark, machine_header, markdown_table, median,  # noqa: E402
                          make_random_llama, run_measured, this_command)

EVAL_CHARS = 200_000  # held-out TinyStories prefix, as in the demo; the rest calibrates and fine-tunes
MiB = 2**20

# Small LoSA settings: the point is the phases' cost per rank, not the quality.
RUN_SETTINGS = {
    "sparsity": 0.5, "steps": 2, "pruner": "wanda", "allocation": "rmi",
    "nsamples": 8, "seqlen": 128, "cka_nsamples": 8, "calib_batch_size": 4,
    "samples_per_step": 8, "final_step_samples": 8, "max_length": 128, "batch_size": 4, "micro_batch_size": 2,
    "optimizer": "adamw", "lr": 1.0e-4, "lora_max_rank": 16, "dtype": "float32",
    "eval_seqlen": 128, "eval_batch_size": 2, "checkpoint_every": 0,
    "export_shard_size": "200MB",  # several shards, so that both ranks write some
    "deepspeed": str(REPO / "ds_configs" / "zero3_cpu_test.json"),
}
MODELS = {
    # name: eval characters (the first N of the held-out part) and settings that differ
    "100m": {"eval_chars": 12_000, "settings": {}},
    "stories260K": {"eval_chars": EVAL_CHARS, "settings": {"seqlen": 256, "max_length": 256, "eval_seqlen": 512,
                                                           "lr": 3.0e-3}},
}

TIMED = ("load", "data", "prepare", "importance", "prune", "finetune", "eval", "save")  # keys of summary "seconds"
STEP_PHASES = (("importance", "importance (CKA)"), ("prune", "pruning"), ("finetune", "fine-tuning"))


def phase_rows(s: dict) -> list[tuple[str, float, str | None]]:
    """(label, seconds, key of ``memory_by_phase_per_rank``) for every phase of a run, in time order."""
    sec = s["seconds"]
    rows = [("load (model built partitioned)", sec["load"], "load"),
            ("calibration (data, dense targets)", sec["data"] + sec["prepare"], "prepare")]
    for step in s["steps"]:
        t = step["step"]
        rows += [(f"step {t}: {label}", step["seconds"][key], f"step{t}.{key}") for key, label in STEP_PHASES]
    rows += [("rest (dist init, engine, checkpoints, merge)", sec["total"] - sum(sec.get(k, 0.0) for k in TIMED),
              "merge"),
             ("eval (perplexity)", sec["eval"], "eval"),
             ("save / export", sec["save"], "save"),
             ("run total (summary)", sec["total"], None),
             ("process wall (torchrun, imports, all)", s["_wall_s"], None)]
    return rows


def prepare_inputs(work: Path, model: str) -> tuple[Path, Path, Path]:
    """The model folder and the evaluation / training texts, made once under ``work``."""
    from losa_zero.convert_llama2c import convert_llama2c
    from losa_zero.demo import fixture_paths

    paths = fixture_paths(os.environ.get("LOSA_ZERO_DATA"))
    work.mkdir(parents=True, exist_ok=True)
    text = paths["tinystories"].read_text(encoding="utf-8")
    eval_txt, train_txt = work / f"eval_{model}.txt", work / "train.txt"
    eval_txt.write_text(text[:MODELS[model]["eval_chars"]], encoding="utf-8")
    train_txt.write_text(text[EVAL_CHARS:], encoding="utf-8")
    stories = work / "stories260K"
    if not (stories / "config.json").exists():
        convert_llama2c(paths["checkpoint"], paths["tokenizer"], stories, overwrite=True)
    model_dir = stories if model == "stories260K" else make_random_llama(work / f"random-{model}", model, seed=0,
                                                                          tokenizer_from=str(stories))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)("Once upon a time")["input_ids"]
    if len(ids) < 2 or max(ids) >= 512:
        raise SystemExit(f"the tokenizer in {model_dir} is broken (ids {ids}): delete {work} and rerun")
    return model_dir, eval_txt, train_txt


def child_env(work: Path) -> dict[str, str]:
    env = {
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions"),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return env


def launch(config: Path, out: Path, nproc: int, work: Path, timeout: float) -> dict:
    """One run under torchrun (the same launcher at both world sizes); its wall seconds and summary."""
    for p in (out, Path(f"{out}.checkpoints")):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "train" / "losa.py"), str(config), f"out={out}", "keep_checkpoints_after_export=true"]
    r = run_measured(cmd, env=child_env(work), cwd=REPO, timeout=timeout)  # torchrun sets RANK, WORLD_SIZE...
    s = json.loads((out / "summary.json").read_text())
    s["_wall_s"] = r["wall_s"]
    return s


def final_state(out: Path):
    """Every mask and parameter of the run's last checkpoint, reassembled from the rank shards."""
    from losa_zero.zero3.checkpoint import ShardReader, latest_complete

    info = latest_complete(Path(f"{out}.checkpoints"))
    frozen, train = ShardReader(info, "frozen"), ShardReader(info, "train")
    masks = {n: frozen.full_mask(n) for n in info.meta["masks"]}
    params = {n: (train if m["trainable"] else frozen).full(n) for n, m in info.meta["params"].items()}
    return masks, params


def compare(s1: dict, out1: Path, s2: dict, out2: Path) -> dict:
    import torch

    def field(s, name):
        return [layer[name] for step in s["steps"] for layer in step["layers"]]

    m1, p1 = final_state(out1)
    m2, p2 = final_state(out2)
    masks_equal = m1.keys() == m2.keys() and all(m1[n] is not None and torch.equal(m1[n], m2[n]) for n in m1)
    worst = max((p1[n].float() - p2[n].float()).abs().max().item() for n in p1) if p1.keys() == p2.keys() else None
    ppl1 = next(iter(s1["perplexity"].values()))["ppl"]
    ppl2 = next(iter(s2["perplexity"].values()))["ppl"]
    return {
        "masks_equal": masks_equal, "n_masks": len(m1),
        "rates_equal": field(s1, "rate") == field(s2, "rate"),
        "ranks_equal": field(s1, "rank") == field(s2, "rank"),
        "sparsity_equal": s1["achieved_sparsity"] == s2["achieved_sparsity"],
        "ppl": (ppl1, ppl2), "ppl_rel_diff": abs(ppl1 - ppl2) / ppl1,
        "max_weight_diff": worst,
    }


def mib(x: float) -> str:
    return f"{x / MiB:,.0f}"


def report(runs: dict[int, list[dict]], checks: list[dict], args, model_dir: Path) -> tuple[str, bool]:
    reps = len(runs[1])
    rows1 = [phase_rows(s) for s in runs[1]]
    rows2 = [phase_rows(s) for s in runs[2]]
    t_rows, m_rows = [], []
    for i, (label, _, key) in enumerate(rows1[0]):
        a, b = median(r[i][1] for r in rows1), median(r[i][1] for r in rows2)
        t_rows.append([label, round(a, 2), round(b, 2), f"{b / a:.2f}" if a > 0 else "-"])
        if key is None:
            continue

        def mem(w: int, rank: int, field: str) -> float:
            return median(s["memory_by_phase_per_rank"][rank][key][field] for s in runs[w])

        p1, p2 = mem(1, 0, "peak_rss_bytes"), [mem(2, r, "peak_rss_bytes") for r in (0, 1)]
        c1, c2 = mem(1, 0, "rss_bytes"), [mem(2, r, "rss_bytes") for r in (0, 1)]
        m_rows.append([label, mib(p1), " / ".join(mib(x) for x in p2), f"{max(p2) / p1:.2f}",
                       mib(c1), " / ".join(mib(x) for x in c2), f"{max(c2) / c1:.2f}"])
    o1 = median(s["peak_memory_per_rank"][0]["host_rss_bytes"] for s in runs[1])
    o2 = [median(s["peak_memory_per_rank"][r]["host_rss_bytes"] for s in runs[2]) for r in (0, 1)]
    m_rows.append(["whole run (peak_memory_per_rank)", mib(o1), " / ".join(mib(x) for x in o2),
                   f"{max(o2) / o1:.2f}", "", "", ""])
    t_table = markdown_table(["phase", "1 rank (s)", "2 ranks (s)", "2 / 1"], t_rows)
    m_table = markdown_table(["phase", "1 rank: peak by phase end (MiB)", "2 ranks: rank 0 / rank 1 (MiB)",
                              "2 / 1 (larger rank)", "1 rank: RSS at phase end (MiB)",
                              "2 ranks: rank 0 / rank 1 (MiB)", "2 / 1 (larger rank)"], m_rows)

    # -- masks and equality ---------------------------------------------------------------------
    mb1, mb2 = runs[1][-1]["mask_bytes_per_rank"], runs[2][-1]["mask_bytes_per_rank"]
    same = all(c["masks_equal"] and c["rates_equal"] and c["ranks_equal"] and c["sparsity_equal"]
               and c["ppl_rel_diff"] < 1e-3 for c in checks)
    worst_w = max(c["max_weight_diff"] for c in checks)
    ppl_lines = "; ".join(f"{c['ppl'][0]:.6g} vs {c['ppl'][1]:.6g}" for c in checks)
    s0 = runs[1][0]
    cfg = {k: v for k, v in s0["config"].items() if k in RUN_SETTINGS and k != "deepspeed"}
    lines = [
        f"Model: `{args.model}` ({model_dir.name}{', random weights, 512-piece fixture tokenizer' if args.model != 'stories260K' else ''}); "
        f"{reps} repeat(s) of each world size, run alternately; every number is the median over the repeats, "
        "and every ratio is the ratio of the two medians. Each run is `train/losa.py` under "
        "`torchrun --standalone --nproc_per_node N` with `DS_ACCELERATOR=cpu`, gloo, `OMP_NUM_THREADS=1` and "
        "`MKL_NUM_THREADS=1` per rank at both world sizes (this machine has "
        f"{os.cpu_count()} cores), `ds_configs/zero3_cpu_test.json`.",
        "",
        "Run settings: " + ", ".join(f"{k} {v}" for k, v in cfg.items()) + "."
        + (" Environment: " + ", ".join(f"`{k}={v}`" for k, v in sorted(os.environ.items())
                                        if k.startswith("MALLOC_")) + "." if any(k.startswith("MALLOC_")
                                                                                for k in os.environ) else ""),
        "",
        "### Seconds per phase", "", t_table, "",
        "### Host memory per rank", "", m_table, "",
        f"Mask bytes per rank (bit-packed, partitioned like the weights): 1 rank {mb1}; 2 ranks {mb2} "
        f"(ratio {max(mb2) / mb1[0]:.3f}).",
        "",
        f"Same result on 1 and 2 ranks in {sum(1 for c in checks if c['masks_equal'])}/{len(checks)} repeat(s) for "
        f"the masks ({checks[0]['n_masks']} linears, compared bit for bit from the final checkpoints), "
        f"{sum(1 for c in checks if c['rates_equal'] and c['ranks_equal'])}/{len(checks)} for the per-layer rates "
        f"and LoRA ranks of every step, {sum(1 for c in checks if c['sparsity_equal'])}/{len(checks)} for the "
        f"achieved sparsity; perplexity (1 rank vs 2 ranks): {ppl_lines}; largest weight difference "
        f"{worst_w:.3g}. Overall: **{'same' if same else 'DIFFERENT'}**.",
        "",
        "Notes:",
        "- Seconds are from each run's summary.json. `calibration` is the tokenised data plus the capture of "
        "the calibration activations and the dense reconstruction targets (written to the checkpoint "
        "folder); `rest` is the run's total minus the timed phases (distributed init, DeepSpeed engine, the "
        "checkpoint written at the end of every LoSA step, the final merge); the process wall adds "
        "interpreter start, imports and torchrun.",
        "- Both world sizes run one thread per rank, so the 1-rank run leaves the second core idle and the "
        "2-rank run uses both: the work split between the ranks (calibration sequences in whole calibration "
        "batches, each rank's share of a block's linears when pruning, micro-batches when fine-tuning, "
        "perplexity windows, export shards) can get up to 2x faster. Against that, every forward all-gathers "
        "each layer over gloo (the whole model crosses between the ranks at every pass, backward included), "
        "and both ranks repeat the rest. A ratio above 1 means the communication and the repeated work cost "
        "more than the second core gives; on a machine where other jobs take a core the 2-rank run loses "
        "more, so only compare numbers from an idle machine.",
        "- Memory is what ZeRO-3 is for. `peak by phase end` is the rank's `ru_maxrss` when the phase ends: it "
        "never falls, so a row that rises over the row above is the phase that set a new peak, and a row "
        "that does not rise stayed at or below it. `RSS at phase end` is what stays resident after the "
        "phase. Partitioned (each rank holds 1/W): the fp32 weights, the bit-packed masks, the LoRA "
        "factors and their optimizer state, the dense targets and calibration activations (each rank "
        "holds its share of the sequences). Replicated on every rank: the process baseline (Python, torch, "
        "transformers, DeepSpeed; with `--model stories260K` it is nearly all there is), the decoder layer or "
        "embedding / LM head gathered at the moment, the tokenizer and data, the activations of the "
        "micro-batch being trained or evaluated, and its logits over the vocabulary (32,000 entries for the "
        "random shapes). So the 2 / 1 ratio tends to 0.5 only when the partitioned part dominates.",
        "- RSS also counts heap that glibc malloc has freed but kept: after a large block is freed its "
        "mmap threshold grows (up to 32 MiB), so later tensors of a few MiB (gathered parameters, "
        "activations) come from the heap and their freed pages are not returned to the OS. Setting "
        "`MALLOC_MMAP_THRESHOLD_=131072` in the environment (the ranks inherit it; it is then named in the "
        "run settings above) keeps the threshold fixed and shows closer to what the tensors themselves need.",
    ]
    return "\n".join(lines), same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="100m")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each world size (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="one repeat (a check that everything runs)")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "bench" / "zero3_scaling"))
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per run")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    work = Path(args.workdir).resolve()
    model_dir, eval_txt, train_txt = prepare_inputs(work, args.model)
    settings = {**RUN_SETTINGS, **MODELS[args.model]["settings"], "model": str(model_dir), "calib": str(train_txt),
                "train": str(train_txt), "ppl": str(eval_txt), "overwrite": True}
    import yaml

    config = work / f"run_{args.model}.yaml"
    config.write_text(yaml.safe_dump(settings))
    runs: dict[int, list[dict]] = {1: [], 2: []}
    checks = []
    t0 = time.perf_counter()
    for rep in range(repeats):
        outs = {}
        order = (1, 2) if rep % 2 == 0 else (2, 1)  # alternate, so drift in the machine's load does not favour one
        for w in order:
            outs[w] = work / "runs" / f"{args.model}_w{w}"
            s = launch(config, outs[w], w, work, args.timeout)
            runs[w].append(s)
            print(f"[repeat {rep + 1}/{repeats}] {w} rank(s): {s['seconds']['total']:.1f}s in the run, "
                  f"{s['_wall_s']:.1f}s wall, peak RSS per rank "
                  f"{[mib(p['host_rss_bytes']) for p in s['peak_memory_per_rank']]} MiB", file=sys.stderr, flush=True)
        checks.append(compare(runs[1][-1], outs[1], runs[2][-1], outs[2]))
        for w in (1, 2):  # about 1.5 GB each; the summaries are kept in results_MODEL.json
            shutil.rmtree(outs[w], ignore_errors=True)
            shutil.rmtree(f"{outs[w]}.checkpoints", ignore_errors=True)
    print(f"all runs: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    body, same = report(runs, checks, args, model_dir)
    (work / f"results_{args.model}.json").write_text(json.dumps({"runs": runs, "checks": checks}, indent=1))
    title = f"ZeRO-3 LoSA, 1 rank vs 2 ranks on CPU ({args.model})"
    header = machine_header()
    if args.no_record:
        print(f"\n## {title}\n\n{header}\n\nCommand: `{this_command()}`\n\n{body}")
    else:
        append_benchmark(title, this_command(), header, body)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
