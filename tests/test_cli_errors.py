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


# -- every known bad input: one line, exit 2, nothing written ----------------------------------------------
def _damaged_model(src, dst, how):
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) // 2])
    elif how == "header":
        data = bytearray(weights.read_bytes())
        data[10:20] = b"@" * 10
        weights.write_bytes(bytes(data))
    elif how == "pickle":
        import torch

        weights.unlink()

        class Payload:
            def __reduce__(self):
                return (print, ("this must never run",))

        torch.save({"model.embed_tokens.weight": Payload()}, dst / "pytorch_model.bin")
    elif how == "remote_code":
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(model_type="my_custom_llm", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                         "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


ONE_LINE_CASES = {
    # name: (argv from (model, work folder, out, text file), needle in the message, text that must NOT be there)
    "truncated_safetensors": (lambda m, d, o, t: ["prune", "--model", str(_damaged_model(m, d / "m", "truncated")),
                                                "--sparsity", "0.5"], "damaged or truncated", None),
    "corrupted_safetensors": (lambda m, d, o, t: ["prune", "--model", str(_damaged_model(m, d / "m", "header")),
                                                "--sparsity", "0.5"], "damaged or truncated", None),
    "unsafe_pickle": (lambda m, d, o, t: ["prune", "--model", str(_damaged_model(m, d / "m", "pickle")),
                                       "--sparsity", "0.5"], "refuses to load safely", None),
    "remote_code": (lambda m, d, o, t: ["prune", "--model", str(_damaged_model(m, d / "m", "remote_code")),
                                     "--sparsity", "0.5"], "never runs", "trust_remote_code"),
    "device_without_cuda": (lambda m, d, o, t: ["prune", "--model", str(m), "--sparsity", "0.5", "--device", "cuda"],
                            "no CUDA device", None),
    "alpaca_non_string_field": (lambda m, d, o, t: ["losa", "--model", str(m), "--sparsity", "0.5", "--steps", "1",
                                                 "--train", str(_bad_alpaca(d)), "--final-step-samples", "2",
                                                 "--batch-size", "1", "--micro-batch-size", "1"],
                                "non-text 'instruction'", None),
    "out_unwritable": (lambda m, d, o, t: ["prune", "--model", str(m), "--sparsity", "0.5", "--out", "/proc/losa-out"],
                       "cannot write in /proc", None),
    # found at run time: an overflowing learning rate (merged weights not finite; the optimizer's own overflow)
    "lr_overflows_weights": (lambda m, d, o, t: _tiny_losa(m, t) + ["--lr", "1e30"], "learning rate", None),
    "lr_overflows_optimizer": (lambda m, d, o, t: _tiny_losa(m, t) + ["--lr", "1e39"], "learning rate", None),
    "argparse_unknown_flag": (lambda m, d, o, t: ["prune", "--model", str(m), "--no-such-flag"],
                              "unrecognized arguments: --no-such-flag", None),
    "argparse_bad_choice": (lambda m, d, o, t: ["prune", "--model", str(m), "--method", "foo"],
                            "invalid choice: 'foo'", None),
    "argparse_missing_value": (lambda m, d, o, t: ["prune", "--model", str(m), "--sparsity"],
                               "expected one argument", None),
}

EVAL_CASES = {
    "limit_zero": (["--tasks", "boolq", "--limit", "0"], "--limit must be >= 1"),
    "limit_negative": (["--tasks", "boolq", "--limit", "-3"], "--limit must be >= 1"),
    "json_unwritable": (["--ppl", "PPL", "--json", "/proc/no/such/folder/r.json"], "does not exist"),
    "json_is_folder": (["--ppl", "PPL", "--json", "TMP"], "is a folder"),
    "eval_device_without_cuda": (["--ppl", "PPL", "--device", "cuda:0"], "no CUDA device"),
    "unknown_task": (["--tasks", "no_such_task_xyz"], "unknown zero-shot task"),
}


def _tiny_losa(model, text):
    return ["losa", "--model", str(model), "--sparsity", "0.5", "--steps", "1", "--train", str(text),
            "--final-step-samples", "4", "--batch-size", "2", "--micro-batch-size", "2", "--max-length", "32",
            "--optimizer", "adamw"]


def _bad_alpaca(d):
    path = d / "bad_alpaca.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."},
                                {"instruction": ["not", "text"], "input": "", "output": "x"}]))
    return path


def _assert_one_line(code, err, needle, forbidden=None):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("losa-zero: error:"), err
    assert needle in err[0], (needle, err[0])
    assert forbidden is None or forbidden not in err[0], err[0]


@pytest.mark.parametrize("case", sorted(ONE_LINE_CASES))
def test_bad_input_gives_one_line_and_exit_2(case, capsys, stories_model_dir, tinystories_split, tmp_path):
    build, needle, forbidden = ONE_LINE_CASES[case]
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    command, *rest = build(stories_model_dir, work, out, tinystories_split[1])
    common = ["--calib", str(tinystories_split[1]), "--nsamples", "2", "--seqlen", "32", "--out", str(out)]
    code, err = _run(capsys, ["-q", command] + common + rest)  # the case's own flags come last and win
    _assert_one_line(code, err, needle, forbidden)
    assert not out.exists() and not list(tmp_path.glob("out.*")), "output written"


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_bad_eval_input_gives_one_line_and_exit_2(case, capsys, stories_model_dir, tinystories_split, tmp_path):
    extra, needle = EVAL_CASES[case]
    extra = [str(tinystories_split[0]) if a == "PPL" else str(tmp_path) if a == "TMP" else a for a in extra]
    code, err = _run(capsys, ["-q", "eval", "--model", str(stories_model_dir)] + extra)
    _assert_one_line(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_hub_task_while_offline(capsys, stories_model_dir, tmp_path, monkeypatch):
    """A task that lm-eval must download, with the hub off (losa-zero's default): one line
    naming the variables that allow the download."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, err = _run(capsys, ["-q", "eval", "--model", str(stories_model_dir), "--tasks", "mmlu_abstract_algebra",
                              "--limit", "2", "--json", str(tmp_path / "r.json")])
    _assert_one_line(code, err, "HF_DATASETS_OFFLINE=0")
    assert not (tmp_path / "r.json").exists()


def test_short_ppl_text_is_refused_before_calibration(capsys, prune_args, tmp_path, monkeypatch):
    """A --ppl text shorter than one evaluation window fails once the tokenizer is known,
    before calibration (not after the whole run)."""
    import losa_zero.lifecycle as lifecycle

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the --ppl text was checked")

    monkeypatch.setattr(lifecycle, "calibration_windows", no_calibration)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    out, args = prune_args
    code, err = _run(capsys, ["-q"] + args + ["--sparsity", "0.5", "--ppl", str(short), "--eval-seqlen", "64"])
    _assert_clean_failure(code, err, out, f"--ppl {short} has", "fewer than one window of 64")
