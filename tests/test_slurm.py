"""``sbatch slurm/losa_70b.sh`` on a real SLURM cluster that this file starts and stops.

The cluster (tests/slurm_cluster.py): munge, slurmctld and two ``slurmd -N nodeX`` on this
host, one CPU each. The jobs run the stories260K fixture with the CPU DeepSpeed config, 2
nodes x 1 rank (one torchrun per node, c10d rendezvous on node1), gloo.

- the job runs to the end and its exported model equals a run started directly (torchrun,
  2 ranks, no SLURM) with the same run config; a resubmission finds it finished and exits 0;
- preemption: ``scancel --signal=USR1 --batch`` during fine-tuning -> every rank checkpoints
  at the same optimizer step, the job requeues itself, resumes (resume: auto) and finishes
  with the uninterrupted run's model.

SLURM holds a requeued job for the credential lifetime (120 s by default; the test cluster
sets 10 s) before it may start again. Skipped, with the package names, where the SLURM /
munge programs are not installed; the daemons need root.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import ClusterError, LocalSlurmCluster, missing_binaries  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train" / "losa.py"
SCRIPT_70B = REPO / "slurm" / "losa_70b.sh"
CPU_DS = REPO / "ds_configs" / "zero3_cpu_test.json"
JOB_TIMEOUT = 240

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The fixture run: 2 LoSA steps, 20 optimizer steps each (enough to signal mid-fine-tuning)
RECIPE = {
    "sparsity": 0.7, "steps": 2, "pruner": "wanda", "nsamples": 16, "seqlen": 128, "cka_nsamples": 16,
    "calib_batch_size": 8, "samples_per_step": 160, "final_step_samples": 160, "max_length": 128,
    "batch_size": 8, "micro_batch_size": 4, "lr": 3.0e-3, "optimizer": "adamw", "dtype": "float32",
    "checkpoint_every": 0,
}


def _needs() -> str | None:
    missing = missing_binaries()
    if missing:
        return (f"SLURM/munge programs missing ({', '.join(missing)}): apt-get install munge slurmctld slurmd "
                "slurm-client")
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd runs jobs as their user)"
    if not TRAIN.is_file():
        return "train/losa.py (the ZeRO-3 entry point) is not there yet"
    return None


@pytest.fixture(scope="module")
def cluster():
    why = _needs()
    if why:
        pytest.skip(why)
    c = LocalSlurmCluster(nodes=2, keep_dir=bool(os.environ.get("LOSA_SLURM_KEEP")))  # keep logs to debug
    try:
        c.start(timeout=90)
    except ClusterError as e:
        c.stop()
        pytest.fail(f"could not start the local SLURM cluster:\n{e}")
    try:
        yield c
    finally:
        c.stop()


def job_env(cluster: LocalSlurmCluster, tmp: Path) -> dict:
    env = cluster.env
    env.update({
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHON": sys.executable, "LOSA_ZERO_HOME": str(REPO),
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    })
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OUTPUT_DIR", "CONFIG", "RECIPE",
              "DS_CONFIG", "OFFLOAD", "EXTRA_ARGS", "LOSA_ZERO_TEST_HOLD"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def setup(cluster, stories_model_dir, tinystories_split, tmp_path_factory):
    eval_txt, train_txt = tinystories_split
    tmp = tmp_path_factory.mktemp("slurm")
    os.chmod(tmp, 0o755)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = job_env(cluster, tmp)
    env.update({"MODEL": str(stories_model_dir), "CALIB": str(train_txt), "TRAIN_DATA": str(train_txt),
                "RECIPE": str(recipe), "DS_CONFIG": str(CPU_DS)})
    return {"tmp": tmp, "env": env, "recipe": recipe, "model": stories_model_dir, "train": train_txt}


@pytest.fixture(scope="module")
def reference(setup):
    """The same run config started directly: torchrun, 2 ranks on this host, no SLURM."""
    tmp = setup["tmp"]
    out = tmp / "direct"
    cfg = dict(RECIPE, model=str(setup["model"]), calib=str(setup["train"]), train=str(setup["train"]),
               deepspeed=str(CPU_DS), out=str(out / "model"), checkpoint_dir=str(out / "checkpoints"))
    cfg_path = tmp / "direct.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in setup["env"].items() if not k.startswith("SLURM")}
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(TRAIN), str(cfg_path)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"model": out / "model", "seconds": time.monotonic() - t0}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_model_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_model(a: Path, b: Path, atol: float = 1e-6) -> None:
    ta, tb = load_model_tensors(a), load_model_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].shape == tb[k].shape, k
        assert ((ta[k] == 0) == (tb[k] == 0)).all(), f"{k}: different sparsity pattern"
        diff = (ta[k].double() - tb[k].double()).abs().max().item()
        assert diff <= atol, f"{k}: max abs difference {diff}"
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa["achieved_sparsity"] == pytest.approx(sb["achieved_sparsity"], abs=1e-9)


def sbatch_70b(cluster: LocalSlurmCluster, env: dict, out_dir: Path, name: str) -> int:
    env = dict(env, OUTPUT_DIR=str(out_dir))
    return cluster.sbatch("--job-name", name, "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                          "--cpus-per-task=1", "--mem=0", "--time=20",
                          f"--output={out_dir.parent}/%x-%j.out", str(SCRIPT_70B), env=env)


def job_output(info: dict) -> str:
    try:
        return Path(info["StdOut"]).read_text(errors="replace")
    except (KeyError, OSError):
        return ""


def no_leftover_processes(marker: str) -> list[str]:
    """Processes whose command line mentions ``marker`` (the run's output directory)."""
    left = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                left.append(f"{d.name}: {cmd[:200]}")
    return left


@pytest.mark.timeout(420)
def test_sbatch_70b_runs_to_the_end_and_matches_a_direct_run(cluster, setup, reference):
    out_dir = setup["tmp"] / "job"
    t0 = time.monotonic()
    job = sbatch_70b(cluster, setup["env"], out_dir, "losa-fixture")
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, JOB_TIMEOUT)
    text = job_output(info)
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{text[-5000:]}"
    seconds = time.monotonic() - t0
    # the planner ran first and the run used both nodes through one rendezvous
    assert "losa-zero plan" in text and "FITS" in text, text[-3000:]
    assert "2 node(s) x 1" in text and "2 rank(s) via torchrun" in text, text[-3000:]
    assert (out_dir / "DONE").is_file()
    s = json.loads((out_dir / "model" / "summary.json").read_text())
    assert s["world_size"] == 2
    assert_same_model(out_dir / "model", reference["model"])
    # the job's run config is the direct run's, plus where things go
    job_cfg = yaml.safe_load((out_dir / "run.yaml").read_text())
    for k, v in RECIPE.items():
        assert job_cfg[k] == v, k
    assert job_cfg["resume"] == "auto" and job_cfg["deepspeed"] == str(CPU_DS)
    assert not no_leftover_processes(str(out_dir)), no_leftover_processes(str(out_dir))

    # a resubmission finds the run finished and exits 0 without work
    t1 = time.monotonic()
    again = sbatch_70b(cluster, setup["env"], out_dir, "losa-fixture-again")
    info2 = cluster.wait_state(again, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 60)
    assert info2["JobState"] == "COMPLETED", job_output(info2)[-3000:]
    assert "already finished" in job_output(info2) and time.monotonic() - t1 < 30
    print(f"\nsbatch run {seconds:.1f}s, direct run {reference['seconds']:.1f}s")


@pytest.mark.timeout(120)
def test_a_run_that_cannot_fit_stops_with_the_planners_numbers(cluster, setup):
    """70B on one 80 GB GPU per node with 25 GB of host memory: no offload fits (GPU), CPU
    offload does not fit the host, NVMe does not either: exit 3, not requeued."""
    tmp = setup["tmp"]
    shape = tmp / "llama-2-70b"
    shape.mkdir(exist_ok=True)
    (shape / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096}))
    env = {k: v for k, v in setup["env"].items() if k not in ("DS_CONFIG", "RECIPE")}
    env.update(MODEL=str(shape), DEVICE="gpu", NPROC_PER_NODE="1", GPU_MEMORY_GB="80", HOST_MEMORY_GB="25")
    out_dir = tmp / "nofit"
    job = sbatch_70b(cluster, env, out_dir, "losa-nofit")
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 90)
    text = job_output(info)
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("3:"), text[-3000:]
    assert int(info.get("Restarts", "0")) == 0
    assert "offload auto: none: does not fit" in text and "cpu: does not fit" in text, text[-3000:]
    assert "DOES NOT FIT" in text and "Not requeued" in text
    assert not (out_dir / "model").exists() and not (out_dir / "checkpoints").exists()


def _metrics_lines(ckpt: Path) -> int:
    try:
        return sum(1 for _ in open(ckpt / "metrics.jsonl"))
    except OSError:
        return 0


@pytest.mark.timeout(480)
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_model(cluster, setup, reference):
    out_dir = setup["tmp"] / "preempted"
    ckpt = out_dir / "checkpoints"
    job = sbatch_70b(cluster, setup["env"], out_dir, "losa-preempt")
    cluster.wait_state(job, {"RUNNING"}, 60, poll=0.2)
    # signal during the first LoSA step's fine-tuning (20 optimizer steps)
    deadline = time.monotonic() + JOB_TIMEOUT
    while _metrics_lines(ckpt) < 3:
        info = cluster.job(job)
        assert info.get("JobState") == "RUNNING", f"{info.get('JobState')}\n{job_output(info)[-4000:]}"
        assert time.monotonic() < deadline, "fine-tuning never started"
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    # the job requeues itself (Restarts=1); SLURM holds it PENDING for the credential lifetime
    deadline = time.monotonic() + 120
    while True:
        info = cluster.job(job)
        if int(info.get("Restarts", "0")) >= 1:
            break
        assert info.get("JobState") in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED", "REQUEUE_FED"), \
            f"{info.get('JobState')} {info.get('ExitCode')}\n{job_output(info)[-5000:]}"
        assert time.monotonic() < deadline, f"not requeued\n{job_output(info)[-5000:]}"
        time.sleep(0.3)
    first = job_output(info)
    assert "got USR1" in first and "requeueing job" in first, first[-4000:]
    stops = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("ckpt-"))
    # a checkpoint in the middle of a LoSA step's fine-tuning: ckpt-<steps done>-<optimizer steps>
    assert any(int(n.split("-")[2]) > 0 for n in stops), f"no mid-step checkpoint: {stops}\n{first[-4000:]}"

    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT)
    text = job_output(info)
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} {info.get('ExitCode')}\n{text[-5000:]}"
    assert int(info["Restarts"]) == 1
    assert "restart 1" in text and "run finished" in text
    s = json.loads((out_dir / "model" / "summary.json").read_text())
    assert s["resumed_from"], "the requeued job did not resume from a checkpoint"
    assert (out_dir / "DONE").is_file()
    assert_same_model(out_dir / "model", reference["model"])
    # metrics continue where the stop left them: one line per optimizer step overall
    # (the checkpoint folder is deleted after the export; the output holds a copy of the metrics)
    total = 2 * RECIPE["samples_per_step"] // RECIPE["batch_size"]
    assert not ckpt.exists() and _metrics_lines(out_dir / "model") == total
    assert not no_leftover_processes(str(out_dir)), no_leftover_processes(str(out_dir))


@pytest.mark.timeout(420)
def test_no_clean_stop_within_grace_requeues_anyway(cluster, setup, reference):
    """Every rank hangs right after the step-1 checkpoint (a fault-injection hold), so the
    USR1 flag is never acted on: after STOP_GRACE seconds the batch shell requeues the job
    itself, and the requeued job resumes from that (complete) checkpoint to the same model."""
    out_dir = setup["tmp"] / "stuck"
    ckpt = out_dir / "checkpoints"
    env = dict(setup["env"], STOP_GRACE="5", LOSA_ZERO_TEST_HOLD="saved:ckpt-001-000000")
    job = sbatch_70b(cluster, env, out_dir, "losa-stuck")
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (ckpt / "ckpt-001-000000" / "COMPLETE.json").is_file():
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "RUNNING"), f"{info.get('JobState')}\n{job_output(info)[-4000:]}"
        assert time.monotonic() < deadline, "the step-1 checkpoint never came"
        time.sleep(0.2)
    time.sleep(1.0)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    deadline = time.monotonic() + 120
    while int(cluster.job(job).get("Restarts", "0")) < 1:
        assert time.monotonic() < deadline, job_output(cluster.job(job))[-4000:]
        time.sleep(0.3)
    first = job_output(cluster.job(job))
    assert "no clean stop within 5s: requeueing now" in first, first[-4000:]
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT)
    text = job_output(info)
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} {info.get('ExitCode')}\n{text[-5000:]}"
    s = json.loads((out_dir / "model" / "summary.json").read_text())
    assert any("ckpt-001-000000" in r for r in s["resumed_from"]), s["resumed_from"]
    assert_same_model(out_dir / "model", reference["model"])
    assert not no_leftover_processes(str(out_dir)), no_leftover_processes(str(out_dir))
