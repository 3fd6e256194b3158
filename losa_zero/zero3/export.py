"""Streamed export of a ZeRO-3 model to an ordinary Hugging Face safetensors folder.

The whole model is never gathered anywhere: parameter groups (a decoder layer, then the
embeddings / final norm / untied head) are gathered one at a time, in the order of the
shard plan, and each shard file is written by one rank (shard i by rank i mod world), which
keeps at most one shard's tensors in host memory. The sparse-LoRA factors are left out:
after the final merge the adapted layers are plain linears (rank 0), with the names a
``LlamaForCausalLM`` expects (``...q_proj.weight``). The result loads with
``AutoModelForCausalLM.from_pretrained`` and no losa_zero import.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import LosaZeroError
from ..outputs import write_json_atomic
from .checkpoint import param_groups

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text) -> int:
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise LosaZeroError(f"export_shard_size {text!r} is not a size like 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _exported(name: str) -> bool:
    return not (name.endswith(".lora_A") or name.endswith(".lora_B"))


def plan_shards(model, max_bytes: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Groups of (name, parameter), in gather order, cut into shards of at most ``max_bytes``
    (a group is never split; a group larger than the limit is a shard of its own)."""
    names = {id(p): n for n, p in model.named_parameters()}  # named_parameters drops tied duplicates
    shards, cur, size = [], [], 0
    for group in param_groups(model):
        items = [(names[id(p)], p) for p in group if id(p) in names and _exported(names[id(p)])]
        if not items:
            continue
        nbytes = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for _, p in items)
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.extend(items)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def export_model(model, tokenizer, out_dir: Path, runtime, max_shard_bytes: int) -> dict:
    """Write ``model`` as sharded safetensors (+ config, tokenizer) into ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    shards = plan_shards(model, max_shard_bytes)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    bar = runtime.progress(range(n), desc="export", unit="shard")
    for i in bar:
        owner = i % runtime.world_size
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
        for name, p in items:
            weight_map[name] = files[i]
            total += int(getattr(p, "ds_numel", p.numel())) * p.element_size()
        if runtime.rank == owner:
            tmp = out_dir / f".{files[i]}.tmp"
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, out_dir / files[i])
        del tensors
    runtime.barrier()
    if runtime.is_main:
        if n > 1:
            write_json_atomic(out_dir / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
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
    runtime.barrier()
    return {"shards": n, "bytes": total}
