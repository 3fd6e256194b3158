"""llm-compressor side of ``bench/oneshot_vs_llmcompressor.py``: one one-shot pruning run.

Runs under the python of llm-compressor's own virtualenv (it pins another transformers),
so it imports nothing from losa_zero; ``common`` is stdlib-only at import time. Usage:

    LLMC_VENV/bin/python bench/llmc_worker.py '{"model": DIR, "calib": FILE.pt, ...}'

Keys: ``model`` (HF directory), ``calib`` (LongTensor [n, seqlen] saved with torch.save),
``method`` ("wanda" or "sparsegpt"), ``pattern`` ("50%" or "2:4"), ``batch_size``,
``blocksize``, ``percdamp``, ``out`` (optional: torch.save the pruned state dict there).
Prints one ``BENCH_RESULT`` line: seconds per phase and memory (see ``ours_worker`` in the
driver, which reports the same fields).
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, peak_rss_bytes, reset_peak_rss, rss_bytes, save_state_dict  # noqa: E402

# The seven linears of every decoder layer, as ours prunes them; lm_head and the
# embeddings are left alone (llm-compressor's default target "Linear" would include lm_head).
TARGETS = [r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.(gate|up|down)_proj$"]


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    import llmcompressor
    # transformers imports model classes lazily, on first use: do it here for both tools, so
    # that "load" is reading the model, not importing code.
    for mod in ("configuration_llama", "modeling_llama"):
        importlib.import_module(f"transformers.models.llama.{mod}")

    t_import = time.perf_counter() - T_START
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    # Weights may be memory-mapped from the file and paged in on first use: read them all
    # now, so the pruning phase's memory growth is the algorithm's, not the weights'.
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    tokenizer = AutoTokenizer.from_pretrained(job["model"])  # oneshot would load it otherwise
    t_load = time.perf_counter() - t0
    rss_loaded = rss_bytes()

    calib = torch.load(job["calib"])
    t0 = time.perf_counter()
    # A tokenized datasets.Dataset: llm-compressor takes the input_ids as they are (no
    # re-tokenisation) and all of them (shuffle off; its sampler orders them by length).
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t_data = time.perf_counter() - t0

    # llm-compressor's mask_structure "N:M" prunes N of every M ("2:4" = ours keep 2 of 4);
    # "0:0" is unstructured. Dampening and block size as ours (their defaults are the same).
    mask = "2:4" if job["pattern"] == "2:4" else "0:0"
    if job["method"] == "wanda":
        modifier = WandaPruningModifier(sparsity=0.5, mask_structure=mask, targets=TARGETS)
    elif job["method"] == "sparsegpt":
        modifier = SparseGPTModifier(sparsity=0.5, mask_structure=mask, targets=TARGETS, block_size=job["blocksize"],
                                     dampening_frac=job["percdamp"])
    else:
        raise SystemExit(f"unknown method {job['method']!r}")

    # Check afterwards that exactly our calibration tokens reached the model (its tracing
    # pass runs on meta tensors: those are skipped).
    seen: list[torch.Tensor] = []

    def record(_module, args):
        if args[0].device.type != "meta":
            seen.append(args[0].detach().cpu().clone())

    handle = model.get_input_embeddings().register_forward_pre_hook(record)

    peak_before = peak_rss_bytes()
    reset_peak_rss()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    # The sequential pipeline (one decoder layer per subgraph, pruned outputs propagated:
    # propagate_error=True) is what both modifiers infer; named here so it cannot change.
    oneshot(model=model, processor=tokenizer, dataset=ds, recipe=[modifier], num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, batch_size=job["batch_size"],
            pipeline="sequential", propagate_error=True)
    t_prune = time.perf_counter() - t0
    peak_prune = peak_rss_bytes()
    handle.remove()

    ids = torch.cat(seen, 0) if seen else torch.empty(0, calib.shape[1], dtype=torch.long)
    # Its sampler orders sequences by length (ties in any order): compare as multisets.
    n = calib.shape[0]
    calib_ok = bool(ids.shape[0] >= n and sorted(map(tuple, ids[:n].tolist())) == sorted(map(tuple, calib.tolist())))

    t_save = save_state_dict(model, job["out"]) if job.get("out") else 0.0
    emit_result({
        "tool": "llm-compressor", "version": llmcompressor.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "import_s": t_import, "load_s": t_load, "data_s": t_data,
        "prune_s": t_prune, "save_s": t_save, "rss_loaded": rss_loaded, "rss_before_prune": rss_before,
        "peak_prune": peak_prune, "peak_total": max(peak_before, peak_prune), "calib_ok": calib_ok,
    })


if __name__ == "__main__":
    main()
