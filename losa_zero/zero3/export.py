"""Streamed export of a model to an ordinary Hugging Face safetensors folder, dense or in
a compressed-tensors sparse format.

The whole model is never gathered anywhere: parameter groups (a decoder layer, then the
embeddings / final norm / untied head) are gathered one at a time, in the order of the
shard plan, and each shard file is written by one rank (shard i by rank i mod world), on a
worker thread while that rank goes on gathering the next shards with the others, which keeps
at most one shard's tensors in host memory per rank. With a compressor, the owner compresses
the shard's target linears before writing it. The sparse-LoRA factors are left out:
after the final merge the adapted layers are plain linears (rank 0), with the names a
``LlamaForCausalLM`` expects (``...q_proj.weight``). A dense result loads with
``AutoModelForCausalLM.from_pretrained`` and no losa_zero import. On one process (the
plain :class:`~losa_zero.runtime.Runtime`) the same code writes the same files.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..shards import ShardWriter, parse_size, plan_groups, write_index
from .checkpoint import param_groups

__all__ = ["export_model", "parse_size", "plan_shards"]


def _exported(name: str) -> bool:
    return not (name.endswith(".lora_A") or name.endswith(".lora_B"))


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def plan_shards(model, max_bytes: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Groups of (name, parameter), in gather order, cut into shards of at most ``max_bytes``
    (a group is never split; a group larger than the limit is a shard of its own)."""
    names = {id(p): n for n, p in model.named_parameters()}  # named_parameters drops tied duplicates
    groups = []
    for group in param_groups(model):
        items = [(names[id(p)], p) for p in group if id(p) in names and _exported(names[id(p)])]
        if items:
            groups.append(items)
    plan = plan_groups([sum(_numel(p) * p.element_size() for _, p in g) for g in groups], max_bytes)
    return [[item for gi in shard for item in groups[gi]] for shard in plan]


def export_model(model, tokenizer, out_dir: Path, runtime, max_shard_bytes: int, compressor=None) -> dict:
    """Write ``model`` as sharded safetensors (+ config, tokenizer) into ``out_dir``;
    ``compressor`` (a :class:`~losa_zero.compressed.GroupCompressor`) stores its target
    linears compressed and adds the compression config to config.json."""
    out_dir = Path(out_dir)
    shards = plan_shards(model, max_shard_bytes)
    n = len(shards)
    writer = ShardWriter(out_dir, n, compressor)
    bar = runtime.progress(range(n), desc="export", unit="shard")
    # Each owner compresses and writes its shard on a worker thread while it goes on gathering
    # the next shards with the others: a slow write to shared storage never holds the other
    # ranks in a gather. An owner waits for its previous write before collecting its next
    # shard, so it holds at most one shard's tensors.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-write")
    pending = None
    for i in bar:
        owner = i % runtime.world_size
        if runtime.rank == owner and pending is not None:
            pending.result()
            pending = None
        tensors = {}
        items = shards[i]
        # gather group by group (a shard holds whole groups, consecutive in gather order)
        by_group: list[list] = []
        seen = set()
        for group in param_groups(model):
            ids = {id(p) for p in group}
            part = [(n_, p) for n_, p in items if id(p) in ids and id(p) not in seen]
            if part:
                by_group.append(part)
                seen.update(id(p) for _, p in part)
        for part in by_group:
            with runtime.gathered_params([p for _, p in part]):
                if runtime.rank == owner:
                    for name, p in part:
                        tensors[name] = p.detach().to("cpu").contiguous().clone()
        if runtime.rank == owner:
            pending = pool.submit(writer.write, i, tensors)
        del tensors
    if pending is not None:
        pending.result()
    pool.shutdown()
    parts = runtime.all_gather_object((writer.state(), compressor.stats.to_dict() if compressor else None))
    result = {"shards": n, "bytes": 0}
    if runtime.is_main:
        result["bytes"] = write_index(out_dir, [p[0] for p in parts], n)
        config = model.config
        config.save_pretrained(out_dir)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(out_dir)
            except (ValueError, OSError):
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        if compressor is not None:
            result.update(compressor.finish(out_dir, [p[1] for p in parts]))
    runtime.barrier()
    return result
