"""Sparse weights in the compressed-tensors formats: a bitmask plus the packed nonzeros.

A pruned model stored dense keeps every zero. The compressed-tensors formats that
llm-compressor wrote for sparse models store, per pruned linear, a bitmask of the kept
entries and only their values, and say so in ``config.json`` (``quantization_config``
with ``quant_method: compressed-tensors`` and a ``sparsity_config``). The names, the
config classes and the bit packing come from the ``compressed-tensors`` library; since its
0.15 release the library no longer ships the compressors themselves, so the tensors are
cut here, in the library's layout.

Layout of one compressed linear ``P`` (its module name, e.g. ``model.layers.0.mlp.up_proj``),
in the linear's own dtype for the values:

``sparse-bitmask`` (any sparsity pattern)
    ``P.shape``        int64 ``[2]``: (out_features, in_features);
    ``P.compressed``   1-D: the nonzero entries, row by row, in column order;
    ``P.bitmask``      uint8 ``[rows, ceil(cols / 8)]``: bit ``j % 8`` (least significant
                       first) of byte ``j // 8`` is set when column ``j`` is stored;
    ``P.row_offsets``  int64 ``[rows]``: where each row starts in ``P.compressed``.
``sparse-24-bitmask`` (2:4 along the input dimension)
    ``P.shape``        int64 ``[2, 1]``;
    ``P.compressed``   ``[rows, cols / 2]``: the two stored entries of every group of four;
    ``P.bitmask``      as above, exactly two bits set in every group of four.

Exact by construction: the stored entries are the nonzeros (a 2:4 group with fewer than
two nonzeros also stores its first zeros), so decompressing gives the dense weight back
bit for bit (a negative zero comes back as a positive zero, the same value).

:func:`read_compressed_linears` is the one reader of the format: it hands out each
linear's bitmask and packed values without decompressing them, for loaders and kernels
that compute on the compressed form.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from .errors import LosaZeroError

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
FORMATS = (BITMASK, BITMASK_24)
SAVE_FORMATS = ("dense", "compressed")
#: the tensors each format stores per compressed linear (suffixes of the module name)
PARAM_NAMES = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
               BITMASK_24: ("shape", "compressed", "bitmask")}


def _ct():
    """The compressed-tensors pieces used here (imported on first use: the library pulls in
    transformers' model-loading stack, which commands that never touch the format skip)."""
    try:
        from compressed_tensors import __version__
        from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_CONFIG_NAME,
                                             QUANTIZATION_METHOD, QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME,
                                             TRANSFORM_CONFIG_NAME)
        from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig, SparsityStructure
        from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise LosaZeroError(f"the compressed format needs the compressed-tensors package ({exc}): "
                            "pip install compressed-tensors") from exc

    class CT:
        version = __version__
        config_name = QUANTIZATION_CONFIG_NAME
        version_key = COMPRESSION_VERSION_NAME
        method_key = QUANTIZATION_METHOD_NAME
        method = QUANTIZATION_METHOD
        sparsity_key = SPARSITY_CONFIG_NAME
        transform_key = TRANSFORM_CONFIG_NAME
        Format = CompressionFormat
        Config = SparsityCompressionConfig
        Structure = SparsityStructure
        pack = staticmethod(pack_bitmasks)
        unpack = staticmethod(unpack_bitmasks)

    assert CT.Format(BITMASK) and CT.Format(BITMASK_24)  # the library still names both formats
    return CT


# -- one weight ---------------------------------------------------------------------------------

@dataclass
class CompressedWeight:
    """One linear's weight in a compressed-tensors sparse format (see the module docstring)."""

    format: str
    shape: tuple[int, int]
    values: Tensor
    bitmask: Tensor
    row_offsets: Tensor | None = None

    @property
    def nbytes(self) -> int:
        parts = [self.values, self.bitmask] + ([self.row_offsets] if self.row_offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in parts) + 8 * 2

    def keep_mask(self) -> Tensor:
        """The stored positions as a bool tensor of the dense shape."""
        return _ct().unpack(self.bitmask, list(self.shape))

    def to_dense(self) -> Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype)
        dense[self.keep_mask()] = self.values.reshape(-1)
        return dense

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """The named tensors this weight is stored as, for module ``prefix``."""
        shape = torch.tensor(self.shape, dtype=torch.int64)
        out = {f"{prefix}.shape": shape.reshape(-1, 1) if self.format == BITMASK_24 else shape,
               f"{prefix}.compressed": self.values, f"{prefix}.bitmask": self.bitmask}
        if self.format == BITMASK:
            out[f"{prefix}.row_offsets"] = self.row_offsets
        return out

    @classmethod
    def from_tensors(cls, fmt: str, tensors: dict[str, Tensor]) -> "CompressedWeight":
        """From the suffix-keyed tensors (``shape``, ``compressed``, ...) of one linear."""
        shape = tuple(int(x) for x in tensors["shape"].reshape(-1).tolist())
        return cls(fmt, shape, tensors["compressed"], tensors["bitmask"], tensors.get("row_offsets"))


def is_24_sparse(weight: Tensor) -> bool:
    """At most two nonzeros in every group of four consecutive inputs of every row."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def compress_weight(weight: Tensor, fmt: str) -> CompressedWeight:
    """``weight`` (a 2-D CPU tensor) in format ``fmt``; raises ValueError when a 2:4 format
    is asked for a weight that is not 2:4 sparse (it would lose entries)."""
    ct = _ct()
    w = weight.detach().to("cpu").contiguous()
    if w.dim() != 2:
        raise ValueError(f"only 2-D weights are compressed (got shape {tuple(w.shape)})")
    rows, cols = w.shape
    keep = w != 0
    if fmt == BITMASK:
        counts = keep.sum(dim=1)
        return CompressedWeight(fmt, (rows, cols), w[keep], ct.pack(keep), torch.cumsum(counts, 0) - counts)
    if fmt != BITMASK_24:
        raise ValueError(f"unknown sparse format {fmt!r}: use {BITMASK} or {BITMASK_24}")
    if not is_24_sparse(w):
        raise ValueError(f"a {rows}x{cols} weight is not 2:4 sparse: it cannot be stored as {BITMASK_24}")
    groups = keep.reshape(rows, cols // 4, 4)
    # Every group stores exactly two entries: its nonzeros, then its first zeros.
    missing = 2 - groups.sum(-1, keepdim=True)
    zeros_before = torch.cumsum((~groups).to(torch.int8), -1)
    groups = groups | (~groups & (zeros_before <= missing))
    keep = groups.reshape(rows, cols)
    return CompressedWeight(fmt, (rows, cols), w[keep].reshape(rows, cols // 2), ct.pack(keep))


# -- which linears, which format, what config.json says -----------------------------------------

def worth_compressing(weight: Tensor) -> bool:
    """Whether the bitmask form of ``weight`` is smaller than the dense one: the values
    kept plus one bit per entry (and one offset per row) against every entry."""
    rows, cols = weight.shape
    es = weight.element_size()
    nnz = int((weight != 0).sum())
    return nnz * es + rows * ((cols + 7) // 8) + rows * 8 < rows * cols * es


def format_for(weights) -> str:
    """``sparse-24-bitmask`` when every weight in ``weights`` (an iterable, consumed lazily
    until one fails) is 2:4 sparse, ``sparse-bitmask`` otherwise. The 2:4 format knows only
    2:4; other and mixed N:M patterns are stored as bitmasks, which hold any pattern."""
    return BITMASK_24 if all(is_24_sparse(w) for w in weights) else BITMASK


def model_format(model: torch.nn.Module, runtime) -> str:
    """:func:`format_for` the prunable linears of ``model``, gathered one decoder layer at a
    time through ``runtime`` (every rank sees the same gathered weights, so every rank
    reaches the same answer)."""
    from .modeling import decoder_layers, layer_linears

    for layer in decoder_layers(model):
        with runtime.gathered(layer):
            if format_for(lin.weight.detach() for lin in layer_linears(layer).values()) == BITMASK:
                return BITMASK
    return BITMASK_24


class CompressionStats:
    """What the config and the size report need, accumulated tensor by tensor (so a
    streamed export never holds more than one group): zeros over all parameters (the
    ``global_sparsity`` llm-compressor records), and for every weight-bearing module whether
    it was compressed, with its dense and stored bytes."""

    def __init__(self):
        self.zeros = 0
        self.numel = 0
        self.modules: dict[str, dict] = {}

    def add_param(self, tensor: Tensor) -> None:
        self.zeros += int((tensor == 0).sum())
        self.numel += tensor.numel()

    def add_module(self, name: str, kind: str, compressed: bool, dense_bytes: int, stored_bytes: int) -> None:
        self.modules[name] = {"type": kind, "compressed": compressed, "dense_bytes": dense_bytes,
                              "stored_bytes": stored_bytes}

    def merge(self, other: "CompressionStats") -> None:
        self.zeros += other.zeros
        self.numel += other.numel
        self.modules.update(other.modules)

    def to_dict(self) -> dict:
        return {"zeros": self.zeros, "numel": self.numel, "modules": self.modules}

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionStats":
        s = cls()
        s.zeros, s.numel, s.modules = d["zeros"], d["numel"], dict(d["modules"])
        return s

    def targets_and_ignore(self) -> tuple[list[str], list[str]]:
        """llm-compressor's reduction: per module type, the type name when at least half of
        its modules are compressed (with the others listed in ``ignore``), else the
        compressed modules by name; types with nothing compressed are left out."""
        by_type: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for name, m in self.modules.items():
            by_type[m["type"]][0 if m["compressed"] else 1].append(name)
        targets, ignore = [], []
        for kind, (done, skipped) in sorted(by_type.items()):
            if not done:
                continue
            targets.extend([kind] if len(done) >= len(skipped) else done)
            ignore.extend(skipped)
        return targets, ignore

    def size_report(self) -> dict:
        """Stored bytes against dense bytes: per linear kind (the module name without its
        layer index, e.g. ``mlp.up_proj``) over the compressed linears, and in total."""
        kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, m in self.modules.items():
            if m["compressed"]:
                kind = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
                kinds[kind][0] += m["stored_bytes"]
                kinds[kind][1] += m["dense_bytes"]
        stored = sum(v[0] for v in kinds.values())
        dense = sum(v[1] for v in kinds.values())
        return {"per_kind": {k: {"stored_bytes": s, "dense_bytes": d, "ratio": s / d} for k, (s, d) in kinds.items()},
                "compressed_linears": {"stored_bytes": stored, "dense_bytes": dense,
                                       "ratio": stored / dense if dense else None}}


def quantization_config(fmt: str, stats: CompressionStats) -> dict:
    """The ``quantization_config`` entry of config.json, with the keys and values that
    llm-compressor's save (through compressed-tensors' ``ModelCompressor.update_config``)
    wrote for a sparse-only model."""
    ct = _ct()
    targets, ignore = stats.targets_and_ignore()
    structure = ct.Structure.TWO_FOUR.value if fmt == BITMASK_24 else ct.Structure.UNSTRUCTURED.value
    sparsity = ct.Config.load_from_registry(fmt, global_sparsity=stats.zeros / max(stats.numel, 1),
                                            sparsity_structure=structure, targets=targets, ignore=ignore)
    return {ct.version_key: ct.version, ct.method_key: ct.method, ct.sparsity_key: sparsity.model_dump(),
            ct.transform_key: {}}


def write_quantization_config(out_dir: Path, fmt: str, stats: CompressionStats) -> dict:
    """Add the compression config to ``out_dir/config.json`` (sorted keys, indent 2, as
    llm-compressor rewrites it)."""
    from .outputs import write_json_atomic

    path = Path(out_dir) / "config.json"
    data = json.loads(path.read_text())
    entry = quantization_config(fmt, stats)
    data[_ct().config_name] = entry
    write_json_atomic(path, dict(sorted(data.items())))
    return entry


class GroupCompressor:
    """Compresses the tensors of one parameter group (a gathered decoder layer, or the rest)
    as they go into a shard: the target linears' weights in ``fmt`` when that makes them
    smaller, everything else as it is. ``targets`` are module names (``model.layers.0.mlp.up_proj``)
    and ``module_types`` maps every weight-bearing module name to its class name."""

    def __init__(self, fmt: str, targets: set[str], module_types: dict[str, str]):
        if fmt not in FORMATS:
            raise LosaZeroError(f"unknown sparse format {fmt!r}: use {BITMASK} or {BITMASK_24}")
        self.format = fmt
        self.targets = set(targets)
        self.module_types = module_types
        self.stats = CompressionStats()

    def __call__(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, t in tensors.items():
            self.stats.add_param(t)
            module = name.rsplit(".", 1)[0]
            is_weight = name.endswith(".weight") and module in self.module_types
            if is_weight and module in self.targets and t.dim() == 2 and worth_compressing(t):
                try:
                    cw = compress_weight(t, self.format)
                except ValueError as exc:
                    raise LosaZeroError(f"{module}: {exc}; save with the sparse-bitmask format instead") from None
                out.update(cw.tensors(module))
                self.stats.add_module(module, self.module_types[module], True, t.numel() * t.element_size(),
                                      cw.nbytes)
            else:
                out[name] = t
                if is_weight:
                    nbytes = t.numel() * t.element_size()
                    self.stats.add_module(module, self.module_types[module], False, nbytes, nbytes)
        return out


    def finish(self, out_dir: Path, rank_stats: list[dict] | None = None) -> dict:
        """After the last shard: merge every rank's statistics (``rank_stats``, from
        ``stats.to_dict()``; just this one's when None), count the weight-bearing modules
        that were never stored (a tied head) as not compressed, and write the compression
        config into ``out_dir/config.json``. Returns the format and the size report."""
        stats = CompressionStats()
        for d in (rank_stats if rank_stats is not None else [self.stats.to_dict()]):
            stats.merge(CompressionStats.from_dict(d))
        for name, kind in self.module_types.items():
            if name not in stats.modules:
                stats.add_module(name, kind, False, 0, 0)
        entry = write_quantization_config(out_dir, self.format, stats)
        return {"format": self.format, "sparsity_config": entry["sparsity_config"], "sizes": stats.size_report()}


def compressor_for(model: torch.nn.Module, runtime) -> GroupCompressor:
    """The compressor of a model's export: its prunable linears, in ``sparse-24-bitmask``
    when all of them are 2:4, else ``sparse-bitmask``."""
    return GroupCompressor(model_format(model, runtime), *model_targets(model))


def model_targets(model: torch.nn.Module) -> tuple[set[str], dict[str, str]]:
    """The prunable linears of ``model`` (from the model's own layout) and the class name of
    every module that has a weight (for the config's targets / ignore lists)."""
    from .modeling import linear_full_names

    targets = set(linear_full_names(model))
    types = {}
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "weight", None), torch.Tensor):
            types[name] = "Linear" if isinstance(mod, torch.nn.Linear) or name in targets else type(mod).__name__
    return targets, types


# -- reading -------------------------------------------------------------------------------------

def sparsity_config(model_dir: str | os.PathLike) -> dict | None:
    """The ``sparsity_config`` of a compressed-tensors directory in one of the sparse formats
    this module reads; None for an ordinary (dense) directory. Quantized compressed-tensors
    models are refused with a message."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    qc = data.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return None
    if qc.get("config_groups"):
        raise LosaZeroError(f"{model_dir} is a quantized compressed-tensors model: losa-zero reads only the "
                            f"sparse formats ({', '.join(FORMATS)}); dequantize it first")
    sc = qc.get("sparsity_config") or {}
    fmt = sc.get("format", "dense")
    if fmt in (None, "dense"):
        return None
    if fmt not in FORMATS:
        raise LosaZeroError(f"{model_dir} uses the compressed-tensors format {fmt!r}: losa-zero reads "
                            f"{', '.join(FORMATS)}")
    return sc


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise LosaZeroError(f"{model_dir} has no model.safetensors(.index.json): pass a folder saved in safetensors")


def read_compressed_linears(model_dir: str | os.PathLike) -> Iterator[tuple[str, CompressedWeight | Tensor]]:
    """Every tensor of a compressed-tensors sparse directory, shard by shard: ``(module name,
    CompressedWeight)`` for a compressed linear (bitmask and packed values as stored, not
    decompressed) and ``(parameter name, tensor)`` for everything else. An ordinary dense
    directory yields only the latter. One shard is read at a time."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    sc = sparsity_config(model_dir)
    fmt = sc["format"] if sc else None
    suffixes = set(PARAM_NAMES[fmt]) if fmt else set()
    for path in _shard_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            compressed_modules = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".bitmask")} if fmt else set()
            for module in sorted(compressed_modules):
                parts = {s: f.get_tensor(f"{module}.{s}") for s in PARAM_NAMES[fmt] if f"{module}.{s}" in keys}
                if set(parts) != set(PARAM_NAMES[fmt]):
                    raise LosaZeroError(f"{path.name}: {module} lacks {sorted(set(PARAM_NAMES[fmt]) - set(parts))} "
                                        f"of the {fmt} format: the file is damaged")
                yield module, CompressedWeight.from_tensors(fmt, parts)
            for k in keys:
                module, suffix = k.rsplit(".", 1) if "." in k else ("", k)
                if module in compressed_modules and suffix in suffixes:
                    continue
                yield k, f.get_tensor(k)


def dense_state_dict(model_dir: str | os.PathLike, meta: bool = False) -> dict[str, Tensor]:
    """The dense state dict of a (compressed or dense) directory: compressed linears are
    decompressed to ``MODULE.weight``. ``meta``: shapes and dtypes only (what the ranks
    other than 0 pass to transformers' ZeRO-3 loading, which reads values on rank 0)."""
    out = {}
    for name, item in read_compressed_linears(model_dir):
        if isinstance(item, CompressedWeight):
            out[f"{name}.weight"] = (torch.empty(item.shape, dtype=item.values.dtype, device="meta") if meta
                                     else item.to_dense())
        else:
            out[name] = item.to("meta") if meta else item
    return out


def load_compressed_model(model_dir: Path, config, dtype: torch.dtype, **kwargs):
    """A causal LM from a compressed-tensors sparse directory, decompressed while loading.
    transformers 5 (with compressed-tensors >= 0.15) no longer decompresses the sparse
    formats itself, so the state dict is decompressed here and handed to ``from_pretrained``
    with the compression entry removed from the config. Under ZeRO-3 only rank 0 holds the
    values, as in transformers' own ZeRO-3 loading."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    meta = False
    if is_deepspeed_zero3_enabled():
        import torch.distributed as dist

        meta = dist.is_initialized() and dist.get_rank() != 0
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    kwargs.pop("trust_remote_code", None)  # the supported architectures are transformers' own
    cls = AutoModelForCausalLM._model_mapping[type(config)]  # the Auto class cannot load from a state dict alone
    model = cls.from_pretrained(None, config=config, state_dict=dense_state_dict(model_dir, meta), dtype=dtype,
                                **kwargs)
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model
