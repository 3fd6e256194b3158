"""The decoder architectures losa-zero compresses, as data.

Every algorithm in the package walks the same thing: a stack of decoder layers, and in
each layer a few linears, pruned in the order the layer applies them (sequential pruners
calibrate each linear on the outputs of the already-pruned ones), some of which read the
same input (q/k/v, gate/up: one input statistic serves the whole group). What differs
between architectures is only where the stack is, what the linears are called and how
their widths follow from the config; one :class:`Architecture` per ``model_type`` says so,
and :data:`ARCHITECTURES` is the one registry. Supporting a new LLaMA-like decoder is one
entry here plus a tiny-model test in ``tests/test_architectures.py``.

Widths are named, not numbers: ``hidden`` (``hidden_size``), ``q`` (attention heads x head
dim), ``kv`` (key/value heads x head dim) and ``ffn`` (``intermediate_size``). A linear's
width is a tuple of names summed (Phi-3's fused ``qkv_proj`` writes ``q + kv + kv``), so
the planner reads layer shapes from here too and no formula assumes LLaMA's seven linears.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import LosaZeroError

@dataclass(frozen=True)
class Linear:
    """One target linear of a decoder layer: its name relative to the layer and its
    (input, output) widths as tuples of width names, summed."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    """Where the decoder layers are and what to prune in each of them.

    ``input_groups`` lists the target linears in application order, grouped by shared
    input. ``attn_implementations`` are those the architecture computes exactly, the first
    being the default (Gemma 2's attention-logit soft-capping has no SDPA kernel, so it
    runs eager unless flash-attention is requested). ``norms`` is how many hidden-wide
    normalisations a layer applies and ``head_norms`` whether q and k are normalised per
    head (Qwen3, Gemma 3): the planner counts what autograd saves from them.
    """

    model_type: str
    layer_class: str
    input_groups: tuple[tuple[Linear, ...], ...]
    layers: str = "model.layers"
    attn_implementations: tuple[str, ...] = ("sdpa", "flash_attention_2", "eager")
    norms: int = 2
    head_norms: bool = False

    @property
    def linears(self) -> tuple[Linear, ...]:
        return tuple(lin for group in self.input_groups for lin in group)

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)


#: LLaMA's layout: separate q/k/v reading the normalised input, o reading the attention
#: output, gate/up reading the normalised input, down reading the gated product. Biases
#: (Qwen2's q/k/v) do not change it.
_SPLIT_LAYOUT = (
    (Linear("self_attn.q_proj", ("hidden",), ("q",)),
     Linear("self_attn.k_proj", ("hidden",), ("kv",)),
     Linear("self_attn.v_proj", ("hidden",), ("kv",))),
    (Linear("self_attn.o_proj", ("q",), ("hidden",)),),
    (Linear("mlp.gate_proj", ("hidden",), ("ffn",)),
     Linear("mlp.up_proj", ("hidden",), ("ffn",))),
    (Linear("mlp.down_proj", ("ffn",), ("hidden",)),),
)


_FUSED_LAYOUT = (  # Phi-3: q/k/v and gate/up are one linear each
    (Linear("self_attn.qkv_proj", ("hidden",), ("q", "kv", "kv")),),
    (Linear("self_attn.o_proj", ("q",), ("hidden",)),),
    (Linear("mlp.gate_up_proj", ("hidden",), ("ffn", "ffn")),),
    (Linear("mlp.down_proj", ("ffn",), ("hidden",)),),
)

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "LlamaDecoderLayer", _SPLIT_LAYOUT),
    Architecture("mistral", "MistralDecoderLayer", _SPLIT_LAYOUT),
    Architecture("qwen2", "Qwen2DecoderLayer", _SPLIT_LAYOUT),
    Architecture("qwen3", "Qwen3DecoderLayer", _SPLIT_LAYOUT, head_norms=True),
    Architecture("gemma2", "Gemma2DecoderLayer", _SPLIT_LAYOUT, norms=4,
                 attn_implementations=("eager", "flash_attention_2")),
    Architecture("gemma3_text", "Gemma3DecoderLayer", _SPLIT_LAYOUT, norms=4, head_norms=True),
    Architecture("phi3", "Phi3DecoderLayer", _FUSED_LAYOUT),
)}

SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
_BY_LAYER_CLASS = {a.layer_class: a for a in ARCHITECTURES.values()}


def supported_list() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def architecture_of(config) -> Architecture:
    """The registry entry of a transformers config (or anything with ``model_type``)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise LosaZeroError(f"model type {model_type!r} is not supported: losa-zero supports {supported_list()}")
    return arch


def architecture_of_layer(layer) -> Architecture:
    """The registry entry a decoder layer belongs to, found from its class (the way
    llm-compressor names its sequential targets)."""
    arch = _BY_LAYER_CLASS.get(type(layer).__name__)
    if arch is None:
        raise LosaZeroError(f"{type(layer).__name__} is not a decoder layer losa-zero knows: "
                            f"supported model types are {supported_list()}")
    return arch


@dataclass(frozen=True)
class Widths:
    """The named widths of one model's config (see the module docstring)."""

    hidden: int
    q: int
    kv: int
    ffn: int

    def of(self, names: tuple[str, ...]) -> int:
        return sum(getattr(self, n) for n in names)


def widths(config) -> Widths:
    """Widths from a config object or a ``config.json`` dict. ``head_dim`` is read where the
    config gives it (Gemma, Qwen3 set it independently of hidden / heads)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or hidden // heads)
    return Widths(hidden=hidden, q=heads * head_dim, kv=kv_heads * head_dim, ffn=int(get("intermediate_size")))


def linear_shapes(arch: Architecture, w: Widths) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every target linear of one layer, in application order."""
    return {lin.name: (w.of(lin.inputs), w.of(lin.outputs)) for lin in arch.linears}
