"""The last library stack that still compresses and decompresses sparse models itself, as an
independent reference for losa-zero's compressed export.

compressed-tensors removed its sparse compressors in 0.15, and transformers 5 requires
0.15 or later, so neither transformers 5 nor current llm-compressor writes or reads the
sparse-bitmask formats any more. transformers 4.57.6 with compressed-tensors 0.14.0.1 and
llm-compressor 0.10.0.4 (its last release on that compressed-tensors) do. This script
keeps them in a virtualenv of their own that sees the main environment's packages (torch
and the rest) and adds only those three (plus the hub client and tokenizers they need)::

    python bench/ct_reference.py --create          # one-off, about a minute
    VENV/bin/python bench/ct_reference.py load DIR OUT.safetensors
    VENV/bin/python bench/ct_reference.py llmc-save DENSE_DIR OUT_DIR
    VENV/bin/python bench/ct_reference.py load DIR OUT llmc-save DENSE_DIR OUT_DIR ...   # several, in order

``load`` is plain ``AutoModelForCausalLM.from_pretrained(DIR)`` (the library decompresses),
saving the loaded state dict; ``llmc-save`` saves a dense sparse model the way
llm-compressor does (its ``save_pretrained`` wrapper, with the sparsity config its own
metadata helper infers: ``sparse-24-bitmask`` for 2:4; for other sparsity, which
llm-compressor would save dense, the same inferred config with the ``sparse-bitmask``
format). Command number i prints ``result i: `` and what it did (how it loaded, the format
it saved). tests/test_compressed.py uses it when the virtualenv exists.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

VENV = Path(os.environ.get("LOSA_ZERO_CT_REFERENCE_VENV", Path.home() / ".cache" / "losa-zero" / "ct014-venv"))
PINS = ["transformers==4.57.6", "compressed-tensors==0.14.0.1", "llmcompressor==0.10.0.4",
        "tokenizers==0.22.1", "huggingface-hub==0.36.0", "datasets==4.4.1"]


def python() -> Path | None:
    """The reference virtualenv's interpreter, or None when it has not been created."""
    py = VENV / "bin" / "python"
    return py if py.exists() else None


def create() -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    py = VENV / "bin" / "python"
    # --no-deps: everything else comes from the main environment, whose torch must stay
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", *PINS], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "httpx<1"], check=True)
    subprocess.run([str(py), "-c", "import transformers, compressed_tensors, llmcompressor"], check=True)
    return py


def load(model_dir: str, out: str) -> str:
    """sparse-24-bitmask: plain ``from_pretrained``. sparse-bitmask: the library's own
    decompressor (``ModelCompressor.from_pretrained(DIR)``, then its sparsity compressor's
    ``decompress``), because compressed-tensors 0.14 fails inside ``from_pretrained`` on that
    format (its bitmask compressor cannot size meta tensors)."""
    import json

    from safetensors.torch import save_file

    fmt = json.loads((Path(model_dir) / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"]
    if fmt == "sparse-24-bitmask":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype="auto")
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        how = "AutoModelForCausalLM.from_pretrained"
    else:
        from compressed_tensors import ModelCompressor

        compressor = ModelCompressor.from_pretrained(model_dir)
        state = {k: v.contiguous() for k, v in compressor.sparsity_compressor.decompress(model_dir)}
        how = "ModelCompressor.from_pretrained(...).sparsity_compressor.decompress"
    save_file(state, out)
    return how


def llmc_save(dense_dir: str, out: str) -> str:
    from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained
    from llmcompressor.transformers.compression.sparsity_metadata_config import SparsityConfigMetadata
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense_dir, torch_dtype="auto")
    config = SparsityConfigMetadata.from_pretrained(model, compress=True)
    if config.format == CompressionFormat.dense.value:
        fields = config.model_dump(exclude={"format", "registry_requires_subclass"})
        config = SparsityCompressionConfig.load_from_registry(CompressionFormat.sparse_bitmask.value, **fields)
    modify_save_pretrained(model)
    model.save_pretrained(out, sparsity_config=config, save_compressed=True)
    for f in Path(dense_dir).glob("tokenizer*"):  # written by transformers 5: copied, not re-read by 4.57
        shutil.copy2(f, Path(out) / f.name)
    return config.format


COMMANDS = {"load": load, "llmc-save": llmc_save}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--create"]:
        print(create())
    elif args and len(args) % 3 == 0 and all(c in COMMANDS for c in args[::3]):
        # several commands in one process (the tests): the libraries are imported once
        for i in range(0, len(args), 3):
            print(f"result {i // 3}: {COMMANDS[args[i]](*args[i + 1:i + 3])}", flush=True)
    else:
        raise SystemExit(__doc__)
