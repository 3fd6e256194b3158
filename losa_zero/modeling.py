"""Loading, inspecting and saving LLaMA-layout causal LMs.

Every pruner in this package walks the same structure: ``model.model.layers[i]`` with the
seven projections named in :data:`TARGET_LINEARS`. LLaMA, Mistral and Qwen2 share that
layout; anything else would be silently mis-pruned (or not pruned at all), so it is
rejected up front with a clear message instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from losa_zero.errors import LosaZeroError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Names relative to one decoder layer, in the order the layer applies them (attention,
# then MLP). Order matters: sequential pruners calibrate each sublayer on the outputs of
# the already-pruned ones.
TARGET_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def check_supported(config) -> None:
    """Reject architectures whose module layout the pruners do not understand."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LosaZeroError(
            f"model type {model_type!r} is not supported: losa-zero supports the LLaMA layout "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )


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


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` from a local directory, in eval mode; ``dtype`` is a
    torch dtype or a name in :data:`DTYPES`.

    The config is read and checked first: loading weights of a multi-billion-parameter
    model only to reject its architecture afterwards would waste minutes and memory.
    SDPA attention is requested because it is exact (same math as eager) and is the
    memory-frugal path on both CPU and GPU.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    p = _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise LosaZeroError(f"cannot read {p / 'config.json'} ({exc}): pass a folder made by save_pretrained") from exc
    check_supported(config)
    from .compressed import load_compressed_model, sparsity_config

    try:
        if sparsity_config(p) is not None:  # a compressed-tensors sparse directory
            model = load_compressed_model(p, config, dtype, trust_remote_code=trust_remote_code,
                                          attn_implementation="sdpa")
        else:
            model = AutoModelForCausalLM.from_pretrained(
                p,
                dtype=dtype,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                attn_implementation="sdpa",
            )
    except OSError as exc:
        raise LosaZeroError(f"cannot load model weights from {p}: {exc}".splitlines()[0]) from exc
    model.eval()
    tokenizer = load_tokenizer(p, trust_remote_code=trust_remote_code)
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers (``model.model.layers``) of a supported causal LM."""
    try:
        layers = model.model.layers
    except AttributeError as exc:
        raise LosaZeroError(
            f"{type(model).__name__} has no model.layers: losa-zero supports the LLaMA layout "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        ) from exc
    return layers


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The prunable projections of one decoder layer, keyed by :data:`TARGET_LINEARS` name."""
    out: dict[str, nn.Module] = {}
    for name in TARGET_LINEARS:
        try:
            out[name] = layer.get_submodule(name)
        except AttributeError as exc:
            raise LosaZeroError(
                f"decoder layer has no {name}: losa-zero supports the LLaMA layout ({', '.join(SUPPORTED_MODEL_TYPES)})"
            ) from exc
    return out


def input_groups(layer: nn.Module) -> list[tuple[str, ...]]:
    """The layer's target linears grouped by the input they read, in order (names relative
    to the layer): linears of one group see the same activations, so they share one set of
    calibration statistics (one Wanda norm, one SparseGPT Hessian and its factorisation)."""
    layer_linears(layer)  # the layout check
    return list(_INPUT_GROUPS)


# LLaMA layout: q/k/v read the attention input, gate/up the MLP input.
_INPUT_GROUPS = (TARGET_LINEARS[0:3], TARGET_LINEARS[3:4], TARGET_LINEARS[4:6], TARGET_LINEARS[6:7])


def linear_full_names(model: nn.Module) -> list[str]:
    """Fully qualified names (``model.layers.0.self_attn.q_proj``...) of every target linear,
    layer by layer; these are the keys used in masks, reports and sparsity allocations."""
    n = len(decoder_layers(model))
    return [f"model.layers.{i}.{name}" for i in range(n) for name in TARGET_LINEARS]


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
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

    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(out, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
