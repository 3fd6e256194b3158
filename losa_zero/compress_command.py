"""``losa-zero compress MODEL_DIR --out DIR``: a model directory already exported dense,
rewritten in the compressed-tensors sparse format (see :mod:`losa_zero.compressed`).

The model is never loaded: its layout comes from the config (the module tree built on
the meta device), the tensors are read from the safetensors files one group at a time
(a decoder layer, then the rest) and written shard by shard, the same grouping and
writer as the streamed ZeRO-3 export, so both give the same files for the same weights.
"""
from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from .compressed import GroupCompressor, format_for, model_targets, sparsity_config
from .errors import LosaZeroError
from .modeling import _check_model_dir, check_supported
from .outputs import atomic_output_dir
from .shards import ShardWriter, parse_size, plan_groups, write_index

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _weight_files(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return {k: src / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = src / "model.safetensors"
    if not single.is_file():
        raise LosaZeroError(f"{src} has no model.safetensors(.index.json): save the model in safetensors first")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def _groups(model, names: list[str]) -> list[list[str]]:
    """The stored tensor names in export order: each decoder layer's, then the rest."""
    from .zero3.checkpoint import param_groups

    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = [[by_id[id(p)] for p in g if id(p) in by_id] for g in param_groups(model)]
    known = {n for g in groups for n in g}
    missing = sorted(known - set(names))
    if missing:
        raise LosaZeroError(f"the weights lack {missing[0]} (and {len(missing) - 1} more) that the config's model "
                            "has: the folder is incomplete")
    groups = [[n for n in g if n in names] for g in groups]
    extra = [n for n in names if n not in known]  # stored buffers, kept as they are
    if extra:
        groups[-1].extend(extra)
    return [g for g in groups if g]


def compress_directory(model_dir: str, out: str, shard_size: str = "5GB", overwrite: bool = False) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    src = _check_model_dir(model_dir)
    if sparsity_config(src) is not None:
        raise LosaZeroError(f"{src} is already in a compressed-tensors sparse format: nothing to do")
    max_bytes = parse_size(shard_size, "--shard-size")
    with atomic_output_dir(Path(out), overwrite=overwrite, inputs=[("the model folder", src)]) as tmp, \
            ExitStack() as stack:
        try:
            config = AutoConfig.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise LosaZeroError(f"cannot read {src / 'config.json'} ({exc}): pass a folder made by save_pretrained") \
                from exc
        check_supported(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        targets, types = model_targets(model)
        files = _weight_files(src)
        groups = _groups(model, list(files))
        from safetensors import safe_open

        handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in set(files.values())}

        def read(name: str) -> torch.Tensor:
            return handles[files[name]].get_tensor(name)

        def nbytes(name: str) -> int:
            sl = handles[files[name]].get_slice(name)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            return numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)

        target_weights = [f"{t}.weight" for t in sorted(targets) if f"{t}.weight" in files]
        fmt = format_for(read(n) for n in target_weights)
        plan = plan_groups([sum(nbytes(n) for n in g) for g in groups], max_bytes)
        compressor = GroupCompressor(fmt, targets, types)
        for item in src.iterdir():
            if item.name in _WEIGHT_FILES or item.name.endswith(".safetensors") or item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        writer = ShardWriter(tmp, len(plan), compressor)
        for i, shard in enumerate(plan):
            writer.write(i, {n: read(n) for gi in shard for n in groups[gi]})
        stored = write_index(tmp, [writer.state()], len(plan))
        info = compressor.finish(tmp)
    info.update({"source": str(src), "out": str(out), "shards": len(plan), "bytes": stored,
                 "dense_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors"))})
    return info


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def cmd_compress(args) -> int:
    info = compress_directory(args.model_dir, args.out, shard_size=args.shard_size, overwrite=args.overwrite)
    lin = info["sizes"]["compressed_linears"]
    ratio = "" if lin["ratio"] is None else f"; compressed linears {lin['ratio']:.3f} of their dense bytes"
    print(f"wrote {info['out']} ({info['format']}): {info['bytes'] / 1e6:.2f} MB of tensors against "
          f"{info['dense_bytes'] / 1e6:.2f} MB of dense files{ratio}")
    return 0
