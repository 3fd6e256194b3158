"""Loading, inspecting and saving the decoder-only causal LMs losa-zero compresses.

Every pruner walks the same structure: a stack of decoder layers, and in each layer the
target linears in application order. Where the stack is and what the linears are called
comes from the model's architecture entry (:mod:`losa_zero.architectures`); anything not
in that registry would be silently mis-pruned (or not pruned at all), so it is rejected up
front with a clear message instead.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from .architectures import architecture_of, architecture_of_layer, supported_list
from .errors import LosaZeroError


def check_supported(config) -> None:
    """Reject architectures whose module layout the pruners do not understand."""
    architecture_of(config)


def attn_implementation_for(config, requested: str | None = None) -> str:
    """The attention implementation to load ``config``'s model with.

    ``None`` picks the architecture's default (SDPA: exact, same math as eager, and the
    memory-frugal path on CPU and GPU; eager for Gemma 2, whose soft-capped attention
    logits SDPA cannot compute). Flash-attention needs its package, so asking for it
    without the ``[gpu]`` extra fails here, before any weight is read.
    """
    arch = architecture_of(config)
    if requested is None:
        return arch.attn_implementations[0]
    if requested not in arch.attn_implementations:
        raise LosaZeroError(f"attn_implementation {requested!r} is not available for {arch.model_type}: "
                            f"choose one of {', '.join(arch.attn_implementations)}")
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise LosaZeroError("attn_implementation flash_attention_2 needs the flash-attn package: "
                            "install losa-zero[gpu] on a CUDA machine, or use sdpa")
    return requested


def _check_model_dir(path: str | os.PathLike) -> Path:
    """Fail with a one-line message before transformers tries (and fails) to reach a hub."""
    p = Path(path)
    if not p.exists():
        raise LosaZeroError(f"model directory {p} does not exist: pass a local folder made by save_pretrained")
    if not p.is_dir():
        raise LosaZeroError(f"model path {p} is not a directory: pass a local folder made by save_pretrained")
    if not (p / "config.json").is_file():
        raise LosaZeroError(f"model directory {p} has no config.json: pass a folder made by save_pretrained")
    return p


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """Load the tokenizer saved next to the model (local files only)."""
    from transformers import AutoTokenizer

    p = _check_model_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LosaZeroError(f"cannot load a tokenizer from {p} ({type(exc).__name__}): save one there with save_pretrained") from exc
    return tok


#: the weight dtypes a run may use (``--dtype``), by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> str:
    """``--dtype``, with ``auto`` made concrete for the device the run computes on: bfloat16
    on a GPU (tensor-core matmuls, half the weight memory: a 7B model fits one 80 GB GPU with
    room for LoSA's working set), float32 on CPU (where bf16 matmuls are no faster and only
    lose precision). Resolved where the device is known, so it follows the device a backend
    actually chose (``--device auto``, the ZeRO-3 launcher's binding)."""
    if name != "auto":
        return name
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"

def read_config(path: Path, trust_remote_code: bool = False):
    """The model's ``config.json`` as a transformers config, or a one-line error: a config
    that asks for the model's own Python code (``auto_map``) is refused, never run."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise LosaZeroError(f"{Path(path) / 'config.json'} asks for the model's own Python code (auto_map), "
                                f"which losa-zero never runs: use a model of a supported architecture "
                                f"({supported_list()})") from exc
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LosaZeroError(f"cannot read {Path(path) / 'config.json'} ({first}): pass a folder made by "
                            "save_pretrained") from exc


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """Load ``(model, tokenizer)`` from a local directory, in eval mode; ``dtype`` is a
    torch dtype or a name in :data:`DTYPES`.

    The config is read and checked first: loading weights of a multi-billion-parameter
    model only to reject its architecture afterwards would waste minutes and memory.
    ``attn_implementation`` is resolved by :func:`attn_implementation_for`.
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    p = _check_model_dir(path)
    config = read_config(p, trust_remote_code)
    attn = attn_implementation_for(config, attn_implementation)
    from .compressed import load_compressed_model, sparsity_config

    try:
        if sparsity_config(p) is not None:  # a compressed-tensors sparse directory
            model = load_compressed_model(p, config, dtype, trust_remote_code=trust_remote_code,
                                          attn_implementation=attn)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                p,
                dtype=dtype,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn,
            )
    except OSError as exc:
        raise LosaZeroError(f"cannot load model weights from {p}: {exc}".splitlines()[0]) from exc
    except pickle.UnpicklingError as exc:
        raise LosaZeroError(f"the weights in {p} are a pickle that torch refuses to load safely (it would run "
                            "code from the file): convert them to safetensors with a trusted tool") from exc
    except Exception as exc:  # safetensors raises its own error type for damaged files
        if type(exc).__name__ != "SafetensorError":
            raise
        first = str(exc).splitlines()[0]
        raise LosaZeroError(f"the safetensors weights in {p} are damaged or truncated ({first}): copy or export "
                            "the model again") from exc
    model.eval()
    tokenizer = load_tokenizer(p, trust_remote_code=trust_remote_code)
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers of a supported causal LM (where its architecture says)."""
    arch = architecture_of(model.config)
    try:
        layers = model.get_submodule(arch.layers)
    except AttributeError as exc:
        raise LosaZeroError(f"{type(model).__name__} has no {arch.layers}: losa-zero supports the causal LMs of "
                            f"{supported_list()}") from exc
    return layers


def input_groups(layer: nn.Module) -> list[tuple[str, ...]]:
    """The layer's target linear names (relative to the layer, in application order)
    grouped by shared input: LLaMA ``[(q, k, v), (o,), (gate, up), (down,)]``, Phi-3
    ``[(qkv,), (o,), (gate_up,), (down,)]``. One input statistic serves a whole group."""
    return [tuple(lin.name for lin in group) for group in architecture_of_layer(layer).input_groups]


def target_names(model: nn.Module) -> tuple[str, ...]:
    """The target linear names of every decoder layer of ``model`` (relative to a layer)."""
    return architecture_of(model.config).target_names


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The prunable projections of one decoder layer, keyed by name, in application order.

    A plain ``nn.Linear`` in the layer that its architecture does not list means a variant
    the registry does not describe; it is refused rather than left dense without a word."""
    arch = architecture_of_layer(layer)
    out: dict[str, nn.Module] = {}
    for name in arch.target_names:
        try:
            out[name] = layer.get_submodule(name)
        except AttributeError as exc:
            raise LosaZeroError(f"{type(layer).__name__} has no {name}: its layout differs from the "
                                f"{arch.model_type} entry of losa_zero.architectures") from exc
    extra = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n not in out]
    if extra:
        raise LosaZeroError(f"{type(layer).__name__} has linears {', '.join(extra)} that the {arch.model_type} "
                            "entry of losa_zero.architectures does not list")
    return out


def linear_full_name(model: nn.Module, layer: int, name: str) -> str:
    """The fully qualified name (``model.layers.0.self_attn.q_proj``) of one target linear."""
    return f"{architecture_of(model.config).layers}.{layer}.{name}"


def linear_full_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every target linear, layer by layer; these are the keys used
    in masks, reports and sparsity allocations."""
    n, names = len(decoder_layers(model)), target_names(model)
    return [linear_full_name(model, i, name) for i in range(n) for name in names]


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, max_shard_size: str | int = "5GB") -> Path:
    """Save model and tokenizer as safetensors into ``out_dir`` (created if needed).

    Safetensors refuses tensors that share storage unless the model declares them tied,
    and pruning code may have replaced ``lm_head.weight`` with a fresh Parameter. Re-tying
    before saving keeps tied checkpoints tied (one copy on disk, same values after reload).
    Atomicity is left to :func:`losa_zero.outputs.atomic_output_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if emb is not None and head is not None and head.weight is not emb.weight:
            if not torch.equal(head.weight.detach().cpu(), emb.weight.detach().cpu()):
                raise LosaZeroError(
                    "model config says tie_word_embeddings but lm_head and embed_tokens differ: "
                    "set config.tie_word_embeddings=False before saving"
                )
            head.weight = emb.weight
    import inspect

    kwargs = {"max_shard_size": max_shard_size}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(out, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
