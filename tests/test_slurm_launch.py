"""The launch commands and environment that slurm/_common.sh builds, without a cluster:
the functions are sourced into bash with the variables a GPU or CPU job would have."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# a fake sbatch allocation: 2 nodes, 8 GPUs and 64 CPUs each (or a CPU job)
PRELUDE = r'''
set -u
export SLURM_JOB_ID=4242 SLURM_NNODES=2 SLURM_CPUS_PER_TASK=64 SLURM_JOB_NODELIST=gpu[01-02] SLURM_MEM_PER_NODE=512000
export LOSA_ZERO_HOME="$1" PYTHON=python3 GPU_MEMORY_GB=80 MASTER_ADDR=gpu01
source "$LOSA_ZERO_HOME/slurm/_common.sh"
scontrol() { return 1; }   # no cluster here
'''
DUMP = r'''
losa_settings
RUN_CONFIG=/tmp/run.yaml
losa_launch_cmd
python3 - "${LAUNCH[@]}" <<'PY'
import json, os, sys
keys = ("PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "DS_ACCELERATOR")
print(json.dumps({"launch": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}))
PY
'''


#: what the job's environment is checked for: a job starts without them unless ``env`` sets
#: them (the test process may have them, e.g. DS_ACCELERATOR from an in-process CLI run)
CHECKED = ("PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "DS_ACCELERATOR")


def job(env: dict, body: str = DUMP) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in CHECKED}
    r = subprocess.run(["bash", "-c", PRELUDE + "\n".join(f"export {k}={v}" for k, v in env.items()) + "\n" + body,
                        "job", str(REPO)], capture_output=True, text=True, timeout=120, env=base)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


GPU = {"SLURM_GPUS_ON_NODE": "8"}


def test_gpu_job_sets_the_allocator_and_nccl_debug_but_keeps_the_users():
    out = job(GPU)
    assert out["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert out["env"]["NCCL_DEBUG"] == "WARN" and out["env"]["DS_ACCELERATOR"] is None
    out = job(dict(GPU, PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:512", NCCL_DEBUG="INFO"))
    assert out["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512" and out["env"]["NCCL_DEBUG"] == "INFO"
    cpu = job({"DEVICE": "cpu"})
    assert cpu["env"]["PYTORCH_CUDA_ALLOC_CONF"] is None and cpu["env"]["DS_ACCELERATOR"] == "cpu"


def test_srun_launcher_binds_one_gpu_and_its_cores_per_task():
    launch = job(dict(GPU, LAUNCHER="srun"))["launch"]
    assert launch[0] == "srun" and "--ntasks-per-node=8" in launch and "--ntasks=16" in launch
    assert "--gpu-bind=per_task:1" in launch and "--cpu-bind=cores" in launch and "--cpus-per-task=8" in launch
    launch = job(dict(GPU, LAUNCHER="srun", SRUN_GPU_BIND="closest", SRUN_CPU_BIND="none"))["launch"]
    assert "--gpu-bind=closest" in launch and "--cpu-bind=none" in launch
    launch = job({"DEVICE": "cpu", "LAUNCHER": "srun", "NPROC_PER_NODE": "2"})["launch"]
    assert not any(a.startswith("--gpu-bind") for a in launch) and "--cpus-per-task=32" in launch
    launch = job(dict(GPU, LAUNCHER="mpi"))["launch"]   # srun --mpi: the same binding
    assert launch[:2] == ["srun", "--mpi=pmix"] and "--gpu-bind=per_task:1" in launch


def test_mpirun_passes_nccl_variables_by_name():
    launch = job(dict(GPU, LAUNCHER="mpi", MPI_LAUNCHER="mpirun", NCCL_SOCKET_IFNAME="ib0",
                      NCCL_IB_HCA="mlx5_0,mlx5_1", TORCH_NCCL_BLOCKING_WAIT="1"))["launch"]
    named = {launch[i + 1] for i, a in enumerate(launch) if a == "-x"}
    assert {"NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG", "TORCH_NCCL_BLOCKING_WAIT",
            "PYTORCH_CUDA_ALLOC_CONF", "MASTER_ADDR"} <= named

