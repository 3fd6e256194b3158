"""One-shot pruning time and memory of this tree against an earlier commit, side by side.

Runs the pruning worker of ``oneshot_vs_llmcompressor.py`` (capture_inputs +
sequential_prune, the prune phase of ``losa-zero prune``) once from this tree and once from
``--baseline`` (a git revision, exported to the work directory), each tree with its own
worker script and its own ``losa_zero`` (a worker calls the package's functions with that
revision's signatures), alternating which goes first, on the same model and calibration
tensor; prints medians and ratios and appends them to BENCHMARKS.md. It also checks that
both trees produce the same pruned weights (bit for bit), which is what a speed-up that
must not change the masks has to show.

    LOSA_ZERO_DATA=../shared/data python bench/oneshot_before_after.py --baseline 7e26c73 --model 100m
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, append_benchmark, machine_header, make_random_llama, markdown_table, median  # noqa: E402
from common import parse_result, run_measured, this_command  # noqa: E402
from oneshot_vs_llmcompressor import BATCH_SIZE, BLOCKSIZE, PERCDAMP, SETTINGS, prepare_data  # noqa: E402

WORKER = Path("bench") / "oneshot_vs_llmcompressor.py"  # inside each tree
MIB = 2 ** 20


def export_tree(rev: str, dest: Path) -> Path:
    """``rev``'s source tree under ``dest`` (git archive), reused when already there."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    tree = dest / sha[:12]
    if not (tree / "losa_zero").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run_tree(src: Path, job: dict, threads: int | None) -> dict:
    import json

    worker = src / WORKER
    if not worker.is_file():
        raise SystemExit(f"error: {worker} does not exist: the baseline revision must have the benchmark worker")
    env = {"PYTHONPATH": str(src), "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = run_measured([sys.executable, str(worker), "--worker", json.dumps(job)], env=env, cwd=src, timeout=3600)
    res = parse_result(r["stdout"])
    res["wall_s"] = r["wall_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare against (e.g. main before a change)")
    ap.add_argument("--model", default="100m", help="100m or 400m (comma-separated)")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--patterns", default="50%,2:4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default="runs/bench/oneshot_before_after")
    ap.add_argument("--data", default=None)
    ap.add_argument("--note", default="", help="a line about the machine's load, added to the record")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import torch

    from losa_zero.data import calibration_windows
    from losa_zero.modeling import load_tokenizer

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_tree = export_tree(args.baseline, work / "trees")
    trees = {"this tree": REPO, args.baseline: base_tree}
    fixture_dir, _ = prepare_data(work, args.data)
    tok = load_tokenizer(fixture_dir)
    rows = []
    t_begin = time.perf_counter()
    for model_name in [m.strip() for m in args.model.split(",") if m.strip()]:
        s = SETTINGS[model_name]
        model_dir = make_random_llama(work / "models" / model_name, model_name, seed=0, tokenizer_from=str(fixture_dir))
        calib_path = work / f"calib_{model_name}.pt"
        torch.save(calibration_windows(tok, str(work / "train.txt"), s["nsamples"], s["seqlen"], seed=0), calib_path)
        for method in args.methods.split(","):
            for pattern in args.patterns.split(","):
                runs = {k: [] for k in trees}
                outs = {}
                for r in range(args.repeats):
                    for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                        job = {"model": str(model_dir), "calib": str(calib_path), "method": method,
                               "pattern": pattern, "batch_size": BATCH_SIZE, "blocksize": BLOCKSIZE,
                               "percdamp": PERCDAMP}
                        if r == 0:
                            outs[name] = work / f"pruned_{len(outs)}.pt"
                            job["out"] = str(outs[name])
                        res = run_tree(trees[name], job, args.threads)
                        runs[name].append(res)
                        print(f"[{time.perf_counter() - t_begin:5.0f}s {model_name} {method} {pattern}] {name}: "
                              f"prune {res['prune_s']:.2f}s, growth "
                              f"{(res['peak_prune'] - res['rss_before_prune']) / MIB:.0f} MiB", file=sys.stderr,
                              flush=True)
                a, b = (torch.load(outs[n], weights_only=True) for n in trees)
                same = all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
                for p in outs.values():
                    p.unlink(missing_ok=True)
                new, old = (median(x["prune_s"] for x in runs[n]) for n in trees)
                gnew, gold = (median((x["peak_prune"] - x["rss_before_prune"]) / MIB for x in runs[n]) for n in trees)
                pnew, pold = (median(x["peak_total"] / MIB for x in runs[n]) for n in trees)
                rows.append([model_name, method, pattern, old, new, new / old, gold, gnew, pold, pnew,
                             "identical" if same else "DIFFERENT"])
    body = markdown_table(["model", "method", "pattern", f"prune s {args.baseline}", "prune s this tree", "ratio",
                           f"prune-phase RSS growth MiB {args.baseline}", "this tree",
                           f"peak RSS MiB {args.baseline}", "this tree", "pruned weights"], rows)
    calib = ", ".join("%s: %d x %d" % (m, SETTINGS[m]["nsamples"], SETTINGS[m]["seqlen"]) for m in args.model.split(","))
    body += (f"\n\nMedians of {args.repeats} runs per tree, alternating which tree runs first; ratio = this tree / "
             f"{args.baseline} (below 1: faster). Settings as `oneshot_vs_llmcompressor.py` (calibration {calib} "
             f"tokens, {BATCH_SIZE} sequences per forward, SparseGPT block {BLOCKSIZE}, dampening {PERCDAMP}).")
    if args.note:
        body += "\n" + args.note
    print("\n" + body)
    if not args.no_record:
        append_benchmark(f"One-shot pruning before/after: {args.baseline} vs this tree", this_command(),
                         machine_header(), body)


if __name__ == "__main__":
    main()
