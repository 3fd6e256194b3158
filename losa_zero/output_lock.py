"""A lock on an output folder: two runs never write the same ``--out`` at once.

The lock is a file ``OUT.lock`` beside the output, created atomically (a hard link of a
fully written temporary file: ``link(2)`` fails when the name exists, on local disks and on
the shared filesystems of a cluster, NFS included), so a second run sees it at once and
stops before any work. It records who holds it: host, boot id, pid namespace, pid and the
process's start time, the SLURM job id and restart count, and a random token.

A run killed with SIGKILL (or a node that died) leaves its lock behind, and a stale lock
must not block the output forever. Whether the holder is gone is decided differently by
where it ran:

* the same machine (same host name, boot id and pid namespace): the holder is gone when
  its pid no longer exists or now belongs to a process started at another time (pid reuse).
  This is exact, so a rerun after a kill starts at once;
* another machine, or a host that has rebooted since: the pid says nothing here. The holder
  refreshes the lock file's modification time every :data:`HEARTBEAT_S` seconds (a thread),
  and the lock is stale once that time is more than :data:`STALE_S` seconds old, or at
  once when the lock was taken by an earlier run of the same SLURM job (a requeued job: same
  ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``; SLURM starts the requeued run only after
  the previous one ended), so a job requeued onto another node is not held up.

A stale lock is taken over with a warning naming the holder. The run checks before its
final rename that the lock is still its own, so a run whose lock was taken over (a process
stopped for longer than :data:`STALE_S`, then continued) never replaces the output.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .errors import LosaZeroError

#: seconds between two refreshes of the lock file's modification time
HEARTBEAT_S = 30.0
#: a lock of another machine not refreshed for this long belongs to a dead run
STALE_S = 300.0


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None where
    /proc is absent. Tells a live holder from a new process that reuses its pid."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


def this_process() -> dict:
    """The holder record of this process."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return {"host": socket.gethostname(), "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns,
            "pid": os.getpid(), "start": _start_ticks(os.getpid()), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": _int_env("SLURM_RESTART_COUNT"), "time": time.time()}


def describe(holder: dict | None) -> str:
    if not holder:
        return "an unreadable lock"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}"


def stale_reason(holder: dict | None, age_s: float, me: dict | None = None) -> str | None:
    """Why the lock of ``holder`` (last refreshed ``age_s`` seconds ago) belongs to a dead
    run, or None when its holder may be alive (see the module docstring)."""
    me = me or this_process()
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return "the lock file is unreadable"
    same_machine = all(holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))
    if same_machine:
        pid = holder["pid"]
        if not _pid_alive(pid):
            return f"process {pid} is gone"
        start = _start_ticks(pid)
        if holder.get("start") is not None and start is not None and start != holder["start"]:
            return f"process {pid} is gone (its pid now belongs to another process)"
        return None
    if holder.get("host") == me["host"] and holder.get("boot_id") != me["boot_id"]:
        return "the host has restarted since"
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"] and int(holder.get("slurm_restart_count") or 0) < me["slurm_restart_count"]:
        return f"it was taken by an earlier run of SLURM job {job}, requeued since"
    if age_s > STALE_S:
        return f"it has not been refreshed for {age_s:.0f}s (the holder refreshes it every {HEARTBEAT_S:.0f}s)"
    return None


class OutputLock:
    """``OUT.lock``: :meth:`acquire` at the start of a run, :meth:`release` at its end."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out.with_name(f"{self.out.name}.lock")
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> list[str]:
        """Take the lock, or raise :class:`LosaZeroError` naming the live holder. Returns the
        warnings about stale locks taken over."""
        notes = []
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return notes
            holder, age = self._holder(self.path)
            if holder is None and age is None:
                continue  # released meanwhile
            why = stale_reason(holder, age)
            if why is None:
                raise LosaZeroError(
                    f"{self.out} is being written by another run ({describe(holder)}, lock {self.path}): wait for it "
                    f"to end or choose another --out (a lock of a dead run is taken over by itself: at once on the "
                    f"same machine, after {STALE_S:.0f}s without refresh from another one)")
            if self._break(holder):
                notes.append(f"took over the lock {self.path} of a run that is gone ({describe(holder)}: {why})")
        raise LosaZeroError(f"could not take the lock {self.path}: other runs keep taking it; choose another --out")

    def _create(self) -> bool:
        record = dict(this_process(), token=self.token, out=str(self.out))
        staged = self.path.with_name(f".{self.path.name}.{self.token}")
        try:
            with open(staged, "w") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(staged, self.path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive create instead
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as fh:
                    json.dump(record, fh)
            return True
        except OSError as exc:
            raise LosaZeroError(f"cannot write in {self.out.parent} ({exc.strerror}): choose another --out") from None
        finally:
            try:
                staged.unlink()
            except OSError:
                pass

    @staticmethod
    def _holder(path: Path) -> tuple[dict | None, float | None]:
        """(holder record or None when unreadable, age in seconds) or (None, None) if absent."""
        try:
            age = time.time() - path.stat().st_mtime
            text = path.read_text()
        except FileNotFoundError:
            return None, None
        except OSError:
            return None, 0.0
        try:
            return json.loads(text), age
        except ValueError:
            return None, age

    def _break(self, holder: dict | None) -> bool:
        """Move the stale lock aside, making sure it is the one judged stale (another run may
        have replaced it meanwhile: then it is put back)."""
        aside = self.path.with_name(f".{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved, _ = self._holder(aside)
        same = (moved or {}).get("token") == (holder or {}).get("token")
        if not same:
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        try:
            aside.unlink()
        except OSError:
            pass
        return same

    def held(self) -> bool:
        """The lock file is still this run's (not taken over as stale by another run)."""
        holder, _ = self._holder(self.path)
        return (holder or {}).get("token") == self.token

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name="losa-zero-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self.held():
            try:
                self.path.unlink()
            except OSError:
                pass
