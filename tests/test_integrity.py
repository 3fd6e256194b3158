"""Checkpoint and dense-target integrity: checksums recorded while writing, verified on
resume; a damaged checkpoint is skipped with a warning naming the file, and when none is
intact the run stops (or, only when allowed, starts over); damaged dense targets are
detected the same way; big folders are deleted by every rank, a share each."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from losa_zero.errors import LosaZeroError
from losa_zero.runtime import Runtime
from losa_zero.zero3.integrity import ALGORITHM, file_record, problem, remove_shared, save_atomic

from test_zero3_units import _fake_checkpoint


def _flip_byte(path: Path, offset: int = -20) -> None:
    """Change one byte in place: same size, different content (what a size check misses)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksum_is_computed_while_writing(tmp_path):
    obj = {"w": torch.randn(300, 17), "step": 3}
    record = save_atomic(obj, tmp_path / "a.pt")
    assert record == file_record(tmp_path / "a.pt")
    assert record["size"] == (tmp_path / "a.pt").stat().st_size and len(record[ALGORITHM]) == 32
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], obj["w"])
    assert not [p for p in tmp_path.iterdir() if p.name != "a.pt"], "temporary file left behind"
    assert problem(tmp_path / "a.pt", record) is None
    _flip_byte(tmp_path / "a.pt")
    assert "checksum mismatch" in problem(tmp_path / "a.pt", record)
    assert problem(tmp_path / "missing.pt", record) == "missing"


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    from losa_zero.zero3.checkpoint import latest_complete, resolve_resume

    _fake_checkpoint(tmp_path, 1, 0, 2)
    _fake_checkpoint(tmp_path, 2, 0, 2)
    newest = _fake_checkpoint(tmp_path, 2, 5, 2, pending=True)
    _flip_byte(newest / "train.rank00001.pt")
    assert latest_complete(tmp_path).path == newest  # sizes alone cannot see it
    with caplog.at_level(logging.WARNING, logger="losa_zero"):
        info = resolve_resume("auto", tmp_path, Runtime())
    assert info.path.name == "ckpt-002-000000"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "ckpt-002-000005" in warned[0] and "train.rank00001.pt" in warned[0]
    assert "checksum mismatch" in warned[0]


def test_every_checkpoint_damaged_stops_unless_allowed_to_start_over(tmp_path, caplog):
    from losa_zero.zero3.checkpoint import MARKER, resolve_resume

    a = _fake_checkpoint(tmp_path, 1, 0, 1)
    b = _fake_checkpoint(tmp_path, 2, 0, 1)
    _flip_byte(a / "train.rank00000.pt")
    (b / MARKER).write_text("{not json")                   # a damaged marker is damage, not "incomplete"
    with pytest.raises(LosaZeroError, match=r"no intact checkpoint .* 2 damaged.*resume=auto_or_fresh") as e:
        resolve_resume("auto", tmp_path, Runtime())
    assert "\n" not in str(e.value) and "ckpt-002-000000" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="losa_zero"):
        assert resolve_resume("auto_or_fresh", tmp_path, Runtime()) is None
    assert any("starting over" in r.getMessage() for r in caplog.records)
    # nothing complete at all (killed before the first marker): a fresh start, no error
    empty = tmp_path / "empty"
    _fake_checkpoint(empty, 1, 0, 1, complete=False)
    assert resolve_resume("auto", empty, Runtime()) is None
    assert resolve_resume("never", tmp_path, Runtime()) is None


def test_explicit_damaged_or_foreign_checkpoint_is_refused(tmp_path):
    from losa_zero.zero3.checkpoint import MARKER, resolve_resume

    p = _fake_checkpoint(tmp_path, 1, 0, 1)
    assert resolve_resume(str(p), tmp_path, Runtime()).path == p
    (p / "meta.json").write_text((p / "meta.json").read_text().replace("null", "None"))  # size changes too
    with pytest.raises(LosaZeroError, match=r"ckpt-001-000000 is damaged: .*meta.json"):
        resolve_resume(str(p), tmp_path, Runtime())
    q = _fake_checkpoint(tmp_path, 2, 0, 1, complete=False)
    with pytest.raises(LosaZeroError, match="not a complete checkpoint"):
        resolve_resume(str(q), tmp_path, Runtime())
    old = _fake_checkpoint(tmp_path, 3, 0, 1)
    marker = (old / MARKER).read_text().replace('"format": 2', '"format": 1')
    (old / MARKER).write_text(marker)
    with pytest.raises(LosaZeroError, match="format 1"):
        resolve_resume(str(old), tmp_path, Runtime())


class _OneRank(Runtime):
    """The collective surface the dense targets use, on one process."""

    calib_batch_size = 2

    def __init__(self):
        super().__init__("cpu")
        self.activation_files = {}


def test_damaged_dense_targets_are_detected(tmp_path, caplog):
    from losa_zero.zero3 import dense_targets

    rt, d = _OneRank(), tmp_path / "dense_targets"
    hidden = [torch.randn(4, 8, 16) for _ in range(3)]
    for l, h in enumerate(hidden):
        back, record = dense_targets.write_activation(d, l, 0, h)
        assert torch.equal(back, h)
        rt.activation_files.update(record)
    dense_targets.write_manifest(d, rt, 3, 4)
    assert dense_targets.intact(d, rt, 3, 4)
    assert all(torch.equal(a, b) for a, b in zip(dense_targets.load(d, rt, 3, 4), hidden))
    assert not dense_targets.intact(d, rt, 3, 8)               # another calibration set
    _flip_byte(d / "layer0001.rank00000.pt")
    with caplog.at_level(logging.WARNING, logger="losa_zero"):
        assert not dense_targets.intact(d, rt, 3, 4)
    assert any("layer0001.rank00000.pt" in r.getMessage() and "computing them again" in r.getMessage()
               for r in caplog.records)
    dense_targets.clear(d, rt)
    assert not d.exists() and not list(tmp_path.iterdir()) and not rt.activation_files


def test_remove_shared_renames_first_then_deletes_everything(tmp_path):
    a, b = tmp_path / "ckpt-001-000000", tmp_path / "dense_targets"
    for folder in (a, b):
        (folder / "sub").mkdir(parents=True)
        for i in range(3):
            (folder / f"f{i}.pt").write_bytes(os.urandom(100 * (i + 1)))
        (folder / "sub" / "g.pt").write_bytes(b"x")
    remove_shared([a, b, tmp_path / "absent"], Runtime())
    assert list(tmp_path.iterdir()) == []


def test_remove_shared_takes_rank0s_list_and_each_rank_its_share(tmp_path, monkeypatch):
    """Two ranks simulated one after the other: rank 0's list decides (rank 1's is ignored),
    and the files are split between the ranks with no file deleted twice."""
    import losa_zero.zero3.integrity as integrity

    folder = tmp_path / "old"
    folder.mkdir()
    for i in range(6):
        (folder / f"f{i}").write_bytes(b"x" * (i + 1))
    names = sorted(p.name for p in folder.iterdir())
    deleted: dict[int, list[str]] = {0: [], 1: []}
    real_unlink = Path.unlink
    current = [0]

    def tracking_unlink(path, *args, **kwargs):
        deleted[current[0]].append(path.name)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", tracking_unlink)
    monkeypatch.setattr(integrity.shutil, "rmtree", lambda *a, **k: None)  # rank 1 still has to run
    rank0_said = []

    class Rank0(Runtime):
        rank, world_size = 0, 2

        def all_gather_object(self, obj):
            rank0_said.append(obj)
            return [obj, None]

        def barrier(self):
            pass

    class Rank1(Runtime):
        rank, world_size = 1, 2

        def all_gather_object(self, obj):
            return [rank0_said.pop(0), obj]

        def barrier(self):
            pass

    remove_shared([folder], Rank0())
    trash = Path(rank0_said[1][0][0])
    assert not folder.exists() and trash.is_dir() and trash.name.startswith(".deleting-old-")
    current[0] = 1
    remove_shared([tmp_path / "not-this"], Rank1())
    assert sorted(deleted[0] + deleted[1]) == names
    assert deleted[0] and deleted[1] and not set(deleted[0]) & set(deleted[1])
    assert not list(trash.iterdir())
