"""Preemption and time limits: stop at a point every rank agrees on, checkpoint, requeue.

SLURM warns a job before its time limit (``#SBATCH --signal=B:USR1@600``) or before a
preemption (SIGTERM, then SIGKILL after ``KillWait``). The batch script relays the signal
to every rank (``slurm/_common.sh``). Ranks receive it at different moments, and saving a
ZeRO-3 checkpoint is collective, so nothing may act on the signal where it lands:

1. :func:`install` puts a handler on SIGUSR1 / SIGTERM that only sets a local flag (no
   I/O, no collective, no exception: safe at any instruction, also inside NCCL/gloo calls);
2. at one fixed point of the loop (the optimizer-step boundary, and the end of each LoSA
   step) every rank calls :func:`should_stop`, which all-reduces the flag with MAX, so all
   ranks get the same answer at the same step;
3. on ``True`` the loop saves a checkpoint, rank 0 writes :data:`MARKER` into the
   checkpoint directory (:func:`write_marker`), and every rank exits with
   :data:`REQUEUE_EXIT_CODE` (:func:`exit_for_requeue`).

The batch script requeues the job when it sees exit code 75 (``srun``) or the marker
(launchers such as ``torchrun`` turn a worker's exit code into their own), and the
requeued job continues from the newest complete checkpoint (``resume: auto``).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

#: "checkpointed, requeue me": sysexits' EX_TEMPFAIL (a temporary failure; retry later)
REQUEUE_EXIT_CODE = 75
#: written by rank 0 into the checkpoint directory after the stop checkpoint is complete
MARKER = "PREEMPTED.json"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_requested: list[int] = []      # signal numbers received (appending is async-signal safe enough)
_previous: dict[int, object] = {}


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    # Only record: the stop is decided collectively at the next fixed point.
    _requested.append(signum)


def install(signals: tuple[int, ...] = STOP_SIGNALS) -> bool:
    """Set the flag-only handler on ``signals`` (idempotent). False when not in the main
    thread (Python allows handlers only there)."""
    for sig in signals:
        try:
            prev = signal.signal(sig, _handler)
        except (ValueError, OSError):
            return False
        if sig not in _previous and prev is not _handler:
            _previous[sig] = prev
    return True


def uninstall() -> None:
    """Restore the handlers that were in place before :func:`install`."""
    for sig, prev in list(_previous.items()):
        try:
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        except (ValueError, OSError):
            pass
        del _previous[sig]


def requested() -> bool:
    """This rank received a stop signal (local; use :func:`should_stop` to act on it)."""
    return bool(_requested)


def received_signals() -> list[str]:
    return [signal.Signals(s).name for s in _requested]


def request(signum: int = signal.SIGUSR1) -> None:
    """Ask for a stop as if ``signum`` had arrived (tests, or a time budget of our own)."""
    _requested.append(int(signum))


def reset() -> None:
    _requested.clear()


def _device_of(runtime):
    import torch

    dev = getattr(runtime, "device", None) if runtime is not None else None
    if dev is None:
        return torch.device("cpu")
    return torch.device(dev)


def should_stop(runtime=None) -> bool:
    """Whether any rank has received a stop signal: the flag all-reduced with MAX.

    Collective: every rank must call it at the same point (each optimizer step). Without
    an initialised process group it is the local flag. The tensor lives on the runtime's
    device (NCCL needs a CUDA tensor; gloo a CPU one).
    """
    local = 1 if _requested else 0
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return bool(local)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(local)
    flag = torch.tensor([local], dtype=torch.int32, device=_device_of(runtime))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(int(flag.item()))


def write_marker(ckpt_dir: str | Path, checkpoint: str | Path | None = None, **extra) -> Path:
    """Rank 0, after the stop checkpoint is complete: ``MARKER`` (atomically) saying which
    checkpoint the requeued job will resume from."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    info = {"checkpoint": str(checkpoint) if checkpoint is not None else None,
            "signals": received_signals(), "time": time.time(), "exit_code": REQUEUE_EXIT_CODE,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
    info.update(extra)
    tmp = d / f".{MARKER}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MARKER)
    return d / MARKER


def read_marker(ckpt_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(ckpt_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def clear_marker(ckpt_dir: str | Path) -> None:
    """At the start of a run: a marker from an earlier stop is history now."""
    try:
        (Path(ckpt_dir) / MARKER).unlink()
    except FileNotFoundError:
        pass


def shutdown_process_group() -> None:
    """Destroy the default process group if there is one. A gloo/NCCL process exiting with
    its group alive can abort in the C++ teardown ("terminate called without an active
    exception", SIGABRT) when its peers are gone first, which turns a clean exit code into -6."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def exit_for_requeue(message: str | None = None) -> None:
    """Leave the process with :data:`REQUEUE_EXIT_CODE` (raises SystemExit) after destroying
    the process group, so the launcher sees 75 and not a teardown abort."""
    import sys

    if message:
        print(message, file=sys.stderr, flush=True)
    shutdown_process_group()
    raise SystemExit(REQUEUE_EXIT_CODE)
