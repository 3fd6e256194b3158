"""Crash-safe outputs and resource reporting.

Pruning and fine-tuning runs take hours and may be killed (OOM, scheduler preemption).
A half-written model directory that *looks* complete is worse than none, because a later
evaluation would silently score a broken checkpoint. So every output directory is built
under a temporary sibling name and only renamed into place once it is complete; rename
within one filesystem is atomic on POSIX. The same code also makes sure that an output
never destroys an input of the run, that two runs never write one output at once (a lock,
:mod:`losa_zero.output_lock`), and that what killed runs leave is cleaned up by the next.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from losa_zero.errors import LosaZeroError
from losa_zero.output_lock import OutputLock

log = logging.getLogger("losa_zero")


#: inside a temporary output while it is being written; only folders holding it are deleted
#: as leftovers of killed runs (a folder merely named like one is never touched)
INCOMPLETE = ".losa-zero-incomplete"


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_output_path(path: str | os.PathLike, inputs: list[tuple[str, object]] = ()) -> Path:
    """``--out`` resolved, or :class:`LosaZeroError` when writing there could destroy something.

    With ``--overwrite`` the old output is deleted once the new one is in place, and
    ``train`` deletes its checkpoint files after the export, so ``--out`` must not be,
    contain or lie inside any input of the run (``inputs``: (option, path) pairs) nor the
    working folder; a symbolic link as ``--out`` is refused (the rename would replace the
    link, not the folder it points to)."""
    given = Path(path)
    if given.is_symlink():
        raise LosaZeroError(f"--out {given} is a symbolic link (to {os.readlink(given)}): pass the folder itself "
                            "or a new path")
    real = Path(os.path.realpath(given))
    if real.parent == real:
        raise LosaZeroError(f"--out {given} is a filesystem root: pass a new folder for the output")
    cwd = Path(os.path.realpath(os.getcwd()))
    if _inside(cwd, real):
        raise LosaZeroError(f"--out {given} is the current folder or contains it: pass a new folder for the output")
    for option, value in inputs:
        if value is None or str(value) == "":
            continue
        other = Path(os.path.realpath(Path(value).expanduser()))
        how = ("is" if other == real else "contains" if _inside(other, real)
               else "lies inside" if _inside(real, other) else None)
        if how:
            raise LosaZeroError(f"--out {given} {how} {option} {value}: a run never writes where its inputs are "
                                "(--overwrite would delete them); choose another --out")
    return real


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the created ones, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LosaZeroError(f"cannot create the folder {folder}: {exc.strerror}; choose another --out") from exc
    return missing


def _remove_empty(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break


def clean_leftovers(path: Path) -> list[str]:
    """Called holding ``path``'s lock, so no live run writes next to it: removes the
    temporary outputs of killed runs (``OUT.tmp-PID`` holding :data:`INCOMPLETE`), names the
    ones it may not remove, and puts back an output moved aside by a replacement that was
    killed half-way (``OUT.old-PID`` while ``OUT`` is missing). Returns what it did, to log."""
    notes = []
    tmp_name = re.compile(re.escape(path.name) + r"\.tmp-\d+")
    old_name = re.compile(re.escape(path.name) + r"\.old-\d+")
    for sib in sorted(path.parent.iterdir()):
        if sib.is_symlink() or not sib.is_dir():
            continue
        if tmp_name.fullmatch(sib.name):
            if (sib / INCOMPLETE).is_file():
                shutil.rmtree(sib, ignore_errors=True)
                notes.append(f"removed {sib}, the temporary output of a run that was killed")
            else:
                notes.append(f"{sib} looks like a temporary output but is not marked as one: delete it if you do "
                             "not need it")
        elif old_name.fullmatch(sib.name):
            if not path.exists():
                os.rename(sib, path)
                notes.append(f"put {sib} back as {path}: a run replacing it was killed half-way")
            else:
                notes.append(f"{sib} is an output replaced by a run that was killed before deleting it: delete it "
                             f"once {path} is checked")
    return notes


def _prepare(path: Path, overwrite: bool, inputs) -> tuple[Path, Path, OutputLock, list[Path]]:
    """The checks, the lock, the leftovers, the temporary folder (rank 0 / one process)."""
    real = check_output_path(path, inputs)
    created = _make_parents(real.parent)
    lock = OutputLock(real)
    try:
        for note in lock.acquire() + clean_leftovers(real):
            log.warning(note)
        if real.exists() and not overwrite:
            raise LosaZeroError(f"output directory {path} already exists: choose another --out or pass --overwrite")
        if real.exists() and not real.is_dir():
            raise LosaZeroError(f"output path {path} exists and is not a directory: choose another --out")
        tmp = real.with_name(f"{real.name}.tmp-{os.getpid()}")
        try:
            tmp.mkdir()
            (tmp / INCOMPLETE).write_text(json.dumps({"pid": os.getpid(), "lock": lock.token}))
        except FileExistsError:
            raise LosaZeroError(f"{tmp} exists and is not a temporary output of losa-zero: move it away") from None
        except OSError as exc:
            raise LosaZeroError(f"cannot write in {real.parent} ({exc.strerror}): choose another --out") from None
    except BaseException:
        lock.release()
        _remove_empty(created)
        raise
    return real, tmp, lock, created


def _from_rank0(runtime, mine, error: BaseException | None):
    """Rank 0's ``(value, error message)`` on every rank (collective); rank 0 re-raises its
    own error, the others raise its message as a :class:`LosaZeroError`."""
    sent = (mine, None if error is None else str(error)) if runtime.is_main else None
    value, message = runtime.all_gather_object(sent)[0]
    if error is not None:
        raise error
    if message is not None:
        raise LosaZeroError(message)
    return value


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, runtime=None,
                      inputs: list[tuple[str, object]] = (), on_commit=None) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only on success.

    Every check happens on enter, before the caller does any (possibly hours-long) work:
    the refusal rules of :func:`check_output_path` (``inputs``: the run's (option, path)
    pairs), the lock ``OUT.lock`` (:class:`~losa_zero.output_lock.OutputLock`; a second run
    to the same ``path`` fails at once), the leftovers of killed runs
    (:func:`clean_leftovers`), the clash with an earlier result. The temporary directory
    ``OUT.tmp-PID`` is a sibling (same filesystem) so the final rename is atomic. On an
    exception (``KeyboardInterrupt`` and SIGTERM's :class:`~losa_zero.errors.Terminated`
    included) it is removed and ``path`` is left untouched. An output that appeared at
    ``path`` during the run is replaced only with ``overwrite``; otherwise the result is
    kept as ``OUT.new-PID`` and the run fails. ``on_commit`` runs (on every rank) after the
    rename, still holding the lock.

    With a multi-rank ``runtime`` rank 0 alone checks, locks, creates, renames or removes,
    every rank gets rank 0's temporary directory (the ranks write their shards of the model
    into it), rank 0's errors are raised on every rank, and the rename waits for every rank.
    """
    main = runtime is None or runtime.is_main
    lock, created, tmp, error = None, [], None, None
    if main:
        try:
            path, tmp, lock, created = _prepare(Path(path), overwrite, inputs)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank
            if runtime is None:
                raise
            error = exc
    if runtime is not None:
        tmp = Path(_from_rank0(runtime, str(tmp), error))
    barrier = runtime.barrier if runtime is not None else (lambda: None)
    try:
        try:
            yield tmp
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                _remove_empty(created)
            raise
        barrier()  # every rank has written its part
        error = None
        if main:
            try:
                _commit(tmp, Path(path), overwrite, lock)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank
                if runtime is None:
                    raise
                error = exc
        if runtime is not None:
            _from_rank0(runtime, None, error)
        if on_commit is not None:
            on_commit()
        barrier()
    finally:
        if lock is not None:
            lock.release()


def _commit(tmp: Path, path: Path, overwrite: bool, lock: OutputLock) -> None:
    keep = path.with_name(f"{path.name}.new-{os.getpid()}")
    if not lock.held():
        (tmp / INCOMPLETE).unlink(missing_ok=True)
        os.rename(tmp, keep)
        raise LosaZeroError(f"another run took over the lock of {path} (this run was stopped longer than the lock "
                            f"allows?): {path} is left as it is; this run's result is in {keep}")
    (tmp / INCOMPLETE).unlink(missing_ok=True)
    if path.exists() or path.is_symlink():
        if not overwrite:
            os.rename(tmp, keep)
            raise LosaZeroError(f"{path} appeared while this run was working and is not replaced without "
                                f"--overwrite: this run's result is in {keep}")
        _replace(tmp, path)
        return
    try:
        os.rename(tmp, path)  # refuses a non-empty folder created meanwhile
    except OSError:
        os.rename(tmp, keep)
        raise LosaZeroError(f"{path} appeared while this run was working and is not replaced without "
                            f"--overwrite: this run's result is in {keep}") from None


def _replace(tmp: Path, path: Path) -> None:
    # With overwrite, keep the old result until the new one is in place so that at every
    # instant one complete directory exists under some name.
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


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


def check_writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Fail at once (before hours of work) when ``path`` cannot be written: its folder is
    missing or read-only, or the path is a folder."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise LosaZeroError(f"{flag} {p} is a folder: pass a file path")
    if not parent.is_dir():
        raise LosaZeroError(f"{flag} {p}: folder {parent} does not exist: create it or choose another path")
    try:  # a real write: permission bits say nothing for root, nor for read-only mounts
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{p.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise LosaZeroError(f"{flag} {p} cannot be written ({exc.strerror} in {parent}): choose another path") from None
    return p
