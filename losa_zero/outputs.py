"""Crash-safe outputs and resource reporting.

Pruning and fine-tuning runs take hours and may be killed (OOM, scheduler preemption).
A half-written model directory that *looks* complete is worse than none, because a later
evaluation would silently score a broken checkpoint. So every output directory is built
under a temporary sibling name and only renamed into place once it is complete; rename
within one filesystem is atomic on POSIX.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from losa_zero.errors import LosaZeroError


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, runtime=None) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only on success.

    The existence check happens on enter, before the caller does any (possibly
    hours-long) work, so a clash with an earlier result is reported immediately.
    The temporary directory is a sibling (same filesystem) so the final rename is atomic.
    On an exception the temporary directory is removed and ``path`` is left untouched.

    With a multi-rank ``runtime`` every rank gets the same temporary directory (rank 0's),
    rank 0 alone creates, renames or removes it, and the rename waits for every rank
    (the ranks write their shards of the model into it).
    """
    path = Path(path)
    main = runtime is None or runtime.is_main
    if path.exists() and not overwrite:
        raise LosaZeroError(
            f"output directory {path} already exists: choose another --out or pass --overwrite"
        )
    if path.exists() and not path.is_dir():
        raise LosaZeroError(f"output path {path} exists and is not a directory: choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LosaZeroError(f"cannot create the parent folder of {path}: {exc.strerror}; choose another --out") from exc
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    barrier = runtime.barrier if runtime is not None else (lambda: None)
    if runtime is not None:
        tmp = Path(runtime.all_gather_object(str(tmp))[0])
    if main:
        if tmp.exists():  # left over by a crashed run that had the same pid
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    try:
        yield tmp
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()  # every rank has written its part
    if main:
        _commit(tmp, path)
    barrier()


def _commit(tmp: Path, path: Path) -> None:
    # Success: move into place. With overwrite, keep the old result until the new one is
    # in place so that at every instant one complete directory exists under some name.
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON so that readers never see a truncated file.

    Metrics files are polled by dashboards and re-read by resumed runs; writing to a temp
    file in the same directory and ``os.replace``-ing it makes the update all-or-nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def peak_memory() -> dict:
    """Peak host RSS and peak CUDA allocation of this process, in bytes.

    Memory is the whole point of running under ZeRO-3, so every run records it. ``ru_maxrss``
    is reported in KiB on Linux but in bytes on macOS. CUDA is ``None`` when unavailable so
    CPU runs do not report a misleading zero.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host = int(rss) if sys.platform == "darwin" else int(rss) * 1024
    cuda = None
    try:
        import torch

        if torch.cuda.is_available():
            cuda = int(torch.cuda.max_memory_allocated())
    except Exception:  # pragma: no cover - torch absent or CUDA broken
        cuda = None
    return {"host_rss_bytes": host, "cuda_bytes": cuda}


def _cuda_in_use() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def memory_now() -> dict:
    """This process's memory at this instant, in bytes: the peak RSS so far (``ru_maxrss``,
    which only grows, so read at the end of a phase it is the peak reached by then), the
    current RSS (``/proc/self/statm``: what the phases so far keep alive; ``None`` where
    /proc is absent) and, when CUDA is in use, ``cuda_peak_bytes``: the CUDA allocator's
    peak since its statistics were last reset (:class:`PhaseRecorder` resets them at the
    start of every phase, so it is that phase's peak). The kernel batches RSS counts per
    thread, so the two RSS values can disagree by a few hundred KiB."""
    current = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as fh:
            current = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": int(rss) if sys.platform == "darwin" else int(rss) * 1024, "rss_bytes": current}
    if _cuda_in_use():
        import torch

        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


class PhaseRecorder:
    """Seconds and memory of the named phases of a run.

    ``seconds`` accumulates per name (LoSA's steps add to "importance", "prune",
    "finetune"); ``memory`` holds :func:`memory_now` at the end of every phase, in the order
    the phases end, under the phase's own key ("step2.prune"). With CUDA in use the
    allocator's peak is reset at each phase's start, so each record holds that phase's
    peak, and :meth:`peak_memory` the largest of them."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.memory: dict[str, dict] = {}
        self._start = time.perf_counter()
        self._cuda_peak: int | None = None

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str, key: str | None = None) -> Iterator[dict]:
        """Time the block under ``name`` and record memory under ``key`` (default: ``name``).
        Yields a dict whose "seconds" is set on exit."""
        timing: dict = {}
        if _cuda_in_use():
            import torch

            self._note_cuda_peak(int(torch.cuda.max_memory_allocated()))
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield timing
        timing["seconds"] = time.perf_counter() - t0
        self.add(name, timing["seconds"])
        self.memory[key or name] = memory_now()
        self._note_cuda_peak(self.memory[key or name].get("cuda_peak_bytes"))

    def _note_cuda_peak(self, value: int | None) -> None:
        if value is not None:
            self._cuda_peak = max(self._cuda_peak or 0, value)

    def total(self) -> dict[str, float]:
        """Seconds per phase plus the wall time since the recorder was made."""
        return {**self.seconds, "total": time.perf_counter() - self._start}

    def peak_memory(self) -> dict:
        """:func:`peak_memory`, with the CUDA peak over all phases (the per-phase resets
        hide earlier phases from the allocator's own counter)."""
        out = peak_memory()
        if out["cuda_bytes"] is not None or self._cuda_peak is not None:
            out["cuda_bytes"] = max(out["cuda_bytes"] or 0, self._cuda_peak or 0)
        return out


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for benchmark headers."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
