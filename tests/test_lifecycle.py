"""One lifecycle for every command: ``losa-zero losa`` (one process) and ``losa-zero train``
(DeepSpeed ZeRO-3, one rank, no launcher) with the same settings (torch AdamW) give the
same masks, rates, ranks, errors and losses exactly, the same weights to within 1e-6 (the
standard of the 1-rank vs 2-rank test) and the same summary, field for field; the summary
schema is the same for ``prune`` too. All are real command-line runs on the stories260K
fixture with a tiny budget.

Not bit-identical, by a float rounding the run cannot control. Traced gradient by
gradient: the last layer's MLP gradients are equal bit for bit; the first one that is a
sum of several contributions (o_proj's, fed by the residual stream and by gate_proj's and
up_proj's input gradients) differs in its last bits, because DeepSpeed's ZeRO-3 module
hooks add autograd nodes around every module, which changes where autograd adds them up.
After the first optimizer step lora_B differs by about 1e-7. (Gradient clipping is one
function for both trainers, so it adds nothing.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zero3_helpers import REPO, base_env, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
pytest.importorskip("deepspeed")

#: the fields every command's summary.json has (README, Outputs)
COMMON = {"method", "pruner", "allocation", "rank_allocation", "target_sparsity", "nm", "per_layer", "steps", "optimizer",
          "perplexity", "losa_zero_version", "command", "achieved_sparsity", "per_linear_sparsity", "seconds",
          "peak_memory", "config", "world_size", "peak_memory_per_rank", "memory_by_phase_per_rank"}
#: what a ZeRO-3 run adds
ZERO3_EXTRAS = {"launcher", "backend", "deepspeed_config", "mask_bytes_per_rank", "export", "resumed_from", "checkpoint_dir"}
#: fields that measure the run (time, memory, the command line, the output path), not its result
MEASURED = {"seconds", "peak_memory", "peak_memory_per_rank", "memory_by_phase_per_rank", "command", "config"}


def _cli(args: list[str], tmp: Path, log: Path) -> None:
    env = base_env(tmp)
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "losa_zero.cli", *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                            timeout=900, cwd=str(REPO)).returncode
    assert rc == 0, f"losa-zero {args[0]} failed ({rc}):\n{log.read_text()[-4000:]}"


def _weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _strip_measured(value):
    """The summary without what measures the run (throughput inside the steps included)."""
    if isinstance(value, dict):
        return {k: _strip_measured(v) for k, v in value.items() if k not in MEASURED and k != "tokens_per_s"}
    if isinstance(value, list):
        return [_strip_measured(v) for v in value]
    return value


@pytest.fixture(scope="module")
def runs(stories_model_dir, tinystories_split, short_eval_txt, tmp_path_factory):
    _, train_txt = tinystories_split
    eval_txt = short_eval_txt  # the commands' perplexities are compared with each other only
    tmp = tmp_path_factory.mktemp("lifecycle")
    settings = {
        "model": str(stories_model_dir), "calib": str(train_txt), "train": str(train_txt), "ppl": str(eval_txt),
        "sparsity": 0.5, "steps": 2, "nsamples": 16, "seqlen": 128, "cka_nsamples": 8, "calib_batch_size": 8,
        "samples_per_step": 16, "final_step_samples": 16, "max_length": 128, "batch_size": 8,
        "micro_batch_size": 4, "lr": 3.0e-3, "optimizer": "adamw", "lora_dropout": 0.0, "eval_seqlen": 256,
    }
    recipe = write_config(tmp / "recipe.yaml", settings)
    _cli(["losa", "--config", str(recipe), "--out", str(tmp / "losa")], tmp, tmp / "losa.log")
    _cli(["train", str(recipe), f"out={tmp / 'train'}", f"deepspeed={REPO / 'ds_configs' / 'zero3_cpu_test.json'}"],
         tmp, tmp / "train.log")
    _cli(["prune", "--model", settings["model"], "--calib", settings["calib"], "--ppl", settings["ppl"],
          "--nsamples", "16", "--seqlen", "128", "--eval-seqlen", "256", "--sparsity", "0.5",
          "--out", str(tmp / "prune")], tmp, tmp / "prune.log")
    return {name: (tmp / name, json.loads((tmp / name / "summary.json").read_text()))
            for name in ("losa", "train", "prune")}


def test_losa_and_train_give_the_same_weights_and_masks(runs):
    (losa_dir, _), (train_dir, _) = runs["losa"], runs["train"]
    a, b = _weights(losa_dir), _weights(train_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), f"the zeros (mask) of {k} differ"
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"\nlosa vs train: max weight difference {worst}")
    assert worst < 1e-6


def _assert_close(a, b, path="summary"):
    """Same structure; strings, ints and booleans equal; floats to 1e-5 relative (the LoRA
    factors, hence errors and losses after the first update, agree to about 1e-7)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-9), f"{path}: {a} != {b}"
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"


def test_losa_and_train_give_the_same_summary(runs):
    (_, s_losa), (_, s_train) = runs["losa"], runs["train"]
    assert set(s_losa) == COMMON
    assert set(s_train) == COMMON | ZERO3_EXTRAS
    same = {k: v for k, v in s_train.items() if k not in ZERO3_EXTRAS}
    _assert_close(_strip_measured(s_losa), _strip_measured(same))
    # what the masks decide is exact: sparsity, rates and ranks of every layer at every step
    for field in ("rate", "rank", "sparsity"):
        assert ([layer[field] for st in s_losa["steps"] for layer in st["layers"]]
                == [layer[field] for st in s_train["steps"] for layer in st["layers"]]), field
    assert s_losa["per_linear_sparsity"] == s_train["per_linear_sparsity"]
    assert s_losa["world_size"] == s_train["world_size"] == 1
    # the same phases, recorded in the same order, by both
    assert list(s_losa["memory_by_phase_per_rank"][0]) == list(s_train["memory_by_phase_per_rank"][0])
    assert set(s_losa["seconds"]) == set(s_train["seconds"])


def test_prune_has_the_same_schema(runs):
    _, s = runs["prune"]
    assert set(s) == COMMON
    assert s["rank_allocation"] is None and s["steps"] == [] and s["optimizer"] is None
    phases = list(s["memory_by_phase_per_rank"][0])
    assert phases == ["load", "data", "importance", "prune", "eval", "save"]
    assert all("cuda_peak_bytes" not in m for m in s["memory_by_phase_per_rank"][0].values())  # CPU run
