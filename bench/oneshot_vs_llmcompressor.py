"""One-shot pruning, losa-zero vs llm-compressor, side by side in one run.

Wanda and SparseGPT at 50% unstructured and 2:4, same model, same calibration tokens
(one tensor saved to the work directory and given to both), matched hyper-parameters:
ours (``losa_zero``: capture_inputs + sequential_prune, what ``losa-zero prune`` runs)
against llm-compressor's ``WandaPruningModifier`` / ``SparseGPTModifier`` through
``llmcompressor.oneshot``. Each tool runs in a process of its own (ours with this python,
llm-compressor with the python of its own virtualenv, created on first use), so wall time
and peak memory are per process. Both save their pruned state dict; quality is computed
here, by the same code for both: realised sparsity (and 2:4 validity), perplexity on the
held-out TinyStories text (stories260K), and layer reconstruction error on held-out token
windows (every model).

    LOSA_ZERO_DATA=../shared/data python bench/oneshot_vs_llmcompressor.py   # stories260k and 100m
    LOSA_ZERO_DATA=../shared/data python bench/oneshot_vs_llmcompressor.py --model 400m --methods wanda
    LOSA_ZERO_DATA=../shared/data python bench/oneshot_vs_llmcompressor.py --model 400m --methods sparsegpt
    ... --quick --no-record      # smoke run, tiny settings, nothing appended to BENCHMARKS.md

Each of these is sized to take under 10 minutes on the project's 2-core CPU machine when it
is otherwise idle (the 400m model in two invocations; the one-off virtualenv not counted).

Models: ``stories260k`` (the llama2.c fixture, converted), ``100m`` and ``400m`` (random
initialised LLaMA shapes of ``common.LLAMA_SHAPES``; calibration and held-out windows are
TinyStories text tokenized with the fixture's 512-piece tokenizer: real token statistics,
ids valid in the 32000 vocabulary).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO, append_benchmark, rss_bytes, emit_result, machine_header, make_random_llama, markdown_table,
    median, parse_result, peak_rss_bytes, reset_peak_rss, run_measured, save_state_dict, this_command,
)

TORCH_PIN = "2.13.0"
LLMC_PIN = "0.14.0.1"
DEFAULT_VENV = Path.home() / ".cache" / "losa-zero" / "llmc-venv"
LLMC_WORKER = Path(__file__).resolve().parent / "llmc_worker.py"
TOOLS = ("ours", "llmc")
TOOL_NAMES = {"ours": "losa-zero", "llmc": "llm-compressor"}
METHODS = ("wanda", "sparsegpt")
PATTERNS = ("50%", "2:4")

# Per model: calibration sequences x length, held-out windows for the reconstruction error,
# repeats (timings are medians over them). Sized so that one invocation with the default
# models stays within 10 minutes on the project's 2-core CPU machine; 400m needs two (one per
# method). stories260k gets 2 repeats: its ratios are large and its runs are mostly fixed costs.
SETTINGS = {
    "stories260k": dict(nsamples=32, seqlen=512, eval_windows=16, repeats=2),
    "100m": dict(nsamples=8, seqlen=256, eval_windows=8, repeats=3),
    "400m": dict(nsamples=8, seqlen=256, eval_windows=2, repeats=1),
}
QUICK = dict(nsamples=4, seqlen=64, eval_windows=2, repeats=1)
BATCH_SIZE = 8      # calibration sequences per forward, both tools (ours: --calib-batch-size default)
BLOCKSIZE = 128     # SparseGPT column block, both tools' default
PERCDAMP = 0.01     # SparseGPT dampening (fraction of mean diag H), both tools' default
MIB = 2 ** 20


# ---------------------------------------------------------------------------------------
# Our side of a run (a child process of this script, like llm-compressor's worker)
# ---------------------------------------------------------------------------------------
def ours_worker(job: dict) -> None:
    t_start = time.perf_counter()
    import torch

    from losa_zero.blockwise import capture_inputs, sequential_prune
    from losa_zero.modeling import load_model, target_names
    from losa_zero.pruners import SparsityTarget, get_pruner
    from losa_zero.runtime import Runtime
    # transformers imports model classes lazily, on first use: do it here for both tools, so
    # that "load" is reading the model, not importing code.
    for mod in ("configuration_llama", "modeling_llama"):
        importlib.import_module(f"transformers.models.llama.{mod}")

    t_import = time.perf_counter() - t_start
    t0 = time.perf_counter()
    model, _tok = load_model(job["model"])
    # Weights may be memory-mapped from the file and paged in on first use: read them all
    # now, so the pruning phase's memory growth is the algorithm's, not the weights'.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    t_load = time.perf_counter() - t0
    rss_loaded = rss_bytes()

    calib = torch.load(job["calib"])
    options = {"blocksize": job["blocksize"], "percdamp": job["percdamp"]} if job["method"] == "sparsegpt" else {}
    pruner = get_pruner(job["method"], **options)
    target = SparsityTarget.nm_pattern(2, 4) if job["pattern"] == "2:4" else SparsityTarget.unstructured(0.5)
    runtime = Runtime("cpu")

    peak_before = peak_rss_bytes()
    reset_peak_rss()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    # The "prune" phase of losa_zero.lifecycle.PruneRun, on the given calibration tensor.
    acts = capture_inputs(model, calib, runtime, job["batch_size"])
    sequential_prune(model, acts, pruner, lambda l: {name: target for name in target_names(model)}, runtime,
                     job["batch_size"])
    del acts
    t_prune = time.perf_counter() - t0
    peak_prune = peak_rss_bytes()

    t_save = save_state_dict(model, job["out"]) if job.get("out") else 0.0
    emit_result({
        "tool": "losa-zero", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "import_s": t_import, "load_s": t_load, "data_s": 0.0, "prune_s": t_prune, "save_s": t_save,
        "rss_loaded": rss_loaded, "rss_before_prune": rss_before, "peak_prune": peak_prune,
        "peak_total": max(peak_before, peak_prune), "calib_ok": True,
    })


# ---------------------------------------------------------------------------------------
# llm-compressor's virtualenv
# ---------------------------------------------------------------------------------------
def _venv_versions(py: Path) -> dict | None:
    code = ("import importlib.metadata as m, json, torch; "
            "print(json.dumps({'llmcompressor': m.version('llmcompressor'), 'torch': torch.__version__, "
            "'transformers': m.version('transformers'), 'cuda': torch.version.cuda}))")
    try:
        out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True, cwd="/",
                             env={**os.environ, "PYTHONPATH": ""}).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def ensure_venv(venv: Path) -> tuple[Path, dict]:
    """The python of llm-compressor's virtualenv, created (one-off, ~1 minute) if missing.

    torch is pinned to ours (2.13.0), so pip takes the same CPU wheel instead of resolving
    a CUDA build; llm-compressor brings its own transformers (it pins transformers<=5.17)."""
    py = venv / "bin" / "python"
    vers = _venv_versions(py) if py.exists() else None
    if vers is None:
        print(f"creating llm-compressor virtualenv in {venv} (one-off) ...", file=sys.stderr, flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", f"torch=={TORCH_PIN}",
                        f"llmcompressor=={LLMC_PIN}"],
                       check=True)
        vers = _venv_versions(py)
        if vers is None:
            raise SystemExit(f"llm-compressor virtualenv {venv} is broken: remove it and run again")
    if vers.get("llmcompressor") != LLMC_PIN:
        print(f"note: {venv} has llmcompressor {vers.get('llmcompressor')}, this script was written for {LLMC_PIN}",
              file=sys.stderr)
    if vers.get("cuda"):
        print(f"note: {venv} has a CUDA torch ({vers['torch']}); the run is on CPU anyway", file=sys.stderr)
    return py, vers


# ---------------------------------------------------------------------------------------
# Quality, computed here for both tools from their saved state dicts
# ---------------------------------------------------------------------------------------
class Evaluator:
    """Dense reference of one model: every decoder layer's input and output on held-out
    windows, plus the dense perplexity where the model is a trained one."""

    def __init__(self, model_dir: Path, heldout, ppl_text: str | None, batch_size: int):
        import torch

        from losa_zero.blockwise import capture_inputs, forward_block
        from losa_zero.evaluate import perplexity
        from losa_zero.modeling import decoder_layers, load_model
        from losa_zero.runtime import Runtime

        self.torch = torch
        self.forward_block = forward_block
        self.batch_size = batch_size
        self.model, self.tok = load_model(model_dir)
        self.layers = decoder_layers(self.model)
        self.ppl_text = ppl_text
        self.dense_ppl = perplexity(self.model, self.tok, ppl_text, seqlen=512)["ppl"] if ppl_text else None
        acts = capture_inputs(self.model, heldout, Runtime("cpu"), batch_size)
        self.layer_kwargs = acts.layer_kwargs
        self.inputs, self.outputs = [], []
        for l, layer in enumerate(self.layers):
            self.inputs.append(acts.hidden)
            acts.hidden = forward_block(layer, acts, batch_size, torch.device("cpu"), layer=l)
            self.outputs.append(acts.hidden)
        self.dense_state = {k: v.detach() for k, v in self.model.state_dict().items()}

    def _block_out(self, block, hidden, layer: int):
        from losa_zero.blockwise import Activations

        acts = Activations(hidden, self.layer_kwargs)
        return self.forward_block(block, acts, self.batch_size, self.torch.device("cpu"), layer=layer)

    @staticmethod
    def _rel(a, b) -> float:
        return float((a - b).double().square().sum() / b.double().square().sum())

    def evaluate(self, state_path: Path, pattern: str) -> dict:
        torch = self.torch
        from losa_zero.evaluate import perplexity
        from losa_zero.modeling import linear_full_names
        from losa_zero.pruners import satisfies_nm

        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
        target_keys = {f"{n}.weight" for n in linear_full_names(self.model)}
        missing = sorted(set(self.dense_state) - set(state))
        if missing:
            raise RuntimeError(f"{state_path}: pruned state dict lacks {missing[:5]}")
        # Everything outside the target linears of each decoder layer must be untouched.
        changed = [k for k, v in self.dense_state.items() if k not in target_keys and not torch.equal(v, state[k])]
        zeros = total = 0
        nm_ok = True
        for k in sorted(target_keys):
            w = state[k]
            zeros += int((w == 0).sum())
            total += w.numel()
            if pattern == "2:4":
                nm_ok &= satisfies_nm(w != 0, 2, 4)
        # Layer reconstruction error: each pruned layer on the dense model's inputs to it
        # (local), and the pruned stack end to end (final hidden state), both relative to
        # the dense outputs, on held-out windows.
        local = []
        hidden = self.inputs[0]
        for l, layer in enumerate(self.layers):
            block = copy.deepcopy(layer)
            prefix = f"model.layers.{l}."
            block.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            local.append(self._rel(self._block_out(block, self.inputs[l], l), self.outputs[l]))
            hidden = self._block_out(block, hidden, l)
            del block
        out = {"sparsity": zeros / total, "nm_ok": nm_ok if pattern == "2:4" else None, "changed_other": changed,
               "layer_err": sum(local) / len(local), "final_err": self._rel(hidden, self.outputs[-1]),
               "ppl": None}
        if self.ppl_text:
            pruned = copy.deepcopy(self.model)
            pruned.load_state_dict({k: state[k] for k in self.dense_state})
            out["ppl"] = perplexity(pruned, self.tok, self.ppl_text, seqlen=512)["ppl"]
            del pruned
        return out

    def mask_agreement(self, path_a: Path, path_b: Path) -> float:
        """Fraction of the pruned linears' entries on which both tools' masks agree."""
        torch = self.torch
        a = torch.load(path_a, map_location="cpu", weights_only=True, mmap=True)
        b = torch.load(path_b, map_location="cpu", weights_only=True, mmap=True)
        from losa_zero.modeling import linear_full_names

        same = total = 0
        for name in linear_full_names(self.model):
            k = f"{name}.weight"
            same += int(((a[k] == 0) == (b[k] == 0)).sum())
            total += a[k].numel()
        return same / total


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------
def run_worker(tool: str, job: dict, llmc_python: Path, threads: int | None) -> dict:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if tool == "ours":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    else:
        # An empty PYTHONPATH keeps our environment's packages out of the other virtualenv.
        cmd = [str(llmc_python), str(LLMC_WORKER), json.dumps(job)]
        env["PYTHONPATH"] = ""
    r = run_measured(cmd, env=env, cwd=REPO, timeout=1800)
    res = parse_result(r["stdout"])
    for marker in ("Failed to invert hessian", "Hessian needed dampening"):
        if marker in r["stderr"]:
            FALLBACKS.add(f"{TOOL_NAMES[tool]} {job['method']} {job['pattern']} on {Path(job['model']).name}")
    res["wall_s"] = r["wall_s"]
    if not res.get("calib_ok", False):
        raise RuntimeError(f"{TOOL_NAMES[tool]} did not see exactly the calibration tokens given to it")
    return res


def prepare_data(work: Path, data_dir: str | None):
    from losa_zero.convert_llama2c import convert_llama2c
    from losa_zero.demo import EVAL_CHARS, fixture_paths

    paths = fixture_paths(data_dir)
    text = paths["tinystories"].read_text(encoding="utf-8")
    (work / "eval.txt").write_text(text[:EVAL_CHARS], encoding="utf-8")
    (work / "train.txt").write_text(text[EVAL_CHARS:], encoding="utf-8")
    dense = work / "models" / "stories260k"
    if not (dense / "config.json").exists():
        convert_llama2c(paths["checkpoint"], paths["tokenizer"], dense, overwrite=True)
    return dense, text[:EVAL_CHARS]


def heldout_windows(tok, text: str, n: int, seqlen: int):
    """The first ``n`` non-overlapping windows of ``seqlen`` tokens of the held-out text."""
    import torch

    ids = [tok.bos_token_id] + list(tok(text, add_special_tokens=False)["input_ids"])
    if len(ids) < n * seqlen:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {n} x {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


def ratio(a, b) -> float | str:
    if a is None or b is None or b == 0:
        return "—"
    return a / b


def fmt_err(x) -> str:
    return "—" if x is None else f"{x:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="stories260k, 100m and/or 400m (repeat or comma-separate; default stories260k,100m)")
    ap.add_argument("--methods", default=",".join(METHODS), help="wanda,sparsegpt (default both)")
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="50%%,2:4 (default both)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per tool and setting (default: per model)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default: per model)")
    ap.add_argument("--seqlen", type=int, default=None, help="calibration sequence length (default: per model)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both tools' processes (default: inherit, i.e. torch's default)")
    ap.add_argument("--workdir", default="runs/bench/oneshot_vs_llmcompressor")
    ap.add_argument("--venv", default=str(DEFAULT_VENV), help="llm-compressor's virtualenv (created if missing)")
    ap.add_argument("--data", default=None, help="shared data folder (default $LOSA_ZERO_DATA)")
    ap.add_argument("--quick", action="store_true", help="tiny settings, one repeat: a smoke run")
    ap.add_argument("--no-record", action="store_true", help="do not append the result to BENCHMARKS.md")
    ap.add_argument("--keep-models", action="store_true", help="keep the pruned state dicts in the work directory")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        ours_worker(json.loads(args.worker))
        return

    models = [m.strip() for spec in (args.model or ["stories260k,100m"]) for m in spec.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for name, given, valid in (("--model", models, SETTINGS), ("--methods", methods, METHODS),
                               ("--patterns", patterns, PATTERNS)):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            ap.error(f"{name}: unknown {bad or given}; choose from {', '.join(valid)}")

    t_begin = time.perf_counter()
    llmc_python, venv_vers = ensure_venv(Path(args.venv).expanduser())
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from losa_zero.data import calibration_windows
    from losa_zero.modeling import load_tokenizer

    fixture_dir, eval_text = prepare_data(work, args.data)
    tok = load_tokenizer(fixture_dir)

    perf_rows, quality_rows, notes_data = [], [], []
    threads_seen = set()
    for model_name in models:
        s = dict(SETTINGS[model_name])
        if args.quick:
            s.update(QUICK)
        for key in ("repeats", "nsamples", "seqlen"):
            if getattr(args, key):
                s[key] = getattr(args, key)
        t0 = time.perf_counter()
        if model_name == "stories260k":
            model_dir = fixture_dir
        else:
            model_dir = make_random_llama(work / "models" / model_name, model_name, seed=0,
                                          tokenizer_from=str(fixture_dir))
        t_create = time.perf_counter() - t0
        calib = calibration_windows(tok, str(work / "train.txt"), s["nsamples"], s["seqlen"], seed=0)
        calib_path = work / f"calib_{model_name}.pt"
        torch.save(calib, calib_path)
        eval_seqlen = 512 if model_name == "stories260k" else s["seqlen"]
        heldout = heldout_windows(tok, eval_text, s["eval_windows"], eval_seqlen)
        print(f"[{time.perf_counter() - t_begin:5.0f}s {model_name}] model ready in {t_create:.1f}s; calibration "
              f"{s['nsamples']} x {s['seqlen']} tokens, {s['repeats']} repeat(s)", file=sys.stderr, flush=True)
        evaluator = Evaluator(model_dir, heldout, eval_text if model_name == "stories260k" else None, BATCH_SIZE)

        for method in methods:
            for pattern in patterns:
                label = f"{model_name} {method} {pattern}"
                runs = {tool: [] for tool in TOOLS}
                saved = {}
                for r in range(s["repeats"]):
                    # Alternate which tool goes first, so slow drift on a shared machine
                    # does not always favour the same one.
                    for tool in (TOOLS if r % 2 == 0 else TOOLS[::-1]):
                        job = {"model": str(model_dir), "calib": str(calib_path), "method": method, "pattern": pattern,
                               "batch_size": BATCH_SIZE, "blocksize": BLOCKSIZE, "percdamp": PERCDAMP}
                        if r == 0:
                            tag = pattern.replace(":", "-").replace("%", "")
                            saved[tool] = work / f"pruned_{model_name}_{method}_{tag}_{tool}.pt"
                            job["out"] = str(saved[tool])
                        res = run_worker(tool, job, llmc_python, args.threads)
                        threads_seen.add((TOOL_NAMES[tool], res["threads"]))
                        runs[tool].append(res)
                        print(f"[{time.perf_counter() - t_begin:5.0f}s {label}] {TOOL_NAMES[tool]:>14} repeat {r + 1}: "
                              f"prune {res['prune_s']:.2f}s, load {res['load_s']:.2f}s, process {res['wall_s']:.1f}s, "
                              f"peak RSS {res['peak_total'] / MIB:.0f} MiB", file=sys.stderr, flush=True)
                q = {tool: evaluator.evaluate(saved[tool], pattern) for tool in TOOLS}
                agree = evaluator.mask_agreement(saved["ours"], saved["llmc"])
                if not args.keep_models:
                    for p in saved.values():
                        p.unlink(missing_ok=True)
                for tool in TOOLS:
                    if q[tool]["changed_other"]:
                        raise RuntimeError(f"{TOOL_NAMES[tool]} changed weights outside the 7 linears: "
                                           f"{q[tool]['changed_other'][:5]}")

                def med(tool, key):
                    return median(x[key] for x in runs[tool])

                po, pl = med("ours", "prune_s"), med("llmc", "prune_s")
                mo, ml = med("ours", "peak_total") / MIB, med("llmc", "peak_total") / MIB
                go, gl = (median((x["peak_prune"] - x["rss_before_prune"]) / MIB for x in runs[t]) for t in TOOLS)
                perf_rows.append([model_name, method, pattern, po, pl, ratio(po, pl),
                                  med("ours", "load_s"), med("llmc", "load_s"),
                                  med("ours", "wall_s"), med("llmc", "wall_s"),
                                  mo, ml, ratio(mo, ml), go, gl])
                nm = ""
                if pattern == "2:4":
                    nm = " / ".join("valid" if q[t]["nm_ok"] else "INVALID" for t in TOOLS)
                quality_rows.append([
                    model_name, method, pattern,
                    f"{q['ours']['sparsity']:.6f}", f"{q['llmc']['sparsity']:.6f}", nm or "—",
                    fmt_err(q["ours"]["ppl"]), fmt_err(q["llmc"]["ppl"]),
                    "—" if q["ours"]["ppl"] is None else f"{q['ours']['ppl'] / q['llmc']['ppl']:.4f}",
                    fmt_err(q["ours"]["layer_err"]), fmt_err(q["llmc"]["layer_err"]),
                    f"{q['ours']['layer_err'] / q['llmc']['layer_err']:.4f}",
                    fmt_err(q["ours"]["final_err"]), fmt_err(q["llmc"]["final_err"]),
                    f"{agree:.6f}"])
                notes_data.append((model_name, method, pattern, po, pl, mo, ml))
        if evaluator.dense_ppl is not None:
            print(f"[{model_name}] dense perplexity {evaluator.dense_ppl:.4f}", file=sys.stderr)
            s["dense_ppl"] = evaluator.dense_ppl
        SETTINGS_USED[model_name] = s
        del evaluator

    body = build_body(perf_rows, quality_rows, notes_data, threads_seen, venv_vers)
    total = time.perf_counter() - t_begin
    print(f"\n{body}\n\n(whole run {total:.0f}s)")
    if not args.no_record:
        extra = {"llmcompressor": venv_vers.get("llmcompressor", "?"),
                 "llm-compressor's transformers": venv_vers.get("transformers", "?")}
        append_benchmark("One-shot pruning: losa-zero vs llm-compressor", this_command(),
                         machine_header(extra_versions=extra), body)


SETTINGS_USED: dict[str, dict] = {}
FALLBACKS: set[str] = set()  # Cholesky fallbacks seen in a worker's log


def build_body(perf_rows, quality_rows, notes_data, threads_seen, venv_vers) -> str:
    perf = markdown_table(
        ["model", "method", "pattern", "prune s ours", "prune s llm-c", "ratio", "load s ours", "load s llm-c",
         "process s ours", "process s llm-c", "peak RSS MiB ours", "peak RSS MiB llm-c", "ratio",
         "prune-phase RSS growth MiB ours", "llm-c"], perf_rows)
    qual = markdown_table(
        ["model", "method", "pattern", "sparsity ours", "sparsity llm-c", "2:4 valid (ours / llm-c)",
         "ppl ours", "ppl llm-c", "ppl ratio", "layer err ours", "layer err llm-c", "ratio",
         "final hidden err ours", "llm-c", "mask agreement"], quality_rows)
    settings = "; ".join(
        f"{m}: calibration {s['nsamples']} x {s['seqlen']} tokens, held-out {s['eval_windows']} windows x "
        f"{512 if m == 'stories260k' else s['seqlen']}, median of {s['repeats']}"
        + (f", dense perplexity {s['dense_ppl']:.4f}" if "dense_ppl" in s else "")
        for m, s in SETTINGS_USED.items())
    threads = ", ".join(f"{t} {n}" for t, n in sorted(threads_seen))
    per_setting = []
    for model_name, method, pattern, po, pl, mo, ml in notes_data:
        speed = f"{pl / po:.2f}x faster" if po <= pl else f"{po / pl:.2f}x slower"
        mem = f"{(ml - mo):.0f} MiB less" if mo <= ml else f"{(mo - ml):.0f} MiB more"
        per_setting.append(f"{model_name} {method} {pattern}: ours {speed}, {mem} peak memory")
    fallbacks = "; ".join(sorted(FALLBACKS)) or "none"
    notes = f"""Ratios are ours / llm-compressor (below 1: ours faster, smaller, or closer to the dense model).
{settings}. Torch threads per process: {threads}. llm-compressor {venv_vers.get('llmcompressor', '?')} with
transformers {venv_vers.get('transformers', '?')} in its own virtualenv (same torch {venv_vers.get('torch', '?')}, CPU).
Per setting: {'; '.join(per_setting)}.

- *prune s*: the pruning call alone, in the process doing it (ours: `capture_inputs` +
  `sequential_prune`, the prune phase of `losa-zero prune`; llm-compressor: the `oneshot(...)`
  call, which also builds its dataloader and traces the model into per-layer subgraphs with
  torch.fx). *load s*: model + tokenizer from disk (transformers' model code imported
  beforehand in both). *process s*: the whole child process (interpreter start, imports, load,
  prune, and on the first repeat saving the state dict for evaluation).
- *peak RSS*: peak resident memory (VmHWM) of that process up to the end of pruning; it
  includes the interpreter and imported libraries (llm-compressor imports more) and the model.
  *prune-phase RSS growth*: peak during the pruning call minus RSS when it started (peak reset
  through /proc/self/clear_refs; weights paged in before), the algorithm's working memory.
- Quality is computed by this script for both tools from the saved state dicts, by the same
  code: *sparsity* = exact zeros over the 7 linears of every decoder layer; *layer err* = mean
  over decoder layers of ||pruned layer(x) - dense layer(x)||² / ||dense layer(x)||², x the
  dense model's inputs to that layer on held-out windows; *final hidden err* = the same for the
  whole pruned stack end to end (last decoder layer's output); *ppl* = held-out TinyStories
  perplexity (first 200,000 characters, seqlen 512; stories260K only: random models have no
  meaningful perplexity); *mask agreement* = fraction of the linears' entries both tools prune
  or both keep. Weights outside those linears (embeddings, norms, lm_head) are checked to be
  bit-identical to the dense model's.
- Aligned: the same calibration tensor (checked: llm-compressor's embedding saw exactly these
  sequences; its sampler orders them by length, ties in any order), targets = the 7 linears of
  each decoder layer (lm_head excluded: llm-compressor's default target `Linear` includes it),
  one decoder layer at a time, each calibrated on the outputs of the already pruned layers
  before it (their sequential pipeline with `propagate_error=True`), all 7 linears of a layer
  measured in one forward of the unpruned layer, {BATCH_SIZE} sequences per forward (their default
  is 1), SparseGPT block size {BLOCKSIZE} and dampening {PERCDAMP} x mean diagonal of H, fp32 statistics.
- Remaining differences (not settable): llm-compressor forces eager attention while calibrating
  (ours: SDPA; same math, different rounding and speed) and traces the model once per call.
  Wanda 50%: ours prunes round(50% x numel) per linear spread over the rows, theirs
  int(50% x width) per row: the same count on even widths. SparseGPT 50%: in every block of 128
  columns theirs prunes each weight whose saliency is <= the k-th smallest (0-based), k =
  int(50% x the block's entries): one more than the target per block (realised sparsity
  slightly above 50%); ours prunes exactly round(50% x numel) over the blocks. Their Hessian is
  a running mean over sequences, ours a sum divided once: equal up to rounding; with the
  attention rounding above this flips near-ties, so masks differ slightly (SparseGPT's more:
  its later columns depend on the updates of earlier ones).
  When a Cholesky factorisation fails theirs falls back to the identity as inverse Hessian, ours
  retries with 10x dampening. Fallbacks in this run: {fallbacks}.
"""
    return f"{perf}\n\n{qual}\n\n{notes}"


if __name__ == "__main__":
    main()
