"""losa_zero.preemption: a flag-only signal handler, a collective stop decision, exit 75."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from losa_zero import preemption

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean():
    preemption.reset()
    yield
    preemption.uninstall()
    preemption.reset()


def test_handler_only_sets_a_flag():
    before = signal.getsignal(signal.SIGUSR1)
    assert preemption.install()
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)     # would end the process without the handler
    time.sleep(0.05)
    assert preemption.requested()
    assert preemption.received_signals() == ["SIGUSR1", "SIGTERM"]
    assert preemption.should_stop() is True   # no process group: the local flag
    preemption.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_marker_round_trip(tmp_path):
    preemption.request(signal.SIGUSR1)
    path = preemption.write_marker(tmp_path / "ck", checkpoint="ckpt-001-000004", step=1)
    info = preemption.read_marker(tmp_path / "ck")
    assert path.name == preemption.MARKER
    assert info["checkpoint"] == "ckpt-001-000004" and info["step"] == 1 and info["signals"] == ["SIGUSR1"]
    assert info["exit_code"] == preemption.REQUEUE_EXIT_CODE == 75
    assert not list((tmp_path / "ck").glob(".*tmp*"))
    preemption.clear_marker(tmp_path / "ck")
    assert preemption.read_marker(tmp_path / "ck") is None
    preemption.clear_marker(tmp_path / "ck")  # absent: no error


def test_exit_code():
    with pytest.raises(SystemExit) as e:
        preemption.exit_for_requeue()
    assert e.value.code == 75


WORKER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch.distributed as dist
    from losa_zero import preemption
    preemption.install()
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
    rank = dist.get_rank()
    for step in range(1, 400):
        time.sleep(0.05 if rank == 0 else 0.02)   # ranks run at different speeds
        print(f"rank {rank} step {step}", flush=True)
        if preemption.should_stop():
            print(f"STOP rank {rank} step {step} local {preemption.requested()}", flush=True)
            preemption.exit_for_requeue()   # destroys the process group, exits 75
    print(f"NOSTOP rank {rank}", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_ranks_agree_on_the_stop_step(tmp_path):
    """Only rank 1 gets SIGUSR1; both ranks stop after the same step and exit 75."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        log = open(tmp_path / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), str(REPO)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 90
        while "step 5" not in (tmp_path / "rank1.log").read_text() and time.monotonic() < deadline:
            assert procs[1].poll() is None, (tmp_path / "rank1.log").read_text()
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGUSR1)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    out = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [75, 75], out
    stops = [next(line for line in o.splitlines() if line.startswith("STOP")).split() for o in out]
    assert stops[0][4] == stops[1][4], stops          # same step on both ranks
    assert stops[0][-1] == "False" and stops[1][-1] == "True"  # rank 0 learnt it from the all-reduce
