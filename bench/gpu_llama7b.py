"""GPU benchmark on a LLaMA-2-7B-shaped random model in bf16 (issue 6, part 4).

Measures, in one run on one GPU:
1. seconds per decoder block for calibration + Wanda and + SparseGPT (our block loop,
   128 x 2048 calibration tokens as the released recipe), on the first ``--blocks`` blocks;
2. sparse-LoRA fine-tuning throughput (tokens/s), peak GPU memory and model FLOPs
   utilisation, with LoSA's adapters (all 7 linears, rank ``--rank`` of max 16, 70% masks,
   paged 8-bit AdamW, activation checkpointing);
3. the projected end-to-end time of the published 7B recipe (T = 5 steps, 10K samples of at
   most 1,024 tokens) from those measurements, against the paper's 45 minutes of
   fine-tuning on one A100 80GB (docs/method.md section 8);
4. prefill and decode speed of a 2:4 model with PyTorch's semi-structured sparse kernels
   (``torch.sparse.to_sparse_semi_structured``) against the same model dense.

A random model is enough: the time and memory of every step depend on shapes, not values.
Run it on the device machine with one command (about 5 minutes on an H100):

    python bench/gpu_llama7b.py

``--shape tiny --device cpu --dtype float32`` runs parts 1-3 on a small model on the CPU (the
test suite does this so the script cannot rot); part 4 needs CUDA.

Each part runs in its own try block and prints its table as soon as it ends, so a failure
(or the device time running out) in one part keeps the others' numbers; ``--json FILE``
keeps every finished part's numbers (rewritten after each part), which
``bench/gpu_acceptance.py`` reads.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from common import append_benchmark, machine_header, markdown_table, this_command  # noqa: E402

from losa_zero.blockwise import capture_inputs, forward_block, sequential_prune  # noqa: E402
from losa_zero.finetune import LocalTrainer  # noqa: E402
from losa_zero.losa import attach_sparse_lora, enable_activation_checkpointing  # noqa: E402
from losa_zero.lora import SparseLoRALinear  # noqa: E402
from losa_zero.modeling import decoder_layers, layer_linears, target_names  # noqa: E402
from losa_zero.optimizers import choose_optimizer  # noqa: E402
from losa_zero.pruners import SparsityTarget, get_pruner, nm_keep  # noqa: E402
from losa_zero.runtime import Runtime  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4),
}
VOCAB = 32000
# Dense bf16 tensor-core peaks (vendor datasheets), for model FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}
# The published 7B recipe (docs/method.md sections 5 and 6) and its reported fine-tuning time.
RECIPE_STEPS, RECIPE_SAMPLES, RECIPE_MAX_LEN, PAPER_MINUTES = 5, 10_000, 1024, 45.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A random LLaMA of ``shape`` built directly on ``device`` in ``dtype`` (no fp32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                      **SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def linear_params(model: nn.Module) -> int:
    """Parameters that take part in matrix products per token: every decoder linear + LM head."""
    n = sum(lin.in_features * lin.out_features for layer in decoder_layers(model)
            for lin in layer_linears(layer).values())
    return n + model.config.hidden_size * model.config.vocab_size


def model_flops_per_token(model: nn.Module, seqlen: int) -> float:
    """Forward + input-gradient FLOPs per trained token (frozen base: no weight gradients;
    recomputation by activation checkpointing is not counted, as in the usual MFU)."""
    c = model.config
    forward = 2 * linear_params(model) + 4 * c.num_hidden_layers * seqlen * c.hidden_size  # + QK^T and AV
    return 2 * forward


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


# -- part 1: calibration + pruning, seconds per block ----------------------------------------
def time_pruning(model: nn.Module, args, device: torch.device) -> dict:
    runtime = Runtime(device)
    layers = decoder_layers(model)
    kept = nn.ModuleList(list(layers)[:args.blocks])
    model.model.layers = kept  # the block loop runs over these only; restored below
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, VOCAB, (args.nsamples, args.seqlen), generator=gen)
    out = {}
    try:
        for name in ("wanda", "sparsegpt"):
            pruner = get_pruner(name, rounding="nearest")
            sync(device)
            t0 = time.perf_counter()
            acts = capture_inputs(model, calib, runtime, args.calib_batch_size)
            sync(device)
            capture_s = time.perf_counter() - t0
            fwd = []
            for l, block in enumerate(kept):  # calibration forward alone: what dense targets / CKA cost per block
                sync(device)
                t1 = time.perf_counter()
                forward_block(block, acts, args.calib_batch_size, device, layer=l)
                sync(device)
                fwd.append(time.perf_counter() - t1)
            ends = []

            def after(l, block, hidden):
                sync(device)
                ends.append(time.perf_counter())

            sync(device)
            start = time.perf_counter()
            sequential_prune(model, acts, pruner, lambda l: {n: SparsityTarget.unstructured(0.5) for n in target_names(model)},
                             runtime, args.calib_batch_size, after_block=after, desc=name)
            per_block = [b - a for a, b in zip([start] + ends[:-1], ends)]
            out[name] = {"capture_s": capture_s, "forward_block_s": statistics.median(fwd),
                         "prune_block_s": statistics.median(per_block)}
            del acts
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        model.model.layers = layers
    return out


# -- part 2: sparse-LoRA fine-tuning throughput ------------------------------------------------
def time_finetune(model: nn.Module, args, device: torch.device) -> dict:
    attach_sparse_lora(model, max_rank=16, scale=2.0, dropout=args.lora_dropout, seed=0)
    gen = torch.Generator(device=device).manual_seed(0)
    for m in model.modules():
        if isinstance(m, SparseLoRALinear):
            m.set_rank(args.rank)
            m.set_keep_mask(torch.rand(m.out_features, m.in_features, generator=gen, device=device) >= 0.7)
            with torch.no_grad():
                m.lora_B.normal_(0, 0.01)  # a non-zero update, so nothing is skipped
    enable_activation_checkpointing(model)  # what --gradient-checkpointing does
    model.config.use_cache = False
    # the run's own choice: the requested optimizer, or AdamW where bitsandbytes cannot step here
    optimizer = choose_optimizer(args.optimizer, device.type).used
    trainer = LocalTrainer(model, args.optimizer, 2e-4, 0.001, 0.3)
    trainer.begin()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, VOCAB, (args.ft_batch, args.ft_seqlen), device=device)
    inputs = {"input_ids": ids, "labels": ids}
    times = []
    for step in range(args.ft_warmup + args.ft_steps):
        sync(device)
        t0 = time.perf_counter()
        loss = trainer.forward(inputs, num_items=ids.numel())
        loss = loss.loss if hasattr(loss, "loss") else loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"fine-tuning loss is {loss.item()} at step {step}")
        trainer.backward(loss, boundary=True)
        trainer.step(2e-4)
        sync(device)
        if step >= args.ft_warmup:
            times.append(time.perf_counter() - t0)
    trainer.end()
    step_s = statistics.median(times)
    tokens_per_s = ids.numel() / step_s
    peak = peak_tflops(device, args.peak_tflops)
    flops = model_flops_per_token(model, args.ft_seqlen)
    return {"optimizer": optimizer, "step_s": step_s, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops / (peak * 1e12) if peak else None, "peak_tflops": peak,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


# -- part 4: 2:4 semi-structured kernels -------------------------------------------------------
@torch.no_grad()
def prune_2_4(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        for lin in layer_linears(layer).values():
            lin.weight.mul_(nm_keep(lin.weight.float().abs(), 2, 4).to(lin.weight.dtype))


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> None:
    from torch.sparse import to_sparse_semi_structured

    for layer in decoder_layers(model):
        for lin in layer_linears(layer).values():
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)


@torch.no_grad()
def time_inference(model: nn.Module, args, device: torch.device) -> dict:
    def median_time(fn, repeats: int) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    out = {}
    for batch, length in ((1, args.prefill_len), (args.decode_batch, args.prefill_len // 4)):
        ids = torch.randint(0, VOCAB, (batch, length), device=device)
        s = median_time(lambda: model(input_ids=ids, use_cache=False), args.repeats)
        out[f"prefill {batch}x{length} tokens/s"] = batch * length / s
    for batch in (1, args.decode_batch):
        ids = torch.randint(0, VOCAB, (batch, 128), device=device)
        n = args.decode_tokens
        s = median_time(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0), max(1, args.repeats // 2))
        out[f"decode batch {batch} tokens/s"] = batch * n / s
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--blocks", type=int, default=4, help="decoder blocks timed for calibration + pruning")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lora-dropout", type=float, default=0.1, help="released: 0.1")
    ap.add_argument("--optimizer", default="paged_adamw_8bit", choices=["paged_adamw_8bit", "adamw_8bit", "adamw"])
    ap.add_argument("--ft-batch", type=int, default=8, help="released effective batch for 7B: 8")
    ap.add_argument("--ft-seqlen", type=int, default=1024, help="released max length: 1024")
    ap.add_argument("--ft-steps", type=int, default=5)
    ap.add_argument("--ft-warmup", type=int, default=2)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-inference", action="store_true", help="leave out part 4 (2:4 kernels)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: by name)")
    ap.add_argument("--json", default=None, help="also write every finished part's numbers here (after each part)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    return ap.parse_args(argv)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prune_table(prune: dict, args) -> str:
    return markdown_table(
        ["pruner", "capture s", "calibration forward s/block", "calibration + prune s/block"],
        [[n, p["capture_s"], p["forward_block_s"], p["prune_block_s"]] for n, p in prune.items()]) + (
        f"\n\n{args.nsamples} x {args.seqlen} calibration tokens, batch {args.calib_batch_size}, medians over "
        f"{args.blocks} blocks; 50% unstructured.\n")


def finetune_table(ft: dict, args) -> str:
    mfu = f"{ft['mfu']:.3f}" if ft["mfu"] is not None else "n/a (unknown peak)"
    peak = f"{ft['peak_gpu_gib']:.1f}" if ft["peak_gpu_gib"] is not None else "n/a"
    return markdown_table(
        ["fine-tuning", "tokens/s", "s/step", "MFU", "peak GPU GiB"],
        [[f"sparse LoRA r{args.rank}/16, 70% masks, batch {args.ft_batch}x{args.ft_seqlen}, {ft['optimizer']}, "
          f"dropout {args.lora_dropout}", ft["tokens_per_s"], ft["step_s"], mfu, peak]]) + (
        "\n\nMFU counts forward + input-gradient FLOPs of the frozen model, 2 x (2 x linear parameters "
        "+ 4 x layers x seqlen x hidden) per token, against the device's dense bf16 peak "
        f"({ft['peak_tflops'] or 'unknown'} TFLOP/s); median of {args.ft_steps} steps after "
        f"{args.ft_warmup} warm-up steps. The masked LoRA products are extra work, not counted.\n")


def projection_table(prune: dict, ft: dict, n_layers: int) -> tuple[dict, str]:
    """The published recipe's time from the measured pieces (docs/method.md section 5): dense
    targets once (one calibration forward per block), then per step CKA on the dense model's
    128 sequences (forward per block) and one pruning pass, then fine-tuning."""
    fwd = prune["wanda"]["forward_block_s"]
    finetune_s = RECIPE_SAMPLES * RECIPE_MAX_LEN / ft["tokens_per_s"]
    projection = {}
    for name in ("wanda", "sparsegpt"):
        prep = n_layers * fwd + RECIPE_STEPS * n_layers * (fwd + prune[name]["prune_block_s"])
        projection[name] = {"prune_min": prep / 60, "finetune_min": finetune_s / 60,
                            "total_min": (prep + finetune_s) / 60}
    text = markdown_table(
        ["projected 7B recipe (T=5, 10K x <=1024 tokens)", "calibration + CKA + pruning min", "fine-tuning min",
         "total min", "paper (fine-tuning, one A100)"],
        [[n, p["prune_min"], p["finetune_min"], p["total_min"], PAPER_MINUTES] for n, p in projection.items()])
    text += ("\n\nThe projection assumes every sample is 1,024 tokens long (an upper bound; Alpaca-GPT4 "
             "samples are shorter) and takes the per-block times above for all blocks.\n")
    return projection, text


def run_inference(args, dtype: torch.dtype, device: torch.device) -> dict:
    model = build_model(args.shape, dtype, device)
    prune_2_4(model)
    x = torch.randint(0, VOCAB, (1, 256), device=device)
    with torch.no_grad():
        ref = model(input_ids=x).logits.float()
    dense = time_inference(model, args, device)
    to_semi_structured(model)
    with torch.no_grad():
        err = ((model(input_ids=x).logits.float() - ref).norm() / ref.norm()).item()
    sparse = time_inference(model, args, device)
    return {"dense": dense, "sparse": sparse, "rel_err": err}


def inference_table(infer: dict) -> str:
    rows = [[k, infer["dense"][k], infer["sparse"][k], infer["sparse"][k] / infer["dense"][k]] for k in infer["dense"]]
    return markdown_table(["2:4 inference", "dense", "2:4 semi-structured", "speedup"], rows) + (
        f"\n\nLogits of the semi-structured model against the same 2:4 weights run dense: relative "
        f"error {infer['rel_err']:.2e}.\n")


def run(args) -> tuple[dict, list[str]]:
    """Every part in its own try block; each table is printed (and --json rewritten) as soon
    as its part ends. Returns the numbers and the Markdown sections, failures included."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict = {"device": dev_name, "shape": args.shape, "dtype": args.dtype, "parts": {}, "errors": {}}
    sections = [f"Random LLaMA `{args.shape}`, {args.dtype}, on {dev_name}.\n"]

    def done(part: str, value, text: str) -> None:
        results["parts"][part] = value
        sections.append(text)
        print(f"\n[{part}]\n{text}", flush=True)
        save()

    def failed(part: str, exc: BaseException) -> None:
        results["errors"][part] = f"{type(exc).__name__}: {exc}"
        sections.append(f"{part}: failed ({type(exc).__name__}: {exc})\n")
        print(f"\n[{part}] FAILED: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
        save()

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    model = n_layers = prune = ft = None
    try:
        model = build_model(args.shape, dtype, device)
        n_layers = model.config.num_hidden_layers
        results["parameters"] = sum(p.numel() for p in model.parameters())
        print(f"model {args.shape}: {results['parameters'] / 1e9:.2f}B parameters, {args.dtype}, {dev_name}",
              file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - reported, the remaining parts still run
        failed("model", exc)
    if model is not None:
        try:
            prune = time_pruning(model, args, device)
            done("pruning", prune, prune_table(prune, args))
        except Exception as exc:  # noqa: BLE001
            failed("pruning", exc)
        try:
            ft = time_finetune(model, args, device)
            done("finetune", ft, finetune_table(ft, args))
        except Exception as exc:  # noqa: BLE001
            failed("finetune", exc)
    model = None
    free(device)
    if prune is not None and ft is not None:
        try:
            projection, text = projection_table(prune, ft, n_layers)
            done("projection", projection, text)
        except Exception as exc:  # noqa: BLE001
            failed("projection", exc)
    if args.skip_inference:
        sections.append("2:4 semi-structured kernels: not run (--skip-inference).\n")
    elif device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        try:
            infer = run_inference(args, dtype, device)
            done("inference_2_4", infer, inference_table(infer))
        except Exception as exc:  # noqa: BLE001
            failed("inference_2_4", exc)
        free(device)
    else:
        sections.append("2:4 semi-structured kernels: not run (they need a CUDA device and bf16/fp16).\n")
        print(sections[-1], flush=True)
    return results, sections


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible: run on a GPU machine or pass --device cpu --shape tiny")
    results, sections = run(args)
    if not args.no_record and results["parts"]:
        append_benchmark(f"GPU: LLaMA-2-7B shapes, pruning, fine-tuning, 2:4 inference ({results['device']})",
                         this_command(), machine_header(device=results["device"]), "\n".join(sections))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
