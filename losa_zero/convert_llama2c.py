"""Convert a llama2.c "legacy" checkpoint (e.g. stories260K) into a transformers folder.

Why this exists: no model hub is reachable from where the tests and demo run, yet the
pruners must be exercised on a *real* pretrained LLaMA-architecture model (random weights
have no structure for Wanda/SparseGPT to exploit, so they would test nothing). The tiny
llama2.c TinyStories models are real, MIT-licensed and a few hundred KB.

Legacy file layout: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
vocab_size, seq_len), then float32 arrays: token embedding, attention rmsnorm, wq, wk,
wv, wo, ffn rmsnorm, w1, w2, w3, final rmsnorm, rotary cos/sin tables and, only when
vocab_size is negative, a separate classifier matrix.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from losa_zero.errors import LosaZeroError
from losa_zero.outputs import atomic_output_dir

_HEADER = struct.Struct("<7i")
_SMOKE_TEXT = "Once upon a time"


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k output rows from llama2.c's interleaved rotary pairs to HF's halves.

    llama2.c rotates adjacent pairs (0,1), (2,3)...; transformers' ``rotate_half`` pairs
    row i with row i + head_dim/2. Without this permutation the converted model runs but
    produces gibberish, because position information is applied to the wrong coordinates.
    """
    dim_out, dim_in = w.shape
    head_dim = dim_out // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim_in).transpose(1, 2).reshape(dim_out, dim_in)


def _read_header(checkpoint: Path) -> dict:
    size = checkpoint.stat().st_size
    if size < _HEADER.size:
        raise LosaZeroError(f"{checkpoint} is too small to be a llama2.c checkpoint: pass a legacy (version 0) .bin")
    with open(checkpoint, "rb") as fh:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack(fh.read(_HEADER.size))
    shared = vocab > 0
    vocab = abs(vocab)
    ok = (
        0 < dim <= 65536
        and 0 < hidden <= 1 << 20
        and 0 < n_layers <= 1024
        and 0 < n_heads <= dim
        and dim % n_heads == 0
        and (dim // n_heads) % 2 == 0
        and 0 < n_kv_heads <= n_heads
        and n_heads % n_kv_heads == 0
        and 0 < vocab <= 1 << 22
        and 0 < seq_len <= 1 << 20
    )
    if not ok:
        raise LosaZeroError(
            f"{checkpoint} has an invalid llama2.c header (dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, "
            f"n_heads={n_heads}, n_kv_heads={n_kv_heads}, vocab_size={vocab}, seq_len={seq_len}): "
            "pass a llama2.c legacy (version 0) checkpoint"
        )
    return dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                vocab=vocab, seq_len=seq_len, shared=shared, size=size)


def _read_weights(checkpoint: Path, h: dict) -> dict[str, torch.Tensor]:
    d, hd, L, V = h["dim"], h["hidden"], h["n_layers"], h["vocab"]
    head_dim = d // h["n_heads"]
    kv_dim = h["n_kv_heads"] * head_dim
    shapes = [
        ("tok_emb", (V, d)),
        ("rms_att", (L, d)),
        ("wq", (L, d, d)),
        ("wk", (L, kv_dim, d)),
        ("wv", (L, kv_dim, d)),
        ("wo", (L, d, d)),
        ("rms_ffn", (L, d)),
        ("w1", (L, hd, d)),
        ("w2", (L, d, hd)),
        ("w3", (L, hd, d)),
        ("rms_final", (d,)),
        ("freq_cis_real", (h["seq_len"], head_dim // 2)),
        ("freq_cis_imag", (h["seq_len"], head_dim // 2)),
    ]
    if not h["shared"]:
        shapes.append(("wcls", (V, d)))
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    expected = _HEADER.size + 4 * n_floats
    if h["size"] != expected:
        raise LosaZeroError(
            f"{checkpoint} is {h['size']} bytes but its header implies {expected}: the file is truncated or "
            "not a llama2.c legacy (version 0) checkpoint"
        )
    flat = np.fromfile(checkpoint, dtype="<f4", offset=_HEADER.size)
    out, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(flat[pos:pos + n].reshape(shape).astype(np.float32, copy=True))
        pos += n
    return out


def _build_tokenizer(tokenizer_model: Path):
    """Build a LlamaTokenizer from a SentencePiece ``.model`` file.

    transformers 5 trap: ``LlamaTokenizer(vocab_file=...)`` silently yields an empty
    vocabulary (every text encodes to ``[]``). Loading from a folder that holds the file
    under its canonical name ``tokenizer.model`` goes through the proper SentencePiece
    conversion, so that is what we do.
    """
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory(prefix="losa-zero-tok-") as folder:
        shutil.copyfile(tokenizer_model, Path(folder) / "tokenizer.model")
        try:
            tok = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, local_files_only=True)
        except Exception as exc:  # sentencepiece parse errors have many types
            raise LosaZeroError(
                f"cannot read {tokenizer_model} as a SentencePiece model ({type(exc).__name__}): pass the .model file "
                "that belongs to the checkpoint"
            ) from exc
    return tok


def convert_llama2c(checkpoint: str | os.PathLike, tokenizer_model: str | os.PathLike,
                    out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a llama2.c legacy checkpoint + SentencePiece model into a HF folder at ``out_dir``.

    The result is a float32 ``LlamaForCausalLM`` plus tokenizer that load with plain
    ``AutoModelForCausalLM`` / ``AutoTokenizer``. The folder appears atomically, so an
    interrupted conversion never leaves a half-written model behind.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint, tokenizer_model, out_dir = Path(checkpoint), Path(tokenizer_model), Path(out_dir)
    if not checkpoint.is_file():
        raise LosaZeroError(f"llama2.c checkpoint {checkpoint} not found: pass the path of the .bin file")
    if not tokenizer_model.is_file():
        raise LosaZeroError(f"tokenizer model {tokenizer_model} not found: pass the SentencePiece .model file")
    if out_dir.exists() and not overwrite:  # fail before the (cheap but non-zero) work
        raise LosaZeroError(f"output directory {out_dir} already exists: choose another --out or pass --overwrite")

    h = _read_header(checkpoint)
    w = _read_weights(checkpoint, h)
    tok = _build_tokenizer(tokenizer_model)
    if len(tok) != h["vocab"]:
        raise LosaZeroError(
            f"tokenizer {tokenizer_model} has {len(tok)} pieces but the checkpoint expects {h['vocab']}: "
            "pass the tokenizer the model was trained with"
        )
    ids = tok("Once upon a time")["input_ids"]
    if not ids or ids[0] != 1 or len(ids) < 2:
        raise LosaZeroError(
            f"tokenizer built from {tokenizer_model} encodes {_SMOKE_TEXT!r} to {ids}: expected BOS (1) followed by "
            "tokens; this is the transformers 5 empty-vocabulary trap, check the transformers version"
        )

    config = LlamaConfig(
        vocab_size=h["vocab"],
        hidden_size=h["dim"],
        intermediate_size=h["hidden"],
        num_hidden_layers=h["n_layers"],
        num_attention_heads=h["n_heads"],
        num_key_value_heads=h["n_kv_heads"],
        max_position_embeddings=h["seq_len"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=h["shared"],
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32)
    nh, nkv = h["n_heads"], h["n_kv_heads"]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(w["tok_emb"])
        model.model.norm.weight.copy_(w["rms_final"])
        for i, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.copy_(w["rms_att"][i])
            layer.post_attention_layernorm.weight.copy_(w["rms_ffn"][i])
            layer.self_attn.q_proj.weight.copy_(_permute_rotary(w["wq"][i], nh))
            layer.self_attn.k_proj.weight.copy_(_permute_rotary(w["wk"][i], nkv))
            layer.self_attn.v_proj.weight.copy_(w["wv"][i])
            layer.self_attn.o_proj.weight.copy_(w["wo"][i])
            layer.mlp.gate_proj.weight.copy_(w["w1"][i])
            layer.mlp.down_proj.weight.copy_(w["w2"][i])
            layer.mlp.up_proj.weight.copy_(w["w3"][i])
        if h["shared"]:
            model.lm_head.weight = model.model.embed_tokens.weight
        else:
            model.lm_head.weight.copy_(w["wcls"])
    model.eval()

    from losa_zero.modeling import save_model

    with atomic_output_dir(out_dir, overwrite=overwrite,
                           inputs=[("the checkpoint", checkpoint), ("--tokenizer", tokenizer_model)]) as tmp:
        save_model(model, tok, tmp)
    return out_dir
