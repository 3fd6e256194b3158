"""Distributed initialisation from whatever launched us: ``deepspeed`` / ``torchrun``
(RANK, WORLD_SIZE, LOCAL_RANK), ``srun`` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID),
``mpirun`` (Open MPI's OMPI_COMM_WORLD_*, MPICH/Intel MPI's PMI_*), or nothing (one process).

NCCL on GPU, gloo on CPU. Under SLURM and MPI the rendezvous address must be reachable by
every rank: MASTER_ADDR defaults to the first host of the SLURM allocation
(``scontrol show hostnames``), and MASTER_PORT to a port derived from the job id; set both
explicitly for MPI outside SLURM.

The GPU of a process is chosen from what the process can see, not from its launcher's local
rank alone: ``srun --gpus-per-task 1`` (or ``--gpu-bind``, or a CUDA_VISIBLE_DEVICES wrapper
around mpirun) leaves one visible device per task while SLURM_LOCALID still runs 0..7.
:func:`pick_device` is the one rule, and ``LOCAL_RANK`` is rewritten to the chosen index
because DeepSpeed's ``zero.Init`` and engine take their device from ``LOCAL_RANK``.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import LosaZeroError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str
    backend: str
    device: torch.device
    device_note: str = ""


def _first(env: dict, *names: str) -> str | None:
    for n in names:
        if env.get(n) not in (None, ""):
            return env[n]
    return None


def _slurm_first_host(nodelist: str) -> str | None:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        pass
    # "node[01-04,07],gpu3" -> "node01" without scontrol
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split(",")[0].split("-")[0].rstrip("]")
        return prefix + first
    return head or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(env: dict | None = None) -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, launcher) from the environment; fills MASTER_ADDR /
    MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK in ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    if _first(env, "RANK") is not None and _first(env, "WORLD_SIZE") is not None:
        launcher = "torchrun/deepspeed"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(_first(env, "LOCAL_RANK") or 0)
    elif _first(env, "SLURM_PROCID") is not None and _first(env, "SLURM_NTASKS") is not None:
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(_first(env, "SLURM_LOCALID") or 0)
        if not env.get("MASTER_ADDR"):
            nodelist = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST") or "localhost"
            env["MASTER_ADDR"] = _slurm_first_host(nodelist) or "localhost"
        if not env.get("MASTER_PORT"):
            env["MASTER_PORT"] = str(20000 + int(_first(env, "SLURM_JOB_ID") or 0) % 20000)
    elif _first(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") is not None:
        launcher = "mpi"
        rank = int(_first(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))
        world = int(_first(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE") or 0)
        local = int(_first(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PALS_LOCAL_RANKID") or 0)
        if world < 1:
            raise LosaZeroError("mpirun: cannot tell the world size (no OMPI_COMM_WORLD_SIZE / PMI_SIZE)")
        if not env.get("MASTER_ADDR") or not env.get("MASTER_PORT"):
            if world == 1:
                env.setdefault("MASTER_ADDR", "127.0.0.1")
                env.setdefault("MASTER_PORT", str(_free_port()))
            else:
                raise LosaZeroError("mpirun: export MASTER_ADDR (the host of rank 0) and MASTER_PORT to every rank "
                                    "(e.g. mpirun -x MASTER_ADDR=$(hostname) -x MASTER_PORT=29500 ...)")
    else:
        launcher = "single"
        rank, world, local = 0, 1, 0
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    return rank, world, local, launcher


@dataclass(frozen=True)
class DevicePick:
    index: int | None  # CUDA index inside this process's visible devices; None: CPU
    note: str          # one line for the log: which device and why


def pick_device(env: dict, visible: int) -> DevicePick:
    """The CUDA device of this process from the launcher's local rank (``env`` after
    :func:`detect`, so ``LOCAL_RANK`` is set) and the number of devices it can see.

    - none visible: CPU;
    - one visible (``srun --gpus-per-task 1``, ``--gpu-bind=single:1``, a per-rank
      CUDA_VISIBLE_DEVICES): that one, whatever the local rank;
    - several: local rank modulo their number (torchrun, the deepspeed launcher, srun or
      mpirun with every GPU of the node visible to every task; with fewer GPUs than
      tasks per node, NCCL refuses the shared device at init).
    """
    local = int(env.get("LOCAL_RANK") or 0)
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if visible < 1:
        return DevicePick(None, "cpu (no CUDA device in use)")
    index = 0 if visible == 1 else local % visible
    physical = ""
    if listed:
        ids = [x.strip() for x in listed.split(",") if x.strip()]
        if index < len(ids):
            physical = f", CUDA_VISIBLE_DEVICES entry {ids[index]}"
    rule = "the one visible device" if visible == 1 else f"local rank {local} mod {visible} visible devices"
    return DevicePick(index, f"cuda:{index} ({rule}{physical})")


def adopt_device(env: dict, pick: DevicePick) -> None:
    """Make DeepSpeed see the chosen device: its ``zero.Init`` and engine read ``LOCAL_RANK``
    as a CUDA index, and its engine asserts ``LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK``
    under Open MPI. The launcher's own local rank stays in ``LOSA_ZERO_LAUNCHER_LOCAL_RANK``."""
    if pick.index is None:
        return
    env.setdefault("LOSA_ZERO_LAUNCHER_LOCAL_RANK", env.get("LOCAL_RANK", "0"))
    env["LOCAL_RANK"] = str(pick.index)
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        env["OMPI_COMM_WORLD_LOCAL_RANK"] = str(pick.index)


def check_timeout(minutes: float) -> timedelta:
    if not minutes or minutes <= 0:
        raise LosaZeroError(f"dist_timeout_minutes must be > 0 (got {minutes}): collectives wait this long for a slow rank")
    return timedelta(minutes=minutes)


def init_distributed(backend: str = "auto", timeout_minutes: float = 60.0) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (idempotent). ``timeout_minutes``
    bounds how long a collective waits for the slowest rank (torch's default of 10 minutes
    is shorter than one rank writing a large checkpoint shard to shared storage)."""
    import deepspeed
    import torch.distributed as dist

    timeout = check_timeout(timeout_minutes)
    rank, world, local, launcher = detect()
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    pick = pick_device(os.environ, torch.cuda.device_count() if use_cuda else 0)
    if pick.index is not None:
        adopt_device(os.environ, pick)
        torch.cuda.set_device(pick.index)  # before init: NCCL binds the communicator to it
        device = torch.device("cuda", pick.index)
    else:
        device = torch.device("cpu")
    if not use_cuda and not os.environ.get("LOSA_ZERO_BUILD_SHM_OP"):
        # DeepSpeed compiles a shared-memory all-reduce op (deepspeed_shm_comm) at the first
        # CPU init: ~35 s on 2 cores, and a process killed during the build leaves a lock
        # that hangs every later run. Only DeepSpeed-Inference's all-reduce uses it.
        with contextlib.suppress(Exception):
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world,
                                   timeout=timeout)
    return DistEnv(rank, world, local, launcher, backend, device, pick.note)
