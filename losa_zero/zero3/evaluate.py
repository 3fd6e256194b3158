"""Perplexity of a ZeRO-3 model with the SparseGPT/Wanda protocol of
:func:`losa_zero.evaluate.perplexity`, the windows shared out between ranks.

Each rank scores whole batches of windows (round-robin; a rank with none left runs a
filler batch, since ZeRO-3 forwards are collective); the per-window negative
log-likelihoods are then combined in window order, exactly as the single-process
function adds them, so the number does not depend on the number of ranks.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import LosaZeroError


@torch.no_grad()
def perplexity(model, tokenizer, text: str, runtime, seqlen: int | None = None, batch_size: int = 4) -> dict:
    if seqlen is None:
        seqlen = int(model.config.max_position_embeddings)
    if seqlen < 2:
        raise LosaZeroError(f"perplexity seqlen must be at least 2, got {seqlen}: pass a larger eval_seqlen")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n_windows = ids.numel() // seqlen
    if n_windows < 1:
        raise LosaZeroError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}: "
                            "use a longer text or a smaller eval_seqlen")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    starts = list(range(0, n_windows, batch_size))
    W, r = runtime.world_size, runtime.rank
    mine = starts[r::W]
    rounds = math.ceil(len(starts) / W)
    nll = torch.zeros(n_windows, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for j in range(rounds):
            start = mine[j] if j < len(mine) else starts[0]  # filler: same forwards on every rank
            batch = windows[start:start + batch_size].to(runtime.device)
            logits = model(input_ids=batch, use_cache=False).logits
            if j < len(mine):
                for b in range(batch.shape[0]):
                    lg = logits[b, :-1].float()
                    nll[start + b] = F.cross_entropy(lg, batch[b, 1:], reduction="sum").item()
            del logits
    finally:
        model.train(was_training)
    if W > 1:
        # Each window was scored by exactly one rank: the sum is that rank's value, exactly.
        comm = nll.to(runtime.device)
        dist.all_reduce(comm)
        nll = comm.cpu()
    total = 0.0
    for v in nll.tolist():  # in window order, as the single-process function
        total += v
    n_pred = n_windows * (seqlen - 1)
    mean = total / n_pred
    return {"ppl": math.exp(mean), "nll": mean, "tokens": n_pred, "windows": n_windows, "seqlen": seqlen}
