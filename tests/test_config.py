"""Every option validated in one place, the same way from the CLI, a YAML recipe and a
key=value override: ranges for every number, no NaN or infinity, integers never truncated,
contradicting options refused."""
from __future__ import annotations

import math

import pytest
import yaml

from losa_zero.config import LosaConfig, PruneConfig, build_config
from losa_zero.errors import LosaZeroError


@pytest.fixture
def base(tmp_path):
    (tmp_path / "model").mkdir()
    return {"model": str(tmp_path / "model"), "out": str(tmp_path / "out"), "calib": "c.txt", "train": "t.txt",
            "sparsity": 0.5}


BAD = [
    ("max_grad_norm", -1.0, "--max-grad-norm must be > 0"),      # would turn clipping into gradient ascent
    ("max_grad_norm", 0.0, "--max-grad-norm must be > 0"),
    ("lr", math.nan, "--lr must be a finite number"),
    ("lr", math.inf, "--lr must be a finite number"),
    ("lr", 0.0, "--lr must be > 0"),
    ("weight_decay", -0.001, "--weight-decay must be >= 0"),
    ("lora_alpha", 0.0, "--lora-alpha must be > 0"),
    ("lora_dropout", 1.0, "--lora-dropout must be in [0, 1)"),
    ("warmup_ratio", 1.5, "--warmup-ratio must be in [0, 1]"),
    ("besa_lambda", math.nan, "--besa-lambda must be a finite number"),
    ("besa_d_coef", -5.0, "--besa-d-coef must be > 0"),
    ("owl_m", math.inf, "--owl-m must be a finite number"),
    ("owl_lambda", math.nan, "--owl-lambda must be a finite number"),
    ("percdamp", math.nan, "--percdamp must be a finite number"),
    ("beta", 0.0, "--beta must be > 0"),
    ("delta", math.nan, "--delta must be a finite number"),
    ("sparsity", math.nan, "--sparsity must be a finite number"),
    ("sparsity", 1.0, "--sparsity must be in [0, 1)"),
    ("eval_seqlen", 1, "--eval-seqlen must be >= 2"),
    ("seed", -1, "--seed must be >= 0"),
    ("steps", 2.7, "--steps expects an integer (got 2.7)"),    # never truncated to 2
    ("steps", "2.5", "--steps expects an integer (got '2.5')"),
    ("nsamples", True, "--nsamples expects an integer"),
    ("lr", True, "--lr expects a number"),
    ("rank_end", 17.0, "--rank-start/--rank-end must be in [1, --lora-max-rank=16]"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_values_are_refused_from_every_source(base, tmp_path, key, value, message):
    from losa_zero.train_command import build_run_config

    with pytest.raises(LosaZeroError) as direct:             # a YAML recipe (and the CLI's layer)
        build_config(LosaConfig, base, {key: value})
    assert message in str(direct.value) and "\n" not in str(direct.value)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(base))
    text = "true" if value is True else str(value)
    with pytest.raises(LosaZeroError) as override:           # `losa-zero train run.yaml key=value`
        build_run_config(str(run_yaml), [f"{key}={text}"])
    as_key = message.split(" (got")[0]
    for name in (key, "rank_start", "lora_max_rank"):                      # run configs name the key
        as_key = as_key.replace(f"--{name.replace('_', '-')}", name)
    assert as_key in str(override.value), (as_key, str(override.value))


def test_cli_flag_goes_through_the_same_check(base, capsys):
    from losa_zero.cli import main

    args = ["losa", "--model", base["model"], "--out", base["out"], "--calib", "c.txt", "--train", "t.txt",
            "--sparsity", "0.5"]
    for flag, value, message in (("--steps", "2.5", "--steps expects an integer"),
                                 ("--max-grad-norm", "-0.3", "--max-grad-norm must be > 0"),
                                 ("--lr", "nan", "--lr must be a finite number")):
        assert main(args + [flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_integral_floats_are_integers(base):
    cfg = build_config(LosaConfig, base, {"steps": 3.0, "nsamples": "64", "batch_size": "8.0"})
    assert (cfg.steps, cfg.nsamples, cfg.batch_size) == (3, 64, 8)
    assert all(isinstance(v, int) for v in (cfg.steps, cfg.nsamples, cfg.batch_size))


def test_nm_and_sparsity_must_agree(base):
    base = {k: v for k, v in base.items() if k != "train"}
    ok = build_config(PruneConfig, base, {"nm": "2:4", "sparsity": 0.5})
    assert ok.nm == "2:4"
    build_config(PruneConfig, dict(base, sparsity=None), {"nm": "2:4"})
    with pytest.raises(LosaZeroError, match=r"--nm 2:4 prunes 0.5 of the weights but --sparsity is 0.7"):
        build_config(PruneConfig, base, {"nm": "2:4", "sparsity": 0.7})
    with pytest.raises(LosaZeroError, match="1 <= N <= M"):
        build_config(PruneConfig, dict(base, sparsity=None), {"nm": "5:4"})
    with pytest.raises(LosaZeroError, match="missing required option --sparsity"):
        build_config(PruneConfig, dict(base, sparsity=None), {})


def test_plan_checks_the_run_options_with_the_same_ranges(capsys):
    """``losa-zero plan`` takes some run options itself: the ranges are the run config's,
    and its argparse errors are one line too."""
    from losa_zero.plan import main_plan

    for args, message in ((["--seqlen", "0"], "--seqlen must be >= 2 (got 0)"),
                          (["--cka-nsamples", "0"], "--cka-nsamples must be >= 1"),
                          (["--gpu-memory", "nan"], "--gpu-memory must be a finite number"),
                          (["--host-memory", "-1"], "--host-memory must be > 0"),
                          (["--nodes", "2.5"], "--nodes expects an integer (got '2.5')"),
                          (["--no-such-flag"], "unrecognized arguments: --no-such-flag")):
        assert main_plan(["--model", "llama-2-7b"] + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("losa-zero: error:") and message in err[0], err
