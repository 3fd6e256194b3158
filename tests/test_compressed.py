"""The compressed-tensors sparse export (``losa_zero.compressed``, ``losa-zero compress``).

References that do not share our code: the bitmask bits are decoded here by shifts (least
significant bit first, as compressed-tensors packs them), the dense weights come from the
dense export on disk, and the configs are checked key by key against what
compressed-tensors' own config classes dump. Loading with plain transformers and a model
saved by llm-compressor itself need the last stack that still has the sparse compressors
(tests/test_compressed_reference.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from losa_zero.compressed import (BITMASK, BITMASK_24, CompressedWeight, compress_weight, dense_state_dict,
                                  format_for, is_24_sparse, read_compressed_linears, sparsity_config)

REPO = Path(__file__).resolve().parents[1]


def _bits(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """Decode a packed bitmask by shifts: bit j % 8 of byte j // 8 is column j."""
    j = torch.arange(cols)
    return ((bitmask[:, j // 8].to(torch.int32) >> (j % 8)) & 1).bool()


def _sparse(rows, cols, rate, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    return w.masked_fill(torch.rand(rows, cols, generator=g) < rate, 0.0)


def _nm(rows, cols, n, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    groups = w.reshape(rows, cols // m, m)
    idx = groups.abs().topk(m - n, dim=-1, largest=False).indices
    return groups.scatter(-1, idx, 0.0).reshape(rows, cols).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_layout_and_round_trip(dtype):
    w = _sparse(37, 45, 0.7, dtype)  # widths that are not multiples of 8
    cw = compress_weight(w, BITMASK)
    keep = _bits(cw.bitmask, 45)
    assert cw.bitmask.dtype == torch.uint8 and tuple(cw.bitmask.shape) == (37, 6)
    assert torch.equal(keep, w != 0)
    assert torch.equal(cw.values, w[w != 0]) and cw.values.dtype == dtype
    counts = (w != 0).sum(1)
    assert torch.equal(cw.row_offsets, torch.cumsum(counts, 0) - counts)
    back = cw.to_dense()
    assert back.dtype == dtype
    assert torch.equal(back.float().view(torch.int32), w.float().view(torch.int32))  # bit for bit
    t = cw.tensors("model.layers.0.mlp.up_proj")
    assert sorted(t) == [f"model.layers.0.mlp.up_proj.{s}" for s in ("bitmask", "compressed", "row_offsets", "shape")]
    assert t["model.layers.0.mlp.up_proj.shape"].tolist() == [37, 45]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_24_layout_and_round_trip(dtype):
    w = _nm(16, 32, 2, 4, dtype)
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # a group with one nonzero
    w[1, 4:8] = 0.0  # and one with none
    assert is_24_sparse(w)
    cw = compress_weight(w, BITMASK_24)
    keep = _bits(cw.bitmask, 32)
    assert (keep.reshape(16, 8, 4).sum(-1) == 2).all()  # exactly two stored per group
    assert (keep | (w == 0)).all() and tuple(cw.values.shape) == (16, 16)
    assert keep[0, :4].tolist() == [True, False, False, True]  # nonzeros first, then the first zeros
    assert torch.equal(cw.values.reshape(-1), w[keep])
    assert torch.equal(cw.to_dense().float().view(torch.int32), w.float().view(torch.int32))
    t = cw.tensors("p")
    assert sorted(t) == ["p.bitmask", "p.compressed", "p.shape"] and tuple(t["p.shape"].shape) == (2, 1)


def test_24_refuses_a_weight_that_is_not_24():
    w = _nm(8, 16, 3, 4, torch.float32)
    assert not is_24_sparse(w)
    with pytest.raises(ValueError, match="not 2:4"):
        compress_weight(w, BITMASK_24)
    assert format_for([_nm(8, 16, 2, 4, torch.float32), w]) == BITMASK
    assert format_for([_nm(8, 16, 2, 4, torch.float32), _nm(8, 16, 1, 4, torch.float32)]) == BITMASK_24


def test_negative_zero_comes_back_as_zero():
    w = torch.tensor([[-0.0, 1.0, 0.0, -2.0]])
    back = compress_weight(w, BITMASK).to_dense()
    assert torch.equal(back, w) and not torch.signbit(back[0, 0])


# -- whole directories on the stories260K fixture ----------------------------------------------

def _prune(model_dir, out, calib, *args):
    from losa_zero.cli import main

    assert main(["-q", "prune", "--model", str(model_dir), "--calib", str(calib), "--nsamples", "4",
                 "--seqlen", "128", "--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def pruned_dirs(stories_model_dir, tinystories_split, tmp_path_factory):
    """Dense bf16 exports of stories260K: 50%, 70%, 2:4 and mixed N:4 (3,3,2,1,1 by layer)."""
    _, train = tinystories_split
    tmp = tmp_path_factory.mktemp("compressed")
    common = ["--method", "magnitude", "--dtype", "bfloat16"]
    return {
        "50%": _prune(stories_model_dir, tmp / "m50", train, *common, "--sparsity", "0.5"),
        "70%": _prune(stories_model_dir, tmp / "m70", train, *common, "--sparsity", "0.7"),
        "2:4": _prune(stories_model_dir, tmp / "m24", train, *common, "--nm", "2:4"),
        "mixed": _prune(stories_model_dir, tmp / "mnm", train, *common, "--nm", "3:4,3:4,2:4,1:4,1:4"),
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def compressed_dirs(pruned_dirs):
    from losa_zero.compress_command import compress_directory

    out = {}
    for key in ("50%", "70%", "2:4", "mixed"):
        dst = pruned_dirs["tmp"] / f"c-{key.replace(':', '').replace('%', '')}"
        compress_directory(str(pruned_dirs[key]), str(dst))
        out[key] = dst
    return out


@pytest.mark.slow
@pytest.mark.parametrize("key,fmt", [("50%", BITMASK), ("70%", BITMASK), ("2:4", BITMASK_24), ("mixed", BITMASK)])
def test_compressed_directory_equals_dense_export(pruned_dirs, compressed_dirs, key, fmt):
    from compressed_tensors.config import SparsityCompressionConfig

    dense_dir, comp = pruned_dirs[key], compressed_dirs[key]
    cfg = json.loads((comp / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert sorted(qc) == ["quant_method", "sparsity_config", "transform_config", "version"]
    assert qc["quant_method"] == "compressed-tensors" and qc["transform_config"] == {}
    sc = qc["sparsity_config"]
    assert sc["format"] == fmt and sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    assert sc["sparsity_structure"] == ("2:4" if fmt == BITMASK_24 else "unstructured")
    # the keys are exactly what the library's own config class dumps
    assert sc == SparsityCompressionConfig.load_from_registry(fmt, **{k: v for k, v in sc.items()
                                                                      if k != "format"}).model_dump()
    dense = load_file(str(dense_dir / "model.safetensors"))
    zeros = sum(int((t == 0).sum()) for t in dense.values())
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(t.numel() for t in dense.values()), abs=1e-12)
    back = dense_state_dict(comp)
    assert back.keys() == dense.keys()
    for k, t in dense.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k].view(torch.int16), t.view(torch.int16)), k
    # what is stored: the 35 prunable linears compressed, nothing else touched
    stored = load_file(str(comp / "model.safetensors"))
    assert sum(k.endswith(".bitmask") for k in stored) == 35
    assert not any(k.endswith("proj.weight") for k in stored)
    # the rest of the folder is copied (tokenizer, summary)
    for f in ("tokenizer.json", "summary.json", "generation_config.json"):
        assert (comp / f).read_bytes() == (dense_dir / f).read_bytes()


@pytest.mark.slow
def test_read_compressed_linears_hands_out_the_stored_form(compressed_dirs):
    items = dict(read_compressed_linears(compressed_dirs["70%"]))
    cw = items["model.layers.2.mlp.down_proj"]
    assert isinstance(cw, CompressedWeight) and cw.format == BITMASK and cw.shape == (64, 172)
    assert cw.values.dtype == torch.bfloat16 and cw.values.dim() == 1 and cw.row_offsets.shape == (64,)
    assert torch.equal(_bits(cw.bitmask, 172), cw.to_dense() != 0)
    assert isinstance(items["model.embed_tokens.weight"], torch.Tensor)


@pytest.mark.slow
def test_eval_loads_compressed_directories(pruned_dirs, compressed_dirs, tinystories_split):
    """``losa-zero eval`` (through load_model) scores the compressed folder exactly as the dense one."""
    from losa_zero.modeling import load_model

    for key in ("70%", "2:4"):
        a, _ = load_model(pruned_dirs[key], dtype=torch.bfloat16)
        b, _ = load_model(compressed_dirs[key], dtype=torch.bfloat16)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert getattr(b.config, "quantization_config", None) is None
    eval_txt, _ = tinystories_split
    short = pruned_dirs["tmp"] / "short_eval.txt"
    short.write_text(eval_txt.read_text()[:20000])
    from losa_zero.cli import main

    for d, name in ((pruned_dirs["70%"], "dense.json"), (compressed_dirs["70%"], "compressed.json")):
        assert main(["-q", "eval", "--model", str(d), "--ppl", str(short), "--seqlen", "256",
                     "--json", str(pruned_dirs["tmp"] / name)]) == 0
    a, b = (json.loads((pruned_dirs["tmp"] / n).read_text()) for n in ("dense.json", "compressed.json"))
    assert b["sparsity"] == pytest.approx(0.7, abs=1e-4) and b["perplexity"] == a["perplexity"]


@pytest.mark.slow
def test_file_sizes(pruned_dirs, compressed_dirs):
    """Stored bytes of the compressed linears against their dense bf16 bytes (the
    fixture's 64-wide rows make the per-row offsets weigh 6%; BENCHMARKS.md has
    LLaMA-shaped numbers)."""
    from losa_zero.compress_command import compress_directory

    ratios = {}
    for key in ("50%", "70%", "2:4", "mixed"):
        info = compress_directory(str(pruned_dirs[key]), str(pruned_dirs["tmp"] / f"again-{len(ratios)}"))
        ratios[key] = info["sizes"]["compressed_linears"]["ratio"]
        for kind, r in info["sizes"]["per_kind"].items():
            assert 0 < r["ratio"] < 1, (key, kind)
        # expected from the layout alone: values (2 bytes each), 1 bit per entry rounded up to
        # bytes per row, 8 bytes of offset per row (bitmask format only), 16 bytes of shape
        dense = load_file(str(pruned_dirs[key] / "model.safetensors"))
        stored = total = 0
        for name, t in dense.items():
            if name.endswith("proj.weight"):
                rows, cols = t.shape
                nnz = cols // 2 * rows if key == "2:4" else int((t != 0).sum())
                stored += nnz * 2 + rows * ((cols + 7) // 8) + (0 if key == "2:4" else 8 * rows) + 16
                total += t.numel() * 2
        assert ratios[key] == pytest.approx(stored / total, rel=1e-12), key
    print("\nstored / dense bf16 bytes of the compressed linears:", ratios)
    assert ratios["70%"] < ratios["50%"] < 0.66 and ratios["2:4"] < ratios["50%"]


def test_compress_errors(tmp_path, stories_model_dir, capsys):
    from losa_zero.cli import main

    assert main(["compress", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("losa-zero: error: model directory") and len(err.strip().splitlines()) == 1
    (tmp_path / "out").mkdir()
    assert main(["compress", str(stories_model_dir), "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["compress", str(stories_model_dir), "--out", str(tmp_path / "o2"), "--shard-size", "lots"]) == 2
    assert "--shard-size 'lots' is not a size" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp-*")) and not (tmp_path / "o2").exists()


# -- against the last stack that compresses sparse models itself (bench/ct_reference.py) --------

def _reference_python():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import ct_reference
    finally:
        sys.path.pop(0)
    py = ct_reference.python()
    if py is None:
        pytest.skip(f"no reference virtualenv at {ct_reference.VENV} (transformers 4.57 + compressed-tensors 0.14 + "
                    "llm-compressor 0.10): create it with `python bench/ct_reference.py --create`")
    return py


def _tag(key: str) -> str:
    return key.replace(":", "").replace("%", "")


@pytest.fixture(scope="module")
def reference_runs(pruned_dirs, compressed_dirs):
    """Every command of the reference stack in one process (its libraries take longer to
    import than the commands take): ``load`` of our 2:4 and 70% folders, ``llmc-save`` of
    the dense 2:4 and 70% exports. Returns {(command, key): (printed line, output path)}."""
    import os

    py = _reference_python()
    jobs = [("load", key, compressed_dirs[key], pruned_dirs["tmp"] / f"reference-{_tag(key)}.safetensors")
            for key in ("2:4", "70%")]
    jobs += [("llmc-save", key, pruned_dirs[key], pruned_dirs["tmp"] / f"llmc-{_tag(key)}") for key in ("2:4", "70%")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [str(a) for command, _, src, out in jobs for a in (command, src, out)]
    res = subprocess.run([str(py), str(REPO / "bench" / "ct_reference.py"), *args], capture_output=True,
                         text=True, timeout=900, env=env, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in res.stdout.splitlines() if line.startswith("result "))
    assert len(printed) == len(jobs), res.stdout[-3000:]
    return {(command, key): (printed[f"result {i}"], out) for i, (command, key, _, out) in enumerate(jobs)}


@pytest.mark.slow
@pytest.mark.parametrize("key", ["2:4", "70%"])
def test_reference_library_decompresses_our_export(pruned_dirs, reference_runs, key):
    """transformers 4.57 + compressed-tensors 0.14 read our folder back to the dense export,
    bit for bit: 2:4 through plain ``AutoModelForCausalLM.from_pretrained``, sparse-bitmask
    through the library's decompressor (its from_pretrained path fails on that format)."""
    how, out = reference_runs[("load", key)]
    assert how.startswith("AutoModelForCausalLM" if key == "2:4" else "ModelCompressor")
    got, dense = load_file(str(out)), load_file(str(pruned_dirs[key] / "model.safetensors"))
    assert got.keys() == dense.keys()
    for k, t in dense.items():
        assert torch.equal(got[k].view(torch.int16), t.view(torch.int16)), k


@pytest.mark.slow
@pytest.mark.parametrize("key,fmt", [("2:4", BITMASK_24), ("70%", BITMASK)])
def test_llm_compressor_saved_model_loads(pruned_dirs, reference_runs, key, fmt):
    """A folder saved by llm-compressor 0.10 itself loads through losa-zero's loader with the
    weights it was given."""
    from losa_zero.modeling import load_model

    printed, out = reference_runs[("llmc-save", key)]
    assert printed == fmt
    assert sparsity_config(out)["format"] == fmt
    model, _ = load_model(out, dtype=torch.bfloat16)
    dense = load_file(str(pruned_dirs[key] / "model.safetensors"))
    state = model.state_dict()
    for k, t in dense.items():
        assert torch.equal(state[k].view(torch.int16), t.view(torch.int16)), k


@pytest.mark.slow
def test_streamed_export_on_one_process_matches_compress(pruned_dirs, compressed_dirs, tmp_path):
    """The export's streamed writer on the one-process runtime: dense, it gives the tensors
    ``save_pretrained`` gave; with a compressor, the files ``losa-zero compress`` gave."""
    from losa_zero.compressed import GroupCompressor, model_format, model_targets
    from losa_zero.modeling import load_model
    from losa_zero.runtime import Runtime
    from losa_zero.zero3.export import export_model

    model, tok = load_model(pruned_dirs["2:4"], dtype=torch.bfloat16)
    runtime = Runtime("cpu")
    (tmp_path / "dense").mkdir()
    export_model(model, tok, tmp_path / "dense", runtime, 5 * 10 ** 9)
    a, b = load_file(str(tmp_path / "dense" / "model.safetensors")), load_file(str(pruned_dirs["2:4"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fmt = model_format(model, runtime)
    assert fmt == BITMASK_24
    (tmp_path / "comp").mkdir()
    info = export_model(model, tok, tmp_path / "comp", runtime, 5 * 10 ** 9, GroupCompressor(fmt, *model_targets(model)))
    assert info["format"] == BITMASK_24
    a, b = load_file(str(tmp_path / "comp" / "model.safetensors")), load_file(str(compressed_dirs["2:4"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qa = json.loads((tmp_path / "comp" / "config.json").read_text())["quantization_config"]
    qb = json.loads((compressed_dirs["2:4"] / "config.json").read_text())["quantization_config"]
    assert qa == qb


def _two_rank_export(rank: int, port: int, model_dir: str, out: str, result: str) -> None:
    """One of two gloo ranks exporting the same (whole) model through the streamed writer,
    with the shard ownership, the gather of every rank's names and counts, and rank 0's
    config that a ZeRO-3 export has."""
    import torch.distributed as dist

    from losa_zero.compressed import compressor_for
    from losa_zero.modeling import load_model
    from losa_zero.runtime import Runtime
    from losa_zero.zero3.export import export_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    class TwoRanks(Runtime):
        def __init__(self):
            super().__init__("cpu")
            self.rank, self.world_size = rank, 2

        def all_gather_object(self, obj):
            out = [None, None]
            dist.all_gather_object(out, obj)
            return out

        def barrier(self):
            dist.barrier()

    model, tok = load_model(model_dir, dtype=torch.bfloat16)
    rt = TwoRanks()
    info = export_model(model, tok, Path(out), rt, 100_000, compressor_for(model, rt))
    if rank == 0:
        Path(result).write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_write_the_files_one_process_writes(stories_model_dir, tmp_path):
    """Shards split over two ranks (shard i by rank i mod 2) give the tensors, index and
    config that ``losa-zero compress`` gives with the same shard size on one process."""
    import socket

    import torch.multiprocessing as mp

    from losa_zero.compress_command import compress_directory

    from losa_zero.modeling import linear_full_names, load_model, save_model

    model, tok = load_model(stories_model_dir, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in linear_full_names(model):
            w = model.get_submodule(name).weight
            w.masked_fill_(torch.rand(w.shape, generator=g) < 0.7, 0.0)
    src = save_model(model, tok, tmp_path / "m70")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    out.mkdir()
    mp.start_processes(_two_rank_export, args=(port, str(src), str(out), str(tmp_path / "info.json")),
                       nprocs=2, start_method="spawn")
    info = json.loads((tmp_path / "info.json").read_text())
    ref = compress_directory(str(src), str(tmp_path / "one"), shard_size="100000")
    assert info["shards"] == ref["shards"] > 2 and info["format"] == ref["format"] == BITMASK
    ia, ib = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (out, tmp_path / "one"))
    assert ia == ib
    for f in set(ia["weight_map"].values()):
        a, b = load_file(str(out / f)), load_file(str(tmp_path / "one" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qa, qb = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (out, tmp_path / "one"))
    assert qa == qb


@pytest.mark.slow
@pytest.mark.parametrize("key,args", [("70%", ["--sparsity", "0.7"]), ("2:4", ["--nm", "2:4"])])
def test_save_format_compressed_writes_what_compress_writes(pruned_dirs, compressed_dirs, key, args, tmp_path):
    """``prune --save-format compressed`` gives the files that exporting dense and then running
    ``losa-zero compress`` gives: the same tensors and the same compression config."""
    from losa_zero.cli import main

    summary_dense = json.loads((pruned_dirs[key] / "summary.json").read_text())
    cfg = summary_dense["config"]
    out = tmp_path / "c"
    assert main(["-q", "prune", "--model", cfg["model"], "--calib", cfg["calib"], "--nsamples", "4", "--seqlen", "128",
                 "--method", "magnitude", "--dtype", "bfloat16", "--out", str(out), "--save-format", "compressed",
                 *args]) == 0
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(compressed_dirs[key] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    qa, qb = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (out, compressed_dirs[key]))
    assert qa == qb
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["save_format"] == "compressed"
    assert summary["achieved_sparsity"] == summary_dense["achieved_sparsity"]
