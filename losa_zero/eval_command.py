"""``losa-zero eval``: perplexity by the SparseGPT/Wanda protocol and, optionally, zero-shot
accuracy through lm-eval, for any model directory (ours or not)."""
from __future__ import annotations

from pathlib import Path

from .config import EvalConfig
from .data import load_eval_text, parse_source
from .evaluate import perplexity
from .modeling import load_model, resolve_dtype
from .outputs import write_json_atomic
from .runtime import Runtime, resolve_device


def run_eval(cfg: EvalConfig) -> dict:
    # every input checked before the model is loaded (the options themselves: EvalConfig.validate)
    if cfg.tasks:
        from .zeroshot import check_tasks

        check_tasks(cfg.tasks, cfg.tasks_data)
    texts = {spec: load_eval_text(spec) for spec in cfg.ppl}
    runtime = Runtime(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, runtime.device)
    model, tokenizer = load_model(cfg.model, dtype=dtype)
    model.to(runtime.device).eval()
    achieved, _ = runtime.sparsity_report(model)
    result: dict = {"model": str(cfg.model), "dtype": dtype, "sparsity": achieved, "perplexity": {}}
    print(f"model {cfg.model} ({dtype}): sparsity of the target linears {achieved:.4f}")
    for spec, text in texts.items():
        name = parse_source(spec)[1].name
        r = perplexity(model, tokenizer, text, runtime, seqlen=cfg.seqlen)
        result["perplexity"][name] = r
        print(f"perplexity {name}: {r['ppl']:.4f}  (seqlen {r['seqlen']}, {r['windows']} windows, {r['tokens']} tokens)")
    if cfg.tasks:
        from .zeroshot import evaluate_zeroshot, format_table

        zs = evaluate_zeroshot(model, tokenizer, cfg.tasks, data_dir=cfg.tasks_data, limit=cfg.limit,
                               batch_size=cfg.batch_size)
        result["zeroshot"] = zs
        print(format_table(zs))
    if cfg.json:
        write_json_atomic(Path(cfg.json), result)
    return result
