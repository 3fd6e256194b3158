"""Perplexity and greedy generation, written against the bare causal-LM call signature.

The loss is computed here from ``.logits`` rather than taken from the model's ``loss``
output, for two reasons: (1) the same code must score a plain HF model, a LoRA-wrapped one
and a ZeRO-3 engine's module, which do not all accept ``labels``; (2) the SparseGPT/Wanda
numbers we compare against are defined by a specific windowing protocol, and computing the
loss in float32 ourselves keeps bf16 models comparable to fp32 ones.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from losa_zero.errors import LosaZeroError


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (directly or through ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    # use_cache=False: a KV cache is useless for scoring and costs memory on long windows.
    kwargs = {"use_cache": False} if _accepts(model, "use_cache") else {}
    out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


#: longest default perplexity window: the published tables score LLaMA-1/2 at their 2048 or
#: 4096 context; Llama-3 / Qwen contexts of 128K would make one window larger than the text
DEFAULT_EVAL_SEQLEN_CAP = 4096


def default_eval_seqlen(model: nn.Module) -> int:
    """min(the model's context length, 4096)."""
    config = getattr(model, "config", None)
    seqlen = getattr(config, "max_position_embeddings", None)
    if not seqlen:
        raise LosaZeroError("cannot infer the evaluation sequence length from the model config: pass --eval-seqlen")
    return min(int(seqlen), DEFAULT_EVAL_SEQLEN_CAP)


def eval_token_ids(model: nn.Module, tokenizer, text: str, seqlen: int | None = None,
                   name: str = "evaluation text") -> tuple[torch.Tensor, int]:
    """``(token ids of text, window length)``, or a one-line error when the text is too
    short for one window. Called once the model is loaded and before any calibration, so a
    run does not learn at its very end that its ``--ppl`` file cannot be scored."""
    if seqlen is None:
        seqlen = default_eval_seqlen(model)
    if seqlen < 2:
        raise LosaZeroError(f"perplexity seqlen must be at least 2, got {seqlen}: pass a larger --eval-seqlen")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < seqlen:
        raise LosaZeroError(f"{name} has {ids.numel()} tokens, fewer than one window of {seqlen}: "
                            "use a longer text or a smaller --eval-seqlen")
    return ids, seqlen


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, runtime=None, seqlen: int | None = None,
               batch_size: int = 4) -> dict:
    """Perplexity of ``text`` with the SparseGPT/Wanda protocol.

    The text is tokenized once (the tokenizer's BOS at the very start only), cut into
    ``floor(N / seqlen)`` non-overlapping windows (the tail is dropped), and the mean
    next-token NLL over the ``seqlen - 1`` predictions of every window gives
    ``ppl = exp(mean)``. Non-overlapping windows make the number cheap and comparable to
    the published pruning tables, at the cost of short contexts at window starts.

    With a multi-rank ``runtime`` (ZeRO-3) the batches of windows are shared out
    round-robin; a rank with none left runs a filler batch, since ZeRO-3 forwards are
    collective. The per-window sums are combined and added in window order, exactly as on
    one process, so the number does not depend on the number of ranks.
    """
    if batch_size < 1:
        raise LosaZeroError(f"perplexity batch size must be at least 1, got {batch_size}")
    ids, seqlen = eval_token_ids(model, tokenizer, text, seqlen)
    n_windows = ids.numel() // seqlen
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    world, rank = (runtime.world_size, runtime.rank) if runtime is not None else (1, 0)
    device = runtime.device if runtime is not None else _device_of(model)
    starts = list(range(0, n_windows, batch_size))
    mine = starts[rank::world]
    rounds = math.ceil(len(starts) / world)
    nll = torch.zeros(n_windows, dtype=torch.float64)
    was_training = model.training
    model.eval()  # LoRA dropout etc. must be off while scoring
    try:
        for j in range(rounds):
            start = mine[j] if j < len(mine) else starts[0]  # filler: same forwards on every rank
            batch = windows[start:start + batch_size].to(device)
            logits = _logits(model, batch)
            if j < len(mine):
                # One window at a time in float32 bounds the upcast copy for large vocabularies.
                for b in range(batch.shape[0]):
                    lg = logits[b, :-1].float()
                    nll[start + b] = F.cross_entropy(lg, batch[b, 1:], reduction="sum").item()
            del logits
    finally:
        model.train(was_training)
    if world > 1:
        # Each window was scored by exactly one rank: the sum is that rank's value, exactly.
        import torch.distributed as dist

        comm = nll.to(device)
        dist.all_reduce(comm)
        nll = comm.cpu()
    total = 0.0
    for v in nll.tolist():  # in window order
        total += v
    n_pred = n_windows * (seqlen - 1)
    mean = total / n_pred
    return {"ppl": math.exp(mean), "nll": mean, "tokens": n_pred, "windows": n_windows, "seqlen": seqlen}


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, max_new_tokens: int = 30, prompt: str = "") -> str:
    """Greedy continuation of BOS (+ ``prompt``), decoded without special tokens.

    A plain argmax loop without KV cache is used instead of ``model.generate`` so that it
    behaves identically for HF models, LoRA wrappers and sharded (ZeRO-3) modules; it is a
    smoke test of model quality, so the quadratic cost over a few dozen tokens is irrelevant.
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = [bos] + ids
    if not ids:
        raise LosaZeroError("the tokenizer has no BOS token: pass a non-empty prompt to generate from")
    eos = tokenizer.eos_token_id
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            nxt = _logits(model, x)[0, -1].float().argmax().item()
            x = torch.cat([x, torch.tensor([[nxt]], dtype=torch.long, device=device)], dim=1)
            if eos is not None and nxt == eos:
                break
    finally:
        model.train(was_training)
    return tokenizer.decode(x[0].tolist(), skip_special_tokens=True)
