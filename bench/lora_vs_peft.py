"""Training speed and peak memory of one LoRA fine-tuning step: peft's LoRA on the dense
model against losa-zero's SparseLoRALinear on a 50%-pruned copy (the masked product of
docs/method.md section 1), side by side in one run.

    python bench/lora_vs_peft.py                 # full run, appends to BENCHMARKS.md
    python bench/lora_vs_peft.py --quick --no-record

One step = forward + backward + AdamW step, adapters on the 7 linears (q, k, v, o, gate,
up, down) of every decoder layer, base weights frozen, fp32 on CPU, random token ids
(fixed seed) on a random-initialised LLaMA of the "100m" shape (``bench/common.py``).
Variants:

- ``peft``: ``peft.get_peft_model`` with LoraConfig(r, alpha, dropout 0) on the dense model.
- ``losa, no mask``: our layer with keep=None (the plain low-rank path), the reference for
  what the layer costs apart from the mask.
- ``losa masked, separate``: our layer on a 50% magnitude-pruned copy, base linear plus the
  masked product as a second weight-sized matmul (the path before the merged forward; still
  the path with LoRA dropout active).
- ``losa masked, merged``: the same with the masked update merged into the weight for one
  matmul (``SparseLoRALinear.masked_path = "merged"``, the default).
- ``... dropout 0.1`` rows (``--dropout-rows``, on by default): peft and our masked layer with
  the released recipe's LoRA dropout 0.1, where the merged forward does not apply.

Ours uses A/B created at max_rank 16 and trained at rank r (as LoSA creates them); the
optimizer holds all 16 components, as in a LoSA run. Each variant runs in its own
subprocess, the variants interleaved within each repeat; a variant's time is the median
step time over the timed steps after warm-up, then the median over the repeats. Peak
memory comes from one more subprocess per variant (so peaks do not mix), with glibc's mmap
threshold fixed so that freed tensors leave the RSS: the peak RSS during training (reset
once the model is loaded and prepared, ``/proc/self/clear_refs``) and over the process.
A per-linear table times one adapted linear of each decoder shape alone (no mask, separate,
merged) beside its FLOP prediction, which isolates the masked product from the LM head,
attention and optimizer. Run time: 7.2 minutes measured with one torch thread on a shared
2-core machine (``--quick``: 2 minutes); less on an idle one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (LLAMA_SHAPES, REPO, append_benchmark, describe_shape, emit_result, machine_header, make_random_llama,  # noqa: E402
                    markdown_table, median, parse_result, peak_rss_bytes, reset_peak_rss, rss_bytes,
                    run_measured, this_command)

# Memory children only: glibc's malloc raises its mmap threshold after big frees, so later
# weight-sized tensors come from the heap and freed memory stays resident; RSS then measures
# fragmentation, not the variant. A fixed threshold keeps every tensor of 64 KiB or more in
# its own mapping, returned to the system when freed, so the peak RSS is the peak of live
# memory. Not for the timed children: a fresh mapping per tensor adds page faults (several
# ms per weight-sized transient here) that the default allocator avoids by reusing memory.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (kind, options); kind: peft | losa
VARIANTS = {
    "peft": ("peft", {"dropout": 0.0}),
    "losa, no mask": ("losa", {"mask": False, "dropout": 0.0}),
    "losa masked, separate": ("losa", {"mask": True, "dropout": 0.0, "path": "separate"}),
    "losa masked, merged": ("losa", {"mask": True, "dropout": 0.0, "path": "merged"}),
}
DROPOUT_VARIANTS = {
    "peft, dropout 0.1": ("peft", {"dropout": 0.1}),
    "losa masked, dropout 0.1": ("losa", {"mask": True, "dropout": 0.1, "path": "merged"}),
}


# -- child: one variant, timed steps and peak memory ------------------------------------------
def _build(args, kind: str, opts: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=opts["dropout"], bias="none",
                         target_modules=list(TARGETS), task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        return model, [p for p in model.parameters() if p.requires_grad]

    from losa_zero.lora import SparseLoRALinear, wrap_linear
    from losa_zero.losa import adapter_seed

    params = []
    for l, layer in enumerate(model.model.layers):
        for j, name in enumerate(TARGETS):
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            lin = getattr(parent, name)
            keep = None
            if opts["mask"]:
                # 50% magnitude pruning, per linear (which weights does not change the cost)
                w = lin.weight.detach()
                thresh = w.abs().flatten().kthvalue(w.numel() // 2).values
                keep = w.abs() > thresh
                w.mul_(keep)
            new = wrap_linear(lin, args.max_rank, args.alpha / args.rank, opts["dropout"], init_seed=adapter_seed(0, l, j, len(TARGETS)))
            if "path" in opts:
                new.masked_path = opts["path"]
            new.set_keep_mask(keep)
            new.set_rank(args.rank)
            setattr(parent, name, new)
            params += [new.lora_A, new.lora_B]
    assert sum(isinstance(m, SparseLoRALinear) for m in model.modules()) == len(TARGETS) * len(model.model.layers)
    return model, params


def child(args) -> None:
    import torch

    kind, opts = {**VARIANTS, **DROPOUT_VARIANTS}[args.child]
    torch.manual_seed(0)
    model, params = _build(args, kind, opts)
    model.train()
    # from_pretrained maps the weight file lazily: read every weight now, so the setup RSS holds
    # the whole model in every variant (pruning touches all weights, peft would do it in step 1)
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.001)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=g)
    load_peak = peak_rss_bytes()
    base_rss = rss_bytes()
    peak_reset = reset_peak_rss()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
    emit_result({"variant": args.child, "step_s": times, "loss": float(loss), "threads": torch.get_num_threads(),
                 "trainable": sum(p.numel() for p in params), "base_rss": base_rss,
                 "train_peak_rss": peak_rss_bytes() if peak_reset else None, "process_peak_rss": max(load_peak, peak_rss_bytes())})


LINEAR_PATHS = ("no mask", "separate", "merged")


def child_linears(args) -> None:
    """One adapted linear of each shape alone, forward + backward on T = batch x seqlen tokens:
    our layer without a mask (the low-rank path, peft's arithmetic) against the two masked
    paths. Isolates the masked product from the LM head, attention and optimizer."""
    import torch
    from torch import nn

    from losa_zero.lora import wrap_linear

    tokens = args.batch * args.seqlen
    out = {}
    for label, (o, i) in linear_kinds(args.shape).items():
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(i, o, bias=False)
        keep = torch.rand(o, i, generator=g) < 0.5
        with torch.no_grad():
            lin.weight.mul_(keep)
        layer = wrap_linear(lin, args.max_rank, args.alpha / args.rank, 0.0, init_seed=0)
        layer.set_rank(args.rank)
        with torch.no_grad():
            layer.lora_B.normal_(generator=g)
        x = torch.randn(tokens, i, generator=g, requires_grad=True)
        grad = torch.randn(tokens, o, generator=g)
        res = {}
        for path in LINEAR_PATHS:
            layer.set_keep_mask(None if path == "no mask" else keep)
            layer.masked_path = "merged" if path == "no mask" else path
            times = []
            for k in range(2 + args.linear_iters):
                x.grad = layer.lora_A.grad = layer.lora_B.grad = None
                t0 = time.perf_counter()
                layer(x).backward(grad)
                if k >= 2:
                    times.append(time.perf_counter() - t0)
            res[path] = times
        out[label] = res
    emit_result({"linears": out})


# -- analytic FLOPs --------------------------------------------------------------------------------
def linear_kinds(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) of the decoder's three linear shapes."""
    s = LLAMA_SHAPES[shape]
    h, f = s["hidden_size"], s["intermediate_size"]
    return {"q/k/v/o": (h, h), "gate/up": (f, h), "down": (h, f)}


def linear_flops(o: int, i: int, tokens: int, r: int) -> dict[str, float]:
    """FLOPs of one adapted linear per training step (forward + backward): the frozen base,
    LoRA, and what each masked path adds (see ``step_flops``)."""
    return {"base": 4 * tokens * i * o, "lora": 6 * tokens * r * (i + o),
            "separate": 3 * 2 * tokens * i * o + 4 * 2 * r * i * o, "merged": 2 * tokens * i * o + 4 * 2 * r * i * o}


def linear_shapes(shape: str) -> list[tuple[int, int]]:
    s = LLAMA_SHAPES[shape]
    h, f = s["hidden_size"], s["intermediate_size"]
    per_layer = [(h, h)] * 4 + [(f, h), (f, h), (h, f)]  # (out, in): q k v o, gate up, down
    return per_layer * s["num_hidden_layers"]


def step_flops(shape: str, tokens: int, seqlen: int, r: int) -> dict[str, float]:
    """Multiply-add FLOPs (x2) of one training step, by variant, dense counting (the masked
    products are dense matmuls on zero-filled weights).

    Frozen base, per linear: forward 2*T*din*dout, backward input gradient 2*T*din*dout.
    LoRA (peft or our low-rank path): forward 2*T*r*(din+dout), backward twice that: ~6*T*r*(din+dout).
    Masked product, separate: forward x@delta^T, backward g@delta and g^T x: 3 x 2*T*din*dout, plus
    B@A twice and grad_A, grad_B from the weight-sized gradient: 4 x 2*r*din*dout.
    Masked product, merged: the forward and the input gradient reuse the base matmuls (on the
    merged weight); what remains is g^T x (2*T*din*dout) and the same 4 x 2*r*din*dout."""
    s = LLAMA_SHAPES[shape]
    h, L, V = s["hidden_size"], s["num_hidden_layers"], 32000
    per = [linear_flops(o, i, tokens, r) for o, i in linear_shapes(shape)]
    base = sum(f["base"] for f in per) + 4 * tokens * h * V  # decoder linears + LM head (frozen)
    base += L * 3 * 4 * tokens * seqlen * h  # attention QK^T and AV, forward + backward (~2x)
    return {"base": base, "lora": sum(f["lora"] for f in per),
            "masked_separate_extra": sum(f["separate"] for f in per),
            "masked_merged_extra": sum(f["merged"] for f in per)}


# -- parent -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="100m", choices=sorted(LLAMA_SHAPES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per repeat (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--linear-iters", type=int, default=7, help="timed iterations per path in the per-linear table")
    ap.add_argument("--no-dropout-rows", dest="dropout_rows", action="store_false",
                    help="skip the dropout-0.1 rows (peft and ours with the released recipe's LoRA dropout)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, 2 timed steps, seqlen 128")
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "bench"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        (child_linears if args.child == "linears" else child)(args)
        return
    if args.quick:
        args.repeats, args.steps, args.seqlen, args.linear_iters = 1, 2, 128, 3
    variants = dict(VARIANTS)
    if args.dropout_rows:
        variants.update(DROPOUT_VARIANTS)
    t_start = time.perf_counter()
    model_dir = make_random_llama(Path(args.workdir) / f"llama-{args.shape}", args.shape)
    common_args = ["--model-dir", str(model_dir), "--batch", str(args.batch), "--seqlen", str(args.seqlen),
                   "--rank", str(args.rank), "--max-rank", str(args.max_rank), "--alpha", str(args.alpha),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--shape", args.shape,
                   "--linear-iters", str(args.linear_iters)]
    me = [sys.executable, str(Path(__file__).resolve())]
    lin = parse_result(run_measured(me + ["--child", "linears"] + common_args, cwd=REPO,
                                    timeout=900)["stdout"])["linears"]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for name in variants:
            res = parse_result(run_measured(me + ["--child", name] + common_args, cwd=REPO, timeout=900)["stdout"])
            results[name].append(res)
            print(f"[repeat {rep + 1}/{args.repeats}] {name}: median step {median(res['step_s']):.3f} s",
                  file=sys.stderr, flush=True)
    memory: dict[str, dict] = {}
    for name in variants:  # peaks are deterministic: one run each, 1 warm-up + 1 step
        mem_args = common_args + ["--steps", "1", "--warmup", "1"]
        memory[name] = parse_result(run_measured(me + ["--child", name] + mem_args, env=MEMORY_ENV, cwd=REPO,
                                                 timeout=900)["stdout"])
        print(f"[memory] {name}: train peak RSS {(memory[name]['train_peak_rss'] or 0) / 2**20:.0f} MiB",
              file=sys.stderr, flush=True)

    tokens = args.batch * args.seqlen
    step_s = {v: median(median(r["step_s"]) for r in rs) for v, rs in results.items()}
    train_peak = {v: m["train_peak_rss"] or float("nan") for v, m in memory.items()}
    base_rss = {v: m["base_rss"] for v, m in memory.items()}
    proc_peak = {v: m["process_peak_rss"] for v, m in memory.items()}
    ref = {v: ("peft, dropout 0.1" if "dropout" in v else "peft") for v in variants}
    mib = 2**20
    rows = []
    for v in variants:
        tps = tokens / step_s[v]
        rows.append([v, round(tps, 1), round(step_s[ref[v]] / step_s[v], 3), round(train_peak[v] / mib),
                     round(train_peak[v] / train_peak[ref[v]], 3), round((train_peak[v] - base_rss[v]) / mib),
                     round(proc_peak[v] / mib)])
    table = markdown_table(["variant", "tokens/s", "speed vs peft", "train peak RSS MiB", "vs peft",
                            "train peak above setup MiB", "process peak RSS MiB"], rows)

    f = step_flops(args.shape, tokens, args.seqlen, args.rank)
    gf = 1e9
    peft_f = f["base"] + f["lora"]
    pred = {"peft": peft_f, "losa, no mask": peft_f,
            "losa masked, separate": peft_f + f["masked_separate_extra"],
            "losa masked, merged": peft_f + f["masked_merged_extra"]}
    flop_rows = [[v, round(pred[v] / gf, 1), round(peft_f / pred[v], 3), round(step_s["peft"] / step_s[v], 3)]
                 for v in pred if v in step_s]
    flop_table = markdown_table(["variant", "model GFLOP / step", "FLOP-predicted speed vs peft",
                                 "measured speed vs peft"], flop_rows)
    lin_rows = []
    for label, (o, i) in linear_kinds(args.shape).items():
        lf = linear_flops(o, i, tokens, args.rank)
        ref_f = lf["base"] + lf["lora"]
        ms = {p: 1e3 * median(lin[label][p]) for p in LINEAR_PATHS}
        lin_rows.append([f"{label} {i}->{o}", round(ms["no mask"], 2), round(ms["separate"], 2),
                         f"{ms['separate'] / ms['no mask']:.2f} ({(ref_f + lf['separate']) / ref_f:.2f})",
                         round(ms["merged"], 2),
                         f"{ms['merged'] / ms['no mask']:.2f} ({(ref_f + lf['merged']) / ref_f:.2f})"])
    lin_table = markdown_table(["linear", "no mask ms", "separate ms", "separate / no mask (FLOPs)",
                                "merged ms", "merged / no mask (FLOPs)"], lin_rows)
    per_linear = (f"One adapted linear alone, forward + backward on T = {tokens} tokens, r = {args.rank}, median of "
                  f"{args.linear_iters} (our layer; \"no mask\" is the low-rank path, peft's arithmetic). In "
                  f"brackets the FLOP prediction: frozen base 4*T*din*dout, LoRA ~6*T*r*(din+dout); the masked "
                  f"product adds 3 x 2*T*din*dout separate (x delta^T, g delta, g^T x) or 2*T*din*dout merged "
                  f"(g^T x only), plus 4 x 2*r*din*dout (B A twice, the A and B gradients) and a few "
                  f"weight-sized elementwise passes (mask, merge), which the FLOP count leaves out.\n\n{lin_table}")
    threads = results["peft"][0]["threads"]
    body = (f"{describe_shape(args.shape)} (random init, vocab 32000), batch {args.batch} x seqlen {args.seqlen} "
            f"random token ids, rank {args.rank} (ours: A/B at max rank {args.max_rank}), alpha {args.alpha:g}, "
            f"fp32, AdamW, torch threads {threads}; {args.warmup} warm-up + {args.steps} timed steps per repeat, "
            f"{args.repeats} repeats, each variant in its own subprocess, interleaved. Masked rows: 50% "
            f"magnitude mask per linear. Speed ratios: > 1 is faster than peft (dropout rows compare with peft "
            f"at the same dropout); memory ratio < 1 is less. Memory from one more subprocess per variant "
            f"(1 warm-up + 1 step, glibc mmap threshold fixed at 64 KiB so freed tensors leave RSS): \"train "
            f"peak\" is the peak RSS during the steps (reset once the model was loaded, read and adapted), "
            f"\"above setup\" its excess over the RSS before the first step.\n\n{table}\n\nAnalytic FLOPs (dense counting; "
            f"the LM head and attention included in the base):\n\n{flop_table}\n\n{per_linear}\n\n"
            f"Total bench wall time {time.perf_counter() - t_start:.0f} s.")
    if args.no_record:
        print(f"\n{machine_header()}\n\n{body}")
    else:
        append_benchmark("Sparse LoRA vs peft LoRA: training step speed and memory", this_command(),
                         machine_header(), body)


if __name__ == "__main__":
    main()
