"""GPU acceptance run in one command: what a first GPU machine must show before users' runs.

    python bench/gpu_acceptance.py                 # one CUDA GPU; --budget (480 s) caps the parts
    python bench/gpu_acceptance.py --cpu-smoke     # the same logic on tiny sizes on the CPU (tests)

Three parts, each in its own try block, each printing its table and writing
``OUT/part_<x>.json`` and ``OUT/part_<x>.md`` the moment it ends (OUT: ``--out``, else
``$OUT`` when set, else ``runs/gpu_acceptance``); ``OUT/acceptance.md`` collects them all:

(a) the fixture (stories260K, held-out TinyStories) through the real CLI (``losa-zero eval``,
    ``prune`` with Wanda and SparseGPT at 50% and 2:4, and ``losa`` at the size of the demo's
    ``--quick``) on CUDA in bf16 and, in a second process at the same time, on the CPU in fp32
    (the path every CPU test validates): perplexities must agree within bf16 tolerance and
    the sparsity must be identical;
(b) ``losa-zero train`` under DeepSpeed ZeRO-3 with NCCL on one GPU, ``ds_configs/zero3.json``
    and paged 8-bit AdamW: an uninterrupted run, and a run SIGKILLed after N optimizer steps
    (between two periodic checkpoints, so work is lost) and resumed with ``resume: auto``; the
    exported weights must match (sparsity pattern exactly, values within bf16 tolerance; also
    reported: whether they are bit-identical);
(c) ``bench/gpu_llama7b.py`` at LLaMA-2-7B shapes (the real SparseLoRALinear, pruners and
    optimizer choice): seconds per block for calibration + pruning, fine-tuning tokens/s and
    MFU, the projected recipe time, 2:4 inference.

Where bitsandbytes or flash-attn are missing the run says so and goes on (the 8-bit
optimizer falls back to torch AdamW, recorded in the tables). The fixture is found through
``LOSA_ZERO_DATA`` or ``../shared/data``. Nothing is recorded to BENCHMARKS.md automatically:
the tables are the record to copy there with the device named.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]

#: perplexity agreement, CUDA bf16 against CPU fp32. bf16 keeps 8 significant bits (each
#: rounding is off by up to 2^-9 relative), which shifts the mean log-likelihood a little;
#: pruning decisions near a threshold may flip, and fine-tuning in bf16 compounds over its
#: steps, hence the looser bounds. Chosen from that reasoning, not yet from a GPU run: the
#: first run's measured differences (printed beside them) are the check on these bounds.
PPL_RTOL = {"eval": 0.02, "prune": 0.03, "losa": 0.06}
#: runs with a bound of their own. SparseGPT 2:4 chooses each group of 4 on the weights as
#: updated by the columns before it, so one flipped near-tie changes the later choices of the
#: row; bf16 activations flip a few percent of its choices, and at 2:4 the fixture sits at
#: several times its dense perplexity, where those flips move perplexity by a few percent
#: either way. Its arithmetic is float32 on any weight dtype (tests/test_pruners.py:
#: test_sparsegpt_on_bf16_weights_computes_in_fp32_and_rounds_once); the CPU measurement of
#: this drift is in BENCHMARKS.md ("SparseGPT 2:4 in bf16 against fp32").
PPL_RTOL_RUN = {"sparsegpt 2:4": 0.06}


def ppl_rtol(label: str, kind: str) -> float:
    return PPL_RTOL_RUN.get(label, PPL_RTOL[kind])
#: exported weights of the resumed run against the uninterrupted one (relative Frobenius
#: distance per tensor): bf16 on GPU (atomics in attention backward may reorder sums), fp32 on CPU
WEIGHT_RTOL = {"cuda": 2e-2, "cpu": 1e-5}

# sizes: the full acceptance run, and the CPU smoke run of the test suite
SIZES = {
    "gpu": {
        "eval_chars": None,  # the demo's held-out split: the first 200,000 characters
        "oneshot": {"nsamples": 64, "seqlen": 512},
        "prune": ["wanda 50%", "sparsegpt 50%", "wanda 2:4", "sparsegpt 2:4"],
        "losa": {"steps": 5, "nsamples": 32, "cka_nsamples": 16, "samples_per_step": 80,
                 "final_step_samples": 240},  # the demo's --quick
        "train": {"steps": 3, "nsamples": 32, "seqlen": 128, "cka_nsamples": 16, "samples_per_step": 160,
                  "final_step_samples": 160, "max_length": 128, "batch_size": 8, "micro_batch_size": 4,
                  "checkpoint_every": 4},
        "kill_after": 27,   # optimizer steps: 20 in LoSA step 1, then 7 of step 2 (checkpoint at 4)
        "llama7b": ["--shape", "7b", "--blocks", "2", "--ft-steps", "3", "--ft-warmup", "1", "--repeats", "3",
                    "--decode-tokens", "64"],
        "timeouts": {"a": 180, "b": 210, "c": 210},
        "budget": 480,
    },
    "smoke": {
        "eval_chars": 5_000,  # about 2,400 tokens: 18 windows of 128, enough for a finite perplexity
        "oneshot": {"nsamples": 8, "seqlen": 128},
        "prune": ["wanda 50%", "sparsegpt 2:4"],
        "losa": {"steps": 2, "nsamples": 8, "cka_nsamples": 8, "samples_per_step": 16, "final_step_samples": 16,
                 "max_length": 128, "seqlen": 128, "eval_seqlen": 128},
        "train": {"steps": 2, "nsamples": 8, "seqlen": 64, "cka_nsamples": 8, "samples_per_step": 48,
                  "final_step_samples": 48, "max_length": 64, "batch_size": 8, "micro_batch_size": 8,
                  "checkpoint_every": 2, "eval_seqlen": 128},
        "kill_after": 9,    # 6 in step 1, then 3 of step 2's 6 (checkpoint at 2: one step is lost)
        "llama7b": ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--nsamples", "4", "--seqlen", "64",
                    "--blocks", "2", "--ft-batch", "2", "--ft-seqlen", "64", "--ft-steps", "2", "--ft-warmup", "1"],
        "timeouts": {"a": 2400, "b": 2400, "c": 1200},  # generous: CI machines may be shared
        "budget": 6000,
    },
}


def say(msg: str) -> None:
    print(f"[gpu_acceptance {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def data_root() -> Path:
    root = os.environ.get("LOSA_ZERO_DATA") or str(REPO.parent / "shared" / "data")
    if not (Path(root) / "stories260K" / "stories260K.bin").is_file():
        raise SystemExit(f"error: fixture not found under {root}: set LOSA_ZERO_DATA to the shared data folder")
    return Path(root)


def table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def child_env(smoke: bool, threads: int | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "LOSA_ZERO_DATA": str(data_root())})
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume comparison
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if smoke:
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOSA_ZERO_TEST_HOLD"):
        env.pop(k, None)
    return env


def environment_report(smoke: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU", "mode":
            "cpu-smoke" if smoke else "gpu"}
    for pkg in ("deepspeed", "transformers", "bitsandbytes", "flash_attn"):
        if importlib.util.find_spec(pkg) is None:
            info[pkg] = "absent"
            continue
        try:
            mod = __import__(pkg)
            info[pkg] = str(getattr(mod, "__version__", "present"))
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not fatal
            info[pkg] = f"broken ({type(exc).__name__}: {exc})"
    return info


# -- the fixture ------------------------------------------------------------------------------------
def prepare_fixture(work: Path, eval_chars: int | None = None) -> dict:
    from losa_zero.convert_llama2c import convert_llama2c
    from losa_zero.demo import EVAL_CHARS, RECIPE, fixture_paths

    paths = fixture_paths(str(data_root()))
    work.mkdir(parents=True, exist_ok=True)
    text = paths["tinystories"].read_text(encoding="utf-8")
    eval_txt, train_txt = work / "eval.txt", work / "train.txt"
    eval_txt.write_text(text[:eval_chars or EVAL_CHARS], encoding="utf-8")
    train_txt.write_text(text[EVAL_CHARS:], encoding="utf-8")
    dense = convert_llama2c(paths["checkpoint"], paths["tokenizer"], work / "dense", overwrite=True)
    return {"model": str(dense), "eval": str(eval_txt), "train": str(train_txt), "recipe": str(RECIPE)}


# -- part (a): the CLI on the fixture, one device -----------------------------------------------------
def fixture_runs(fx: dict, sizes: dict) -> list[tuple[str, str, list[str]]]:
    """(label, kind, CLI arguments) of every run of part (a), without device and dtype."""
    one = sizes["oneshot"]
    base = ["--model", fx["model"], "--calib", fx["train"], "--ppl", fx["eval"], "--nsamples", str(one["nsamples"]),
            "--seqlen", str(one["seqlen"]), "--overwrite"]
    runs = [("dense", "eval", ["eval", "--model", fx["model"], "--ppl", fx["eval"]])]
    for name in sizes["prune"]:
        method, label = name.split()
        extra = ["--nm", label] if ":" in label else ["--sparsity", str(float(label.rstrip("%")) / 100)]
        runs.append((name, "prune", ["prune", "--method", method, *extra, *base]))
    losa = ["losa", "--config", fx["recipe"], "--model", fx["model"], "--calib", fx["train"], "--train", fx["train"],
            "--ppl", fx["eval"], "--overwrite"]
    for key, value in sizes["losa"].items():
        losa += [f"--{key.replace('_', '-')}", str(value)]
    runs.append(("LoSA 70% (wanda, quick)", "losa", losa))
    return runs


def worker_fixture(args) -> int:
    """One device's part (a): every run through ``losa_zero.cli.main`` (the installed
    ``losa-zero`` command's entry point) in this process; results to ``--json``."""
    from losa_zero.cli import main as cli

    fx = json.loads(Path(args.fixture).read_text())
    sizes = SIZES["smoke" if args.cpu_smoke else "gpu"]
    out_dir = Path(args.json).parent / f"runs_{args.device}_{args.dtype}"
    results = {}
    for label, kind, argv in fixture_runs(fx, sizes):
        name = label.split(" (")[0].replace(" ", "_").replace("%", "").replace(":", "_")
        t0 = time.perf_counter()
        try:
            if kind == "eval":
                js = out_dir / f"{name}.json"
                out_dir.mkdir(parents=True, exist_ok=True)
                rc = cli(["-q", *argv, "--device", args.device, "--dtype", args.dtype, "--json", str(js)])
                summary = json.loads(js.read_text())
                sparsity = summary.get("sparsity", 0.0)
            else:
                rc = cli(["-q", *argv, "--device", args.device, "--dtype", args.dtype, "--out", str(out_dir / name)])
                summary = json.loads((out_dir / name / "summary.json").read_text())
                sparsity = summary["achieved_sparsity"]
            ppl = next(iter(summary["perplexity"].values()))["ppl"]
            results[label] = {"kind": kind, "rc": rc, "ppl": ppl, "sparsity": sparsity,
                              "optimizer": summary.get("optimizer"), "seconds": time.perf_counter() - t0}
        except BaseException as exc:  # noqa: BLE001 - SystemExit from the CLI included
            results[label] = {"kind": kind, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def compare_fixture_runs(test: dict, ref: dict, labels: list[tuple[str, str]]) -> tuple[bool, list[list]]:
    """Each run on the device against the CPU reference: perplexity within the bound of its
    run or kind (:func:`ppl_rtol`) and exactly the same sparsity; a run missing on either side fails."""
    rows, ok = [], True
    for label, kind in labels:
        t, r = test.get(label, {}), ref.get(label, {})
        if "ppl" not in t or "ppl" not in r:
            why = t.get("error") or r.get("error") or "not run (timeout)"
            rows.append([label, t.get("ppl"), r.get("ppl"), None, ppl_rtol(label, kind), None, None, f"FAIL: {why}"])
            ok = False
            continue
        rel = abs(t["ppl"] - r["ppl"]) / r["ppl"]
        good = rel <= ppl_rtol(label, kind) and abs(t["sparsity"] - r["sparsity"]) < 1e-9
        ok &= good
        opt = (t.get("optimizer") or {}).get("used", "")
        rows.append([label, t["ppl"], r["ppl"], rel, ppl_rtol(label, kind), t["sparsity"], r["sparsity"],
                     ("ok" if good else "FAIL") + (f" (optimizer {opt})" if opt else "")])
    return ok, rows


def part_a(args, out: Path, fx: dict, device: str, smoke: bool, timeout: float) -> dict:
    fx_file = out / "fixture.json"
    fx_file.write_text(json.dumps(fx))
    dtype = "bfloat16"
    # two processes at once: the CPU ones split the cores (two processes each running as
    # many threads as there are cores oversubscribe them, which slows both many times over)
    cpu_threads = max(1, (os.cpu_count() or 2) // 2)
    procs = {}
    for dev, dt, threads in ((device, dtype, None if device == "cuda" else cpu_threads), ("cpu", "float32", cpu_threads)):
        js = out / f"part_a_{dev}_{dt}.json"
        js.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", "fixture", "--fixture", str(fx_file), "--device", dev,
               "--dtype", dt, "--json", str(js)] + (["--cpu-smoke"] if smoke else [])
        log = open(out / f"part_a_{dev}_{dt}.log", "w")
        procs[(dev, dt)] = (subprocess.Popen(cmd, env=child_env(smoke, threads), cwd=REPO, stdout=log,
                                             stderr=subprocess.STDOUT), js)
    deadline = time.time() + timeout
    for (dev, dt), (proc, _) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            say(f"part (a) on {dev} {dt}: timed out after {timeout:.0f}s (partial results kept)")
    res = {k: (json.loads(js.read_text()) if js.exists() else {}) for k, (_, js) in procs.items()}
    labels = [(label, kind) for label, kind, _ in fixture_runs(fx, SIZES["smoke" if smoke else "gpu"])]
    ok, rows = compare_fixture_runs(res[(device, dtype)], res[("cpu", "float32")], labels)
    md = table([f"run ({device} {dtype} vs cpu float32)", f"ppl {device} {dtype}", "ppl cpu float32", "rel diff",
                "tolerance", f"sparsity {device} {dtype}", "sparsity cpu float32", "result"], rows)
    secs = {f"{d} {t}": round(sum(v.get("seconds", 0) for v in r.values()), 1) for (d, t), r in res.items()}
    md += f"\n\nwall seconds per device (both ran at the same time): {secs}\n"
    return {"ok": ok, "results": {f"{d} {t}": r for (d, t), r in res.items()}, "markdown": md}


# -- part (b): ZeRO-3 train, killed and resumed ------------------------------------------------------------
def train_config(path: Path, fx: dict, sizes: dict, out: Path, smoke: bool) -> Path:
    import yaml

    cfg = {"model": fx["model"], "calib": fx["train"], "train": fx["train"], "ppl": fx["eval"], "sparsity": 0.7,
           "pruner": "wanda", "lr": 3.0e-3, "optimizer": "paged_adamw_8bit", "out": str(out),
           "deepspeed": str(REPO / "ds_configs" / "zero3.json"), "dtype": "float32" if smoke else "bfloat16",
           "calib_batch_size": 8, "dist_timeout_minutes": 10,
           "keep_checkpoints": 100, **sizes["train"]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_train(cfg: Path, log: Path, smoke: bool, overrides: list[str] = ()) -> subprocess.Popen:
    env = child_env(smoke, 1 if smoke else None)
    env["TORCH_EXTENSIONS_DIR"] = str(log.parent / "torch_extensions")
    return subprocess.Popen([sys.executable, "-m", "losa_zero.cli", "train", str(cfg), *overrides], env=env,
                            cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def metric_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip().startswith("{"))
    except OSError:
        return 0


def exported_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise RuntimeError(f"no exported weights in {out}")
    return tensors


def compare_weights(a: dict, b: dict, rtol: float) -> dict:
    """The resumed export ``a`` against the uninterrupted ``b``: the same tensors, the same
    zero pattern, every tensor within ``rtol`` (relative Frobenius distance)."""
    import torch

    if a.keys() != b.keys():
        return {"ok": False, "same_pattern": False, "bitwise": False, "max_rel": float("inf"),
                "max_abs": float("inf"), "tolerance": rtol, "why": "the exports hold different tensors"}
    worst_rel, worst_abs, bitwise, same_pattern = 0.0, 0.0, True, True
    for name in a:
        x, y = a[name].float(), b[name].float()
        bitwise &= torch.equal(a[name], b[name])
        same_pattern &= torch.equal(x == 0, y == 0)
        worst_abs = max(worst_abs, (x - y).abs().max().item())
        worst_rel = max(worst_rel, ((x - y).norm() / y.norm().clamp_min(1e-30)).item())
    return {"ok": same_pattern and worst_rel <= rtol, "same_pattern": same_pattern, "bitwise": bitwise,
            "max_rel": worst_rel, "max_abs": worst_abs, "tolerance": rtol}


def part_b(args, out: Path, fx: dict, device: str, smoke: bool, timeout: float) -> dict:
    sizes = SIZES["smoke" if smoke else "gpu"]
    work = out / "part_b"
    work.mkdir(parents=True, exist_ok=True)
    ref_out, kill_out = work / "uninterrupted", work / "killed"
    for d in (ref_out, kill_out, Path(f"{ref_out}.checkpoints"), Path(f"{kill_out}.checkpoints")):
        if d.exists():
            shutil.rmtree(d)
    ref_cfg = train_config(work / "uninterrupted.yaml", fx, sizes, ref_out, smoke)
    kill_cfg = train_config(work / "killed.yaml", fx, sizes, kill_out, smoke)
    deadline = time.time() + timeout
    t0 = time.time()
    ref = start_train(ref_cfg, work / "uninterrupted.log", smoke)
    victim = start_train(kill_cfg, work / "killed.log", smoke)   # both at once: the GPU has room
    metrics = Path(f"{kill_out}.checkpoints") / "metrics.jsonl"
    seen = 0
    while time.time() < deadline and victim.poll() is None:
        seen = metric_lines(metrics)
        if seen >= sizes["kill_after"]:
            break
        time.sleep(0.05)
    if victim.poll() is not None:
        raise RuntimeError(f"the run to be killed ended first (exit {victim.returncode}) after {seen} optimizer steps; "
                           f"log: {work / 'killed.log'}")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = metric_lines(metrics)
    say(f"part (b): SIGKILL after {killed_at} optimizer steps")
    resumed = start_train(kill_cfg, work / "resumed.log", smoke, ["resume=auto"])
    rcs = {}
    for name, proc in (("uninterrupted", ref), ("resumed", resumed)):
        try:
            rcs[name] = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rcs[name] = "timeout"
    if rcs != {"uninterrupted": 0, "resumed": 0}:
        raise RuntimeError(f"train exits {rcs}; logs in {work}")
    s_ref = json.loads((ref_out / "summary.json").read_text())
    s_res = json.loads((kill_out / "summary.json").read_text())
    a, b = exported_weights(ref_out), exported_weights(kill_out)
    cmp = compare_weights(a, b, WEIGHT_RTOL[device])
    ok, same_pattern, bitwise, worst_rel, worst_abs, tol = (cmp["ok"], cmp["same_pattern"], cmp["bitwise"],
                                                            cmp["max_rel"], cmp["max_abs"], cmp["tolerance"])
    ppl_ref = next(iter(s_ref["perplexity"].values()))["ppl"]
    ppl_res = next(iter(s_res["perplexity"].values()))["ppl"]
    rows = [["launcher, backend", f"{s_ref.get('launcher')}, {s_ref.get('backend')} (world {s_ref.get('world_size')})",
             f"{s_res.get('launcher')}, {s_res.get('backend')} (world {s_res.get('world_size')})"],
            ["DeepSpeed config", Path(s_ref["deepspeed_config"]).name, Path(s_res["deepspeed_config"]).name],
            ["optimizer used", (s_ref.get("optimizer") or {}).get("used"), (s_res.get("optimizer") or {}).get("used")],
            ["optimizer fallback", (s_ref.get("optimizer") or {}).get("fallback"),
             (s_res.get("optimizer") or {}).get("fallback")],
            ["SIGKILL after optimizer steps", "", killed_at],
            ["resumed from", "", str(s_res.get("resumed_from"))],
            ["achieved sparsity", s_ref["achieved_sparsity"], s_res["achieved_sparsity"]],
            ["perplexity", ppl_ref, ppl_res],
            ["seconds (total)", s_ref["seconds"]["total"], s_res["seconds"]["total"]]]
    md = table(["ZeRO-3 train, 1 rank", "uninterrupted", "killed + resumed"], rows)
    md += (f"\n\nexported weights: sparsity pattern identical: {same_pattern}; bit-identical: {bitwise}; "
           f"max relative distance per tensor {worst_rel:.3g} (tolerance {tol:g}), max abs difference "
           f"{worst_abs:.3g} -> {'ok' if ok else 'FAIL'}. Wall time of the part: {time.time() - t0:.0f}s.\n")
    return {"ok": ok, "killed_at": killed_at, "bitwise": bitwise, "same_pattern": same_pattern,
            "max_rel": worst_rel, "max_abs": worst_abs, "markdown": md,
            "summaries": {"uninterrupted": {k: s_ref.get(k) for k in ("optimizer", "launcher", "backend", "world_size",
                                                                    "seconds")},
                          "resumed": {k: s_res.get(k) for k in ("optimizer", "launcher", "backend", "world_size",
                                                                "seconds", "resumed_from")}}}


# -- part (c): 7B shapes ------------------------------------------------------------------------------------
def part_c(args, out: Path, fx: dict, device: str, smoke: bool, timeout: float) -> dict:
    sizes = SIZES["smoke" if smoke else "gpu"]
    js = out / "part_c_llama7b.json"
    js.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "bench" / "gpu_llama7b.py"), *sizes["llama7b"], "--no-record", "--json", str(js)]
    log = out / "part_c_llama7b.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=child_env(smoke, 1 if smoke else None), cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
    res = json.loads(js.read_text()) if js.exists() else {"parts": {}, "errors": {}}
    parts, rows = res.get("parts", {}), []
    for name, p in (parts.get("pruning") or {}).items():
        rows.append([f"{name}: calibration + prune s/block", p["prune_block_s"]])
        rows.append([f"{name}: calibration forward s/block", p["forward_block_s"]])
    ft = parts.get("finetune")
    if ft:
        rows += [[f"fine-tuning tokens/s ({ft['optimizer']})", ft["tokens_per_s"]],
                 ["fine-tuning MFU", ft["mfu"]], ["fine-tuning peak GPU GiB", ft["peak_gpu_gib"]]]
    for name, p in (parts.get("projection") or {}).items():
        rows.append([f"projected 7B recipe total min ({name})", p["total_min"]])
    inf = parts.get("inference_2_4")
    if inf:
        for k in inf["dense"]:
            rows.append([f"2:4 speedup, {k}", inf["sparse"][k] / inf["dense"][k]])
    for part, err in res.get("errors", {}).items():
        rows.append([f"{part}", f"FAILED: {err}"])
    md = table([f"gpu_llama7b.py {' '.join(sizes['llama7b'])}", "value"], rows)
    md += f"\n\nfull tables: {log.name}; numbers: {js.name}; exit {rc}.\n"
    ok = rc == 0 and bool(parts.get("pruning")) and bool(ft)
    return {"ok": ok, "rc": rc, "results": res, "markdown": md}


PARTS = {"a": ("fixture CLI on the device against the CPU", part_a),
         "b": ("ZeRO-3 train killed and resumed", part_b),
         "c": ("7B-shape timings", part_c)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results folder (default: $OUT, else runs/gpu_acceptance)")
    ap.add_argument("--parts", default="a,b,c", help="which parts to run (default: a,b,c)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts together; a part gets at most what is left (default: 480, smoke 2400)")
    ap.add_argument("--worker", choices=["fixture"], help=argparse.SUPPRESS)
    ap.add_argument("--fixture", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_fixture(args)

    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device is visible: run this on a GPU machine, or pass --cpu-smoke")
    device = "cpu" if smoke else "cuda"
    out = Path(args.out or os.environ.get("OUT") or REPO / "runs" / "gpu_acceptance")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = environment_report(smoke)
    (out / "environment.json").write_text(json.dumps(env, indent=1))
    missing = [k for k in ("bitsandbytes", "flash_attn") if env[k] == "absent" or env[k].startswith("broken")]
    say("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    consequence = {"bitsandbytes": "the 8-bit optimizers fall back to torch AdamW",
                   "flash_attn": "attention runs through SDPA"}
    for pkg in missing:
        say(f"{pkg} is not usable here ({env[pkg]}): {consequence[pkg]}")
    report = [f"# GPU acceptance ({env['mode']}) on {env['device']}", "",
              "environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    sizes = SIZES["smoke" if smoke else "gpu"]
    fx = prepare_fixture(out / "fixture", sizes["eval_chars"])
    summary = {"environment": env, "parts": {}}
    budget_end = started + (args.budget or sizes["budget"])
    for key in [p.strip() for p in args.parts.split(",") if p.strip()]:
        title, fn = PARTS[key]
        t0 = time.time()
        left = budget_end - t0
        say(f"part ({key}) {title}: start ({min(left, sizes['timeouts'][key]):.0f}s at most)")
        try:
            if left < 30:
                raise TimeoutError(f"not run: {left:.0f}s of the time budget left")
            res = fn(args, out, fx, device, smoke, min(left, sizes["timeouts"][key]))
        except Exception as exc:  # noqa: BLE001 - one part failing must not cost the others
            traceback.print_exc()
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "markdown": f"FAILED: {type(exc).__name__}: {exc}\n"}
        res["seconds"] = time.time() - t0
        md = f"## ({key}) {title}: {'PASS' if res['ok'] else 'FAIL'} ({res['seconds']:.0f}s)\n\n{res['markdown']}"
        (out / f"part_{key}.md").write_text(md)
        (out / f"part_{key}.json").write_text(json.dumps(res, indent=1, default=str))
        report.append(md)
        (out / "acceptance.md").write_text("\n".join(report))
        summary["parts"][key] = {"ok": res["ok"], "seconds": res["seconds"]}
        print("\n" + md, flush=True)
    summary["seconds"] = time.time() - started
    (out / "acceptance.json").write_text(json.dumps(summary, indent=1))
    say(f"done in {summary['seconds']:.0f}s: " + ", ".join(
        f"({k}) {'PASS' if v['ok'] else 'FAIL'}" for k, v in summary["parts"].items()) + f"; results in {out}")
    return 0 if all(v["ok"] for v in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
