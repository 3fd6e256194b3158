"""``losa-zero eval``: perplexity by the SparseGPT/Wanda protocol and, optionally, zero-shot
accuracy through lm-eval, for any model directory (ours or not)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .data import load_eval_text, parse_source
from .errors import LosaZeroError
from .evaluate import perplexity
from .modeling import load_model
from .outputs import write_json_atomic


def run_eval(args: argparse.Namespace) -> dict:
    from .pipeline import DTYPES, resolve_device, sparsity_report
    from .runtime import Runtime

    specs = [s for s in args.ppl.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    if not specs and not tasks:
        raise LosaZeroError("nothing to evaluate: give --ppl FILE[,FILE...] and/or --tasks NAME[,NAME...]")
    texts = {spec: load_eval_text(spec) for spec in specs}  # fail on bad paths before loading the model
    runtime = Runtime(resolve_device(args.device))
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    model.to(runtime.device).eval()
    achieved, _ = sparsity_report(model, runtime)
    result: dict = {"model": str(args.model), "sparsity": achieved, "perplexity": {}}
    print(f"model {args.model}: sparsity of the target linears {achieved:.4f}")
    for spec, text in texts.items():
        name = parse_source(spec)[1].name
        r = perplexity(model, tokenizer, text, seqlen=args.seqlen)
        result["perplexity"][name] = r
        print(f"perplexity {name}: {r['ppl']:.4f}  (seqlen {r['seqlen']}, {r['windows']} windows, {r['tokens']} tokens)")
    if tasks:
        from .zeroshot import evaluate_zeroshot, format_table

        zs = evaluate_zeroshot(model, tokenizer, tasks, data_dir=args.tasks_data, limit=args.limit,
                               batch_size=args.batch_size)
        result["zeroshot"] = zs
        print(format_table(zs))
    if args.json:
        write_json_atomic(Path(args.json), result)
    return result
