"""Units of the run lifecycle that need no model: phase records (seconds, host RSS and, with
CUDA in use, the allocator's peak per phase), the perplexity window default, the sequence
length check and the atomic output rule seen from rank 0 and from another rank."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from losa_zero import outputs
from losa_zero.errors import LosaZeroError
from losa_zero.evaluate import default_eval_seqlen
from losa_zero.lifecycle import calibration_seqlen
from losa_zero.outputs import PhaseRecorder, atomic_output_dir


def test_phases_record_seconds_and_memory_in_order_without_cuda_on_cpu(monkeypatch):
    monkeypatch.setattr(outputs, "_cuda_in_use", lambda: False)
    rec = PhaseRecorder()
    for key in ("step1.prune", "step2.prune"):
        with rec.phase("prune", key) as timing:
            pass
        assert timing["seconds"] >= 0
    with rec.phase("eval"):
        pass
    assert list(rec.memory) == ["step1.prune", "step2.prune", "eval"]
    assert set(rec.seconds) == {"prune", "eval"}
    assert all(set(m) == {"peak_rss_bytes", "rss_bytes"} for m in rec.memory.values())
    assert rec.peak_memory()["cuda_bytes"] is None or torch.cuda.is_available()
    assert rec.total()["total"] >= rec.seconds["prune"]


class FakeCuda:
    """The two allocator counters the recorder reads, driven by the test."""

    def __init__(self):
        self.peak = 0
        self.resets = 0

    def max_memory_allocated(self, *args):
        return self.peak

    def reset_peak_memory_stats(self, *args):
        self.resets += 1
        self.peak = 0


def test_phases_reset_and_record_the_cuda_peak_of_each_phase(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(outputs, "_cuda_in_use", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rec = PhaseRecorder()
    fake.peak = 700  # before the first phase (model loading outside any phase)
    with rec.phase("load"):
        fake.peak = 300
    with rec.phase("prune"):
        fake.peak = 100
    assert fake.resets == 2
    assert rec.memory["load"]["cuda_peak_bytes"] == 300
    assert rec.memory["prune"]["cuda_peak_bytes"] == 100
    # the run's peak is the largest seen, also before the resets hid it
    assert rec.peak_memory()["cuda_bytes"] == 700


def _model_with_context(n: int):
    return types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=n))


def test_eval_window_defaults_to_context_capped_at_4096():
    assert default_eval_seqlen(_model_with_context(512)) == 512
    assert default_eval_seqlen(_model_with_context(131072)) == 4096


def test_calibration_seqlen_default_and_bound():
    assert calibration_seqlen(None, types.SimpleNamespace(max_position_embeddings=512)) == 512
    assert calibration_seqlen(None, types.SimpleNamespace(max_position_embeddings=8192)) == 2048
    with pytest.raises(LosaZeroError, match="exceeds the model's context length 512"):
        calibration_seqlen(1024, types.SimpleNamespace(max_position_embeddings=512))


class FakeRank:
    """A runtime seen from one rank of two: rank 0's temporary name is everyone's."""

    world_size = 2

    def __init__(self, rank: int, rank0_tmp: str):
        self.rank, self.rank0_tmp = rank, rank0_tmp
        self.barriers = 0

    @property
    def is_main(self):
        return self.rank == 0

    def all_gather_object(self, obj):
        # what rank 0 shares in atomic_output_dir: (its temporary folder, its error), then
        # (None, its commit error)
        rank0 = obj if not self.rank else ((self.rank0_tmp, None) if self.barriers == 0 else (None, None))
        return [rank0, obj]

    def barrier(self):
        self.barriers += 1


def test_atomic_output_other_rank_writes_into_rank0_dir_and_never_renames(tmp_path):
    out = tmp_path / "run"
    rank0_tmp = tmp_path / "run.tmp-1234"
    rank0_tmp.mkdir()  # made by rank 0
    rt = FakeRank(1, str(rank0_tmp))
    with atomic_output_dir(out, runtime=rt) as d:
        assert Path(d) == rank0_tmp
        (d / "shard-1").write_text("x")
    assert not out.exists() and rank0_tmp.exists()  # rank 0 renames, not this rank
    assert rt.barriers == 2  # after every rank wrote its part, and after the commit


def test_atomic_output_rank0_commits_and_cleans_up_on_error(tmp_path):
    out = tmp_path / "run"
    rt = FakeRank(0, "")
    with atomic_output_dir(out, runtime=rt) as d:
        (d / "summary.json").write_text("{}")
    assert (out / "summary.json").is_file() and not list(tmp_path.glob("run.tmp-*"))
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True, runtime=rt) as d:
            raise RuntimeError("boom")
    assert (out / "summary.json").is_file() and not list(tmp_path.glob("run.tmp-*"))
