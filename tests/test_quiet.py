"""Quiet by default: -q prints nothing but warnings and errors (no progress bars, no
DeepSpeed accelerator line from a command that does not use DeepSpeed), and `losa-zero
train` filters the per-step FutureWarnings of DeepSpeed's collectives like train/losa.py."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quiet_prune_prints_nothing(stories_model_dir, tinystories_split, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR",)}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "losa_zero.cli", "-q", "prune", "--model", str(stories_model_dir),
                           "--method", "wanda", "--sparsity", "0.5", "--calib", str(tinystories_split[1]),
                           "--nsamples", "4", "--seqlen", "64", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]   # no bars, no "Setting accelerator" line
    assert (out / "summary.json").is_file()


def test_losa_zero_train_filters_the_collective_future_warnings(tmp_path, capsys):
    from losa_zero.train_command import cli_run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_run(str(tmp_path / "missing.yaml"), [], "losa-zero train missing.yaml") == 2
        warnings.warn("`torch.distributed._all_gather_base` is a private function and will be deprecated",
                      FutureWarning)
        warnings.warn("torch.distributed.reduce_op is deprecated, please use torch.distributed.ReduceOp instead",
                      FutureWarning)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert "config file not found" in capsys.readouterr().err


def test_quiet_means_no_progress_bar_however_long_the_loop(capsys):
    """The bars are the runtime's: with the ``losa_zero`` logger at WARNING (what ``-q``
    sets) a loop gets no bar even past the 30 s a non-interactive log waits for."""
    import logging

    from losa_zero.runtime import Runtime

    logger = logging.getLogger("losa_zero")
    old = logger.level
    try:
        logger.setLevel(logging.WARNING)
        items = [1, 2, 3]
        assert Runtime("cpu").progress(items, desc="x", delay=0) is items
        logger.setLevel(logging.INFO)
        bar = Runtime("cpu").progress(items, desc="x", delay=0, mininterval=0)
        assert list(bar) == items and bar is not items
    finally:
        logger.setLevel(old)
