"""Tiny random models of every supported architecture, built from the real transformers
config classes, with the fixture's tokenizer (stories260K, vocab 512).

Every width is a multiple of 4 (2:4 applies everywhere) and every model that has
sliding-window attention gets a window of 16 tokens, so calibration sequences of 40+
tokens cross it and mixed sliding/full layers get different masks.
"""
from __future__ import annotations

from pathlib import Path

import torch

WINDOW = 16
_DIMS = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MIXED = ["sliding_attention", "full_attention", "sliding_attention"]


def tiny_config(kind: str):
    """The config of one tiny model. ``kind`` is a model_type, or ``llama3``/``llama3-untied``."""
    import transformers as tf

    d = dict(_DIMS)
    if kind in ("llama3", "llama3-untied"):
        return tf.LlamaConfig(**d, tie_word_embeddings=kind == "llama3",
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if kind == "mistral":
        return tf.MistralConfig(**d, sliding_window=WINDOW)
    if kind == "qwen2":  # layer 0 full attention, layers 1-2 sliding (max_window_layers)
        return tf.Qwen2Config(**d, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if kind == "qwen3":
        return tf.Qwen3Config(**d, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    if kind == "gemma2":
        return tf.Gemma2Config(**d, head_dim=16, sliding_window=WINDOW, layer_types=_MIXED)
    if kind == "gemma3_text":
        return tf.Gemma3TextConfig(**d, head_dim=16, sliding_window=WINDOW, layer_types=_MIXED)
    if kind == "phi3":
        return tf.Phi3Config(**d, sliding_window=WINDOW)
    raise ValueError(kind)


ALL_KINDS = ("llama3", "llama3-untied", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
#: kinds whose layers do not all get the same attention arguments
MIXED_KINDS = ("qwen2", "qwen3", "gemma2", "gemma3_text")


def tiny_model(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from losa_zero.modeling import attn_implementation_for

    cfg = tiny_config(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation_for(cfg))
    with torch.no_grad():  # random norms too (ones / zeros would hide a mis-applied norm)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_tiny_model(kind: str, out: Path, tokenizer_dir: Path) -> Path:
    """A saved tiny model with the fixture's tokenizer, as ``losa-zero`` commands load it."""
    from transformers import AutoTokenizer

    tiny_model(kind).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
