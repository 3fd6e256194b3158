"""Which GPU each rank takes, for every launch command in the README, from the environment
the launcher gives the process and the number of devices the process can see."""
from __future__ import annotations

import pytest

from losa_zero.errors import LosaZeroError
from losa_zero.zero3 import dist_env

LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID", "OMPI_COMM_WORLD_RANK",
               "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
               "PMIX_RANK", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "LOSA_ZERO_LAUNCHER_LOCAL_RANK")


def visible_count(env: dict) -> int:
    """What torch.cuda.device_count() reports for an 8-GPU node under this environment."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    return 8 if listed is None else len([x for x in listed.split(",") if x.strip()])


def physical_gpu(env: dict, index: int) -> str:
    listed = env.get("CUDA_VISIBLE_DEVICES")
    return str(index) if listed is None else listed.split(",")[index]


def node_tasks(launch: str, node: int = 0, per_node: int = 8, nodes: int = 2) -> list[dict]:
    """The environment each task of one node gets from the README's launch commands."""
    out = []
    for local in range(per_node):
        rank, world = node * per_node + local, nodes * per_node
        if launch == "torchrun":      # torchrun --nnodes 2 --nproc_per_node 8
            e = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": per_node,
                 "MASTER_ADDR": "n0", "MASTER_PORT": 29500}
        elif launch == "deepspeed":   # deepspeed --num_gpus 8 (it also exports CUDA_VISIBLE_DEVICES)
            e = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local, "MASTER_ADDR": "n0", "MASTER_PORT": 29500,
                 "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(per_node)))}
        elif launch.startswith("srun"):
            e = {"SLURM_PROCID": rank, "SLURM_NTASKS": world, "SLURM_LOCALID": local, "SLURM_JOB_ID": 77,
                 "MASTER_ADDR": "n0", "MASTER_PORT": 29500}
            if launch == "srun-gpus-per-task":     # --gpus-per-task 1 or --gpu-bind=per_task:1 (slurm/_common.sh)
                e["CUDA_VISIBLE_DEVICES"] = str(local)
            elif launch == "srun-gpus-per-task-cgroup":  # ConstrainDevices=yes renumbers the one GPU to 0
                e["CUDA_VISIBLE_DEVICES"] = "0"
            else:                                  # --gpus-per-node 8, no binding: all visible
                e["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(per_node)))
        elif launch == "mpirun":      # mpirun -np 16 -x MASTER_ADDR -x MASTER_PORT
            e = {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": world, "OMPI_COMM_WORLD_LOCAL_RANK": local,
                 "MASTER_ADDR": "n0", "MASTER_PORT": 29500}
        elif launch == "mpirun-bound":  # a wrapper exporting CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK
            e = {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": world, "OMPI_COMM_WORLD_LOCAL_RANK": local,
                 "MASTER_ADDR": "n0", "MASTER_PORT": 29500, "CUDA_VISIBLE_DEVICES": str(local)}
        elif launch == "mpich":       # MPICH / Intel MPI (Hydra): PMI_RANK, MPI_LOCALRANKID
            e = {"PMI_RANK": rank, "PMI_SIZE": world, "MPI_LOCALRANKID": local, "MASTER_ADDR": "n0",
                 "MASTER_PORT": 29500}
        else:
            raise ValueError(launch)
        out.append({k: str(v) for k, v in e.items()})
    return out


LAUNCHES = ["torchrun", "deepspeed", "srun", "srun-gpus-per-task", "srun-gpus-per-task-cgroup", "mpirun",
            "mpirun-bound", "mpich"]


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("node", [0, 1])
def test_every_task_of_a_node_gets_its_own_gpu_and_local_rank_agrees(launch, node):
    gpus = []
    for env in node_tasks(launch, node):
        launcher_local = next(env[k] for k in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK",
                                               "MPI_LOCALRANKID") if k in env)
        dist_env.detect(env)
        pick = dist_env.pick_device(env, visible_count(env))
        assert pick.index is not None and 0 <= pick.index < visible_count(env)   # a valid ordinal
        dist_env.adopt_device(env, pick)
        assert env["LOCAL_RANK"] == str(pick.index)            # what zero.Init and the engine read
        if "OMPI_COMM_WORLD_LOCAL_RANK" in env:                 # DeepSpeed asserts these agree
            assert env["OMPI_COMM_WORLD_LOCAL_RANK"] == env["LOCAL_RANK"]
        assert env["LOSA_ZERO_LAUNCHER_LOCAL_RANK"] == launcher_local
        gpus.append(physical_gpu(env, pick.index))
    if launch != "srun-gpus-per-task-cgroup":   # there every task's "0" is a different physical GPU
        assert sorted(gpus) == sorted(map(str, range(8))), gpus


def test_visible_device_lists():
    env = {"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "2,3"}
    pick = dist_env.pick_device(env, 2)
    assert pick.index == 1 and "entry 3" in pick.note
    env = {"LOCAL_RANK": "5", "CUDA_VISIBLE_DEVICES": "GPU-8f2c,GPU-19aa"}   # UUIDs; 4 tasks per 2 GPUs
    pick = dist_env.pick_device(env, 2)
    assert pick.index == 1 and "GPU-19aa" in pick.note
    env = {"LOCAL_RANK": "6", "CUDA_VISIBLE_DEVICES": "4"}
    assert dist_env.pick_device(env, 1).index == 0
    env = {"LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}
    pick = dist_env.pick_device(env, 0)
    assert pick.index is None and pick.note.startswith("cpu")
    env = {"LOCAL_RANK": "3"}
    assert dist_env.pick_device(env, 0).index is None
    assert dist_env.adopt_device(env, dist_env.pick_device(env, 0)) is None and env["LOCAL_RANK"] == "3"


def test_timeout_is_validated():
    assert dist_env.check_timeout(60).total_seconds() == 3600
    for bad in (0, -5):
        with pytest.raises(LosaZeroError, match="dist_timeout_minutes"):
            dist_env.check_timeout(bad)


def test_init_sets_the_device_before_the_process_group(monkeypatch):
    """srun --gpus-per-task 1, task with SLURM_LOCALID 3 on a machine where CUDA is faked:
    set_device(0) happens before init_distributed, LOCAL_RANK is 0 by then, the timeout is passed."""
    import deepspeed
    import torch
    import torch.distributed as dist

    for k in LAUNCH_KEYS:  # set, then delete: teardown then also removes what init_distributed writes
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    for k, v in {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "MASTER_ADDR": "n0",
                 "MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": "3"}.items():
        monkeypatch.setenv(k, v)
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: events.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def fake_init(**kw):
        import os

        events.append(("init", kw["dist_backend"], kw["rank"], kw["world_size"], kw["timeout"].total_seconds(),
                       os.environ["LOCAL_RANK"]))

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    env = dist_env.init_distributed("auto", timeout_minutes=90)
    assert events == [("set_device", 0), ("init", "nccl", 11, 16, 5400.0, "0")]
    assert env.device == torch.device("cuda", 0) and env.local_rank == 3 and env.launcher == "slurm"
    assert "CUDA_VISIBLE_DEVICES entry 3" in env.device_note


def test_timeout_run_config_key(tmp_path, stories_model_dir):
    from losa_zero.train_command import build_run_config

    f = tmp_path / "run.yaml"
    f.write_text(f"model: {stories_model_dir}\ncalib: x.txt\ntrain: x.txt\nsparsity: 0.7\nout: {tmp_path / 'o'}\n")
    assert build_run_config(str(f), []).dist_timeout_minutes == 60
    assert build_run_config(str(f), ["dist_timeout_minutes=180"]).dist_timeout_minutes == 180
    for bad in ("0", "-1"):
        with pytest.raises(LosaZeroError, match="dist_timeout_minutes must be > 0"):
            build_run_config(str(f), [f"dist_timeout_minutes={bad}"])
