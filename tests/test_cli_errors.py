"""Bad input: one clear line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from losa_zero.cli import main


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_clean_failure(code, err, out_dir, *needles):
    assert code == 2
    assert len(err) >= 1 and err[-1].startswith("losa-zero: error:"), err
    for n in needles:
        assert n in err[-1], (n, err[-1])
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(out_dir.name + ".tmp-*")), "temporary output left behind"


@pytest.fixture
def prune_args(stories_model_dir, tinystories_split, tmp_path):
    eval_txt, train_txt = tinystories_split
    out = tmp_path / "out"
    return out, ["prune", "--model", str(stories_model_dir), "--calib", str(train_txt), "--nsamples", "4",
                  "--seqlen", "64", "--out", str(out)]


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_outside_range(capsys, prune_args, value):
    out, args = prune_args
    code, err = _run(capsys, args + ["--method", "wanda", "--sparsity", value])
    _assert_clean_failure(code, err, out, "--sparsity must be in [0, 1)")


def test_n_greater_than_m(capsys, prune_args):
    out, args = prune_args
    code, err = _run(capsys, args + ["--method", "wanda", "--nm", "5:4"])
    _assert_clean_failure(code, err, out, "1 <= N <= M")


def test_nm_not_dividing_width(capsys, prune_args):
    out, args = prune_args
    code, err = _run(capsys, args + ["--method", "wanda", "--nm", "4:8"])
    _assert_clean_failure(code, err, out, "divisible by 8", "down_proj", "172")


def test_missing_model_dir(capsys, tmp_path, tinystories_split):
    out = tmp_path / "out"
    code, err = _run(capsys, ["prune", "--model", str(tmp_path / "nope"), "--method", "wanda", "--sparsity", "0.5",
                              "--calib", str(tinystories_split[1]), "--out", str(out)])
    _assert_clean_failure(code, err, out, "model directory not found")


def test_missing_calibration_file(capsys, prune_args, tmp_path):
    out, args = prune_args
    args = [a if not a.endswith("train.txt") else str(tmp_path / "missing.txt") for a in args]
    code, err = _run(capsys, args + ["--method", "wanda", "--sparsity", "0.5"])
    _assert_clean_failure(code, err, out, "missing.txt")


def test_unsupported_architecture(capsys, tmp_path, tinystories_split):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)).save_pretrained(model_dir)
    out = tmp_path / "out"
    code, err = _run(capsys, ["prune", "--model", str(model_dir), "--method", "wanda", "--sparsity", "0.5",
                              "--calib", str(tinystories_split[1]), "--out", str(out)])
    _assert_clean_failure(code, err, out, "gpt2", "not supported")


def test_steps_below_one(capsys, stories_model_dir, tinystories_split, tmp_path):
    out = tmp_path / "out"
    code, err = _run(capsys, ["losa", "--model", str(stories_model_dir), "--sparsity", "0.7", "--steps", "0",
                              "--calib", str(tinystories_split[1]), "--train", str(tinystories_split[1]), "--out", str(out)])
    _assert_clean_failure(code, err, out, "--steps must be >= 1")


def test_existing_output_is_not_touched(capsys, prune_args):
    out, args = prune_args
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, args + ["--method", "magnitude", "--sparsity", "0.5"])
    assert code == 2 and "already exists" in err[-1]
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_yaml_key(capsys, prune_args, tmp_path):
    out, args = prune_args
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: wanda\nsparsity: 0.5\nsparsity_typo: 3\n")
    code, err = _run(capsys, args + ["--config", str(recipe)])
    _assert_clean_failure(code, err, out, "sparsity_typo")


def test_yaml_recipe_and_flag_override(prune_args, tmp_path):
    out, args = prune_args
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magnitude\nsparsity: 0.3\n")
    assert main(args + ["--config", str(recipe), "--sparsity", "0.4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "magnitude" and summary["target_sparsity"] == 0.4
    assert abs(summary["achieved_sparsity"] - 0.4) < 0.005


def test_console_script_exit_code(tmp_path):
    """The installed entry point, in a fresh process, exits 2 with one line."""
    proc = subprocess.run([sys.executable, "-m", "losa_zero.cli", "prune", "--model", str(tmp_path / "nope"),
                           "--method", "wanda", "--sparsity", "0.5", "--calib", "x.txt", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("losa-zero: error: model directory not found")
