"""Shared fixtures: the real stories260K model and texts from ../shared/data.

The data directory comes from LOSA_ZERO_DATA (CI and the README set it to ../shared/data);
tests that need it skip with a message naming the variable when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_CHARS = 200_000  # held-out TinyStories prefix, as in the demo and fixtures.md
SHORT_EVAL_CHARS = 20_000  # its head, for tests comparing runs with each other (short_eval_txt)


def data_root() -> Path:
    return Path(os.environ.get("LOSA_ZERO_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "stories260K" / "stories260K.bin").is_file():
        pytest.skip(f"fixture data not found under {root}: set LOSA_ZERO_DATA to the shared/data folder")
    return root


@pytest.fixture(scope="session")
def stories_model_dir(data_dir, tmp_path_factory) -> Path:
    """The llama2.c stories260K checkpoint converted once per session to a HF directory."""
    from losa_zero.convert_llama2c import convert_llama2c

    out = tmp_path_factory.mktemp("stories260K") / "hf"
    convert_llama2c(data_dir / "stories260K" / "stories260K.bin", data_dir / "stories260K" / "tok512.model", out)
    return out


@pytest.fixture(scope="session")
def tinystories_split(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(held-out evaluation text, calibration/fine-tuning text) files split as the demo does."""
    text = (data_dir / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")
    d = tmp_path_factory.mktemp("tinystories")
    (d / "eval.txt").write_text(text[:EVAL_CHARS], encoding="utf-8")
    (d / "train.txt").write_text(text[EVAL_CHARS:], encoding="utf-8")
    return d / "eval.txt", d / "train.txt"


@pytest.fixture(scope="session")
def short_eval_txt(tinystories_split, tmp_path_factory) -> Path:
    """The first SHORT_EVAL_CHARS of the held-out text, also named eval.txt (summaries key
    perplexities by file name): enough windows for tests that compare two runs' perplexities
    with each other (1 vs 2 ranks, resumed vs uninterrupted), which do not need the full
    held-out split that quality tests measure on, and a fraction of its evaluation time."""
    d = tmp_path_factory.mktemp("tinystories_short")
    (d / "eval.txt").write_text(tinystories_split[0].read_text(encoding="utf-8")[:SHORT_EVAL_CHARS], encoding="utf-8")
    return d / "eval.txt"
