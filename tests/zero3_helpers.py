"""Launching ZeRO-3 LoSA runs from the tests: 1 or 2 CPU ranks (gloo), every rank with
one thread (2 threads per rank on 2 cores is catastrophically slow), each run under a
timeout, and rank processes that share one process group so a test can SIGKILL a whole
run at once (torchrun puts each worker in a session of its own, so killing torchrun's
group would leave the workers running).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train" / "losa.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),  # fresh: no stale build lock can hang us
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOSA_ZERO_TEST_HOLD"):
        env.pop(k, None)
    return env


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


class Run:
    """A launched run: its processes (one group), log file and output folders."""

    def __init__(self, procs: list[subprocess.Popen], log: Path, out: Path, started: float):
        self.procs, self.log, self.out, self.started = procs, log, out, started

    @property
    def pgid(self) -> int:
        return self.procs[0].pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        deadline = self.started + timeout
        try:
            codes = [p.wait(timeout=max(1.0, deadline - time.time())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run timed out after {timeout}s; log tail:\n{self.text()[-4000:]}") from None
        return max(codes, key=abs)

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if needle in self.text():
                return
            if all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        self.kill()
        raise AssertionError(f"never saw {needle!r}; log tail:\n{self.text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group of the run (and, for launchers that start their
        workers in sessions of their own, every descendant)."""
        import psutil

        victims = []
        for p in self.procs:
            try:
                victims += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for v in victims:
            try:
                v.kill()
            except psutil.NoSuchProcess:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def launch(config: Path, overrides: list[str], nproc: int, tmp: Path, log: Path, out: Path,
           launcher: str = "group", hold: str | None = None) -> Run:
    """Start a run. ``launcher``: "group" (ranks spawned here with RANK/WORLD_SIZE set, all
    in one new process group), "torchrun", "deepspeed", or "single" (one process, no
    launcher variables at all)."""
    env = base_env(tmp)
    if hold:
        env["LOSA_ZERO_TEST_HOLD"] = hold
    args = [str(config)] + list(overrides)
    fh = open(log, "w")
    started = time.time()
    port = str(free_port())
    if launcher == "group":
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(nproc)})
        procs = []
        for r in range(nproc):
            e = dict(env, RANK=str(r), LOCAL_RANK=str(r))
            pg = 0 if r == 0 else procs[0].pid
            procs.append(subprocess.Popen([sys.executable, str(TRAIN)] + args, env=e, cwd=REPO, stdout=fh,
                                          stderr=subprocess.STDOUT, process_group=pg))
        return Run(procs, log, out, started)
    if launcher == "single":
        cmd = [sys.executable, str(TRAIN)] + args
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
               str(TRAIN)] + args
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port,
               str(TRAIN)] + args
    else:
        raise ValueError(launcher)
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, process_group=0)
    return Run([p], log, out, started)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


class DictMaskStore:
    """A minimal ``mask_store`` (the protocol PartitionedMaskStore implements under ZeRO-3):
    masks in a dict, counting reads, and ``keep_fn`` rebuilding the mask when called (in
    backward)."""

    def __init__(self):
        self.masks, self.calls = {}, 0

    def keep(self, layer):
        self.calls += 1
        return self.masks.get(id(layer))

    def set(self, layer, keep):
        self.masks[id(layer)] = keep

    def keep_fn(self, layer):
        return lambda: self.keep(layer)
