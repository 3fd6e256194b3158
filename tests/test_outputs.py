"""Outputs that cannot destroy inputs, a lock per output, interruptions that leave nothing
behind: the refusal rules, ``OUT.lock`` and its staleness rules, the leftovers of killed
runs, and real SIGTERM / SIGINT / SIGKILL of ``losa-zero prune`` and ``losa`` processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from losa_zero import output_lock
from losa_zero.cli import main
from losa_zero.errors import LosaZeroError
from losa_zero.output_lock import OutputLock, stale_reason, this_process
from losa_zero.outputs import INCOMPLETE, atomic_output_dir

REPO = Path(__file__).resolve().parents[1]


def _cli(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def _one_line_error(code, err, *needles):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("losa-zero: error:"), err
    for n in needles:
        assert n in err[0], (n, err[0])


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name + ".") or p.name.startswith(f".{name}."))


@pytest.fixture
def model_copy(stories_model_dir, tmp_path):
    """A private copy of the model (the refusal tests put outputs around it)."""
    import shutil

    d = tmp_path / "models" / "stories"
    shutil.copytree(stories_model_dir, d)
    return d


def _prune(model, calib, out, *extra):
    return ["prune", "--model", str(model), "--calib", str(calib), "--method", "wanda", "--sparsity", "0.5",
            "--nsamples", "4", "--seqlen", "64", "--out", str(out), *extra]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


# -- refusal rules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["model", "parent_of_model", "inside_model"])
def test_out_overlapping_the_model_is_refused_even_with_overwrite(capsys, model_copy, tinystories_split, where):
    out = {"model": model_copy, "parent_of_model": model_copy.parent, "inside_model": model_copy / "pruned"}[where]
    before = _snapshot(model_copy.parent)
    code, err = _cli(capsys, _prune(model_copy, tinystories_split[1], out, "--overwrite"))
    how = {"model": "is --model", "parent_of_model": "contains --model", "inside_model": "lies inside --model"}[where]
    _one_line_error(code, err, how, "choose another --out")
    assert _snapshot(model_copy.parent) == before
    assert not list(model_copy.parent.parent.glob("*.lock")) and not list(model_copy.parent.glob("*.lock"))


def test_out_containing_calibration_or_eval_data_is_refused(capsys, stories_model_dir, tmp_path):
    data = tmp_path / "results" / "data"
    data.mkdir(parents=True)
    calib = data / "calib.txt"
    calib.write_text("Once upon a time there was a cat. " * 200)
    code, err = _cli(capsys, _prune(stories_model_dir, calib, tmp_path / "results", "--overwrite"))
    _one_line_error(code, err, "contains --calib")
    assert calib.is_file()
    code, err = _cli(capsys, _prune(stories_model_dir, calib_elsewhere(tmp_path), data, "--ppl", f"text:{calib}"))
    _one_line_error(code, err, "contains --ppl")
    assert sorted(p.name for p in data.iterdir()) == ["calib.txt"]


def calib_elsewhere(tmp_path: Path) -> Path:
    p = tmp_path / "elsewhere.txt"
    p.write_text("Once upon a time there was a dog. " * 200)
    return p


def test_out_containing_the_recipe_file_is_refused(capsys, stories_model_dir, tinystories_split, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    recipe = out / "recipe.yaml"
    recipe.write_text("method: wanda\nsparsity: 0.5\n")
    code, err = _cli(capsys, _prune(stories_model_dir, tinystories_split[1], out, "--overwrite", "--config",
                                    str(recipe)))
    _one_line_error(code, err, "contains the config file")
    assert recipe.is_file()


def test_train_out_containing_the_checkpoint_folder_is_refused(stories_model_dir, tinystories_split, tmp_path):
    from losa_zero.config import build_config
    from losa_zero.zero3.config import ZeroRunConfig

    train = tinystories_split[1]
    cfg = build_config(ZeroRunConfig, {"model": str(stories_model_dir), "calib": str(train), "train": str(train),
                                       "sparsity": 0.5, "out": str(tmp_path / "r"),
                                       "checkpoint_dir": str(tmp_path / "r" / "ckpt"), "overwrite": True})
    with pytest.raises(LosaZeroError, match="contains checkpoint_dir"):
        with atomic_output_dir(cfg.out, overwrite=True, inputs=cfg.input_paths()):
            pass
    assert not (tmp_path / "r").exists()


def test_out_dot_and_parents_of_the_working_folder_are_refused(capsys, stories_model_dir, tinystories_split,
                                                                 tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        code, err = _cli(capsys, _prune(stories_model_dir, tinystories_split[1], out, "--overwrite"))
        _one_line_error(code, err, "is the current folder or contains it")
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


@pytest.mark.parametrize("target", ["folder", "dangling"])
def test_symlink_as_out_is_refused(capsys, stories_model_dir, tinystories_split, tmp_path, target):
    real = tmp_path / "real"
    if target == "folder":
        real.mkdir()
    link = tmp_path / "out"
    link.symlink_to(real)
    code, err = _cli(capsys, _prune(stories_model_dir, tinystories_split[1], link, "--overwrite"))
    _one_line_error(code, err, "is a symbolic link")
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + (["real"] if target
                                                                                                  == "folder" else []))


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write in: mode 555, and for root (whom modes do not stop) the
    immutable attribute."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    try:
        (d / "probe").touch()
    except PermissionError:
        pass
    else:
        (d / "probe").unlink()
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
        if not immutable:
            d.chmod(0o755)
            pytest.skip("cannot make a read-only folder here (root without chattr)")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


@pytest.mark.parametrize("depth", ["child", "grandchild"])
def test_out_in_a_read_only_folder(capsys, stories_model_dir, tinystories_split, read_only_dir, depth):
    out = read_only_dir / "out" if depth == "child" else read_only_dir / "sub" / "out"
    code, err = _cli(capsys, _prune(stories_model_dir, tinystories_split[1], out))
    _one_line_error(code, err, "choose another --out")
    assert list(read_only_dir.iterdir()) == []


# -- the lock -----------------------------------------------------------------------------------------
def test_a_second_run_to_a_locked_out_fails_at_once(stories_model_dir, tinystories_split, tmp_path):
    """A live holder (this test process) of OUT.lock: a real second ``losa-zero prune`` to
    the same OUT stops at once with one line naming the holder, and touches nothing."""
    out = tmp_path / "out"
    lock = OutputLock(out)
    assert lock.acquire() == []
    try:
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "losa_zero.cli", *_prune(stories_model_dir, tinystories_split[1],
                                                                               out, "--overwrite")],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1, res.stderr
        assert "is being written by another run" in err[0] and f"pid {os.getpid()}" in err[0]
        assert lock.held() and not out.exists() and _leftovers(tmp_path, "out") == ["out.lock"]
        print(f"\nrefused in {time.time() - t0:.1f}s (interpreter start included)")
    finally:
        lock.release()
    assert _leftovers(tmp_path, "out") == []


def _write_lock(out: Path, **holder) -> Path:
    rec = dict(this_process(), token="theirs", **holder)
    path = out.with_name(out.name + ".lock")
    path.write_text(json.dumps(rec))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    _write_lock(out, pid=_dead_pid())
    with caplog.at_level("WARNING", logger="losa_zero"):
        with atomic_output_dir(out) as d:
            (d / "f").write_text("x")
    assert (out / "f").is_file() and _leftovers(tmp_path, "out") == []
    assert any("took over the lock" in r.message and "is gone" in r.message for r in caplog.records)


def test_staleness_rules():
    me = this_process()
    alive = dict(me, pid=os.getpid())
    assert stale_reason(alive, 0.0, me) is None
    assert stale_reason(alive, 10 * output_lock.STALE_S, me) is None  # alive here: age does not matter
    assert "its pid now belongs to another process" in stale_reason(dict(alive, start=(me["start"] or 0) + 7), 0, me)
    assert "is gone" in stale_reason(dict(me, pid=_dead_pid()), 0.0, me)
    other = dict(me, host="node-b", pid=1)
    assert stale_reason(other, output_lock.STALE_S - 1, me) is None
    assert "not been refreshed" in stale_reason(other, output_lock.STALE_S + 1, me)
    rebooted = dict(me, boot_id="another-boot", pid=os.getpid())
    assert "restarted" in stale_reason(rebooted, 0.0, me)
    container = dict(me, pid_ns="pid:[1]", pid=1)  # same host, another pid namespace: pids say nothing
    assert stale_reason(container, 0.0, me) is None
    # a requeued SLURM job on another node: the earlier run of the same job is gone
    job = dict(me, slurm_job_id="77", slurm_restart_count=1)
    assert "earlier run of SLURM job 77" in stale_reason(dict(other, slurm_job_id="77", slurm_restart_count=0), 0, job)
    assert stale_reason(dict(other, slurm_job_id="77", slurm_restart_count=1), 0, job) is None
    assert stale_reason(dict(other, slurm_job_id="78", slurm_restart_count=0), 0, job) is None
    assert stale_reason(None, 0.0, me) == "the lock file is unreadable"


def test_lock_of_another_machine_blocks_until_its_heartbeat_stops(tmp_path):
    out = tmp_path / "out"
    path = _write_lock(out, host="node-b", pid=1)
    with pytest.raises(LosaZeroError, match="pid 1 on node-b"):
        with atomic_output_dir(out):
            pass
    old = time.time() - output_lock.STALE_S - 5
    os.utime(path, (old, old))
    with atomic_output_dir(out):
        pass
    assert out.is_dir() and not path.exists()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(output_lock, "HEARTBEAT_S", 0.05)
    lock = OutputLock(tmp_path / "out")
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 10
    finally:
        lock.release()
    assert not lock.path.exists()


# -- the final rename ---------------------------------------------------------------------------------
def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LosaZeroError, match="appeared while this run was working"):
        with atomic_output_dir(out) as d:
            (d / "result").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    kept = tmp_path / f"out.new-{os.getpid()}"
    assert (kept / "result").read_text() == "mine" and not (kept / INCOMPLETE).exists()
    assert _leftovers(tmp_path, "out") == [kept.name]
    # with --overwrite the new result replaces it
    with atomic_output_dir(out, overwrite=True) as d:
        (d / "result").write_text("again")
        (out / "theirs").write_text("changed meanwhile")
    assert sorted(p.name for p in out.iterdir()) == ["result"]


def test_a_run_that_lost_its_lock_does_not_commit(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LosaZeroError, match="took over the lock"):
        with atomic_output_dir(out, overwrite=True) as d:
            (d / "result").write_text("mine")
            _write_lock(out, host="node-b", pid=1)  # another run judged our lock stale
    assert not out.exists() and (tmp_path / f"out.new-{os.getpid()}" / "result").is_file()


# -- leftovers of killed runs -------------------------------------------------------------------------
def test_leftovers_of_killed_runs(tmp_path, caplog):
    out = tmp_path / "out"
    marked = tmp_path / "out.tmp-999999"
    marked.mkdir()
    (marked / INCOMPLETE).write_text("{}")
    (marked / "model.safetensors").write_bytes(b"x" * 100)
    unmarked = tmp_path / "out.tmp-888888"
    unmarked.mkdir()
    (unmarked / "mine.txt").write_text("a user's folder that only looks like ours")
    replaced = tmp_path / "out.old-777777"  # killed between moving the old output aside and the rename
    replaced.mkdir()
    (replaced / "summary.json").write_text("{}")
    _write_lock(out, pid=_dead_pid())
    with caplog.at_level("WARNING", logger="losa_zero"):
        with pytest.raises(LosaZeroError, match="already exists"):
            with atomic_output_dir(out):
                pass
    assert not marked.exists() and (unmarked / "mine.txt").is_file() and not replaced.exists()
    assert (out / "summary.json").is_file()  # put back
    text = "\n".join(r.message for r in caplog.records)
    assert "removed" in text and str(marked) in text and str(unmarked) in text and "put" in text
    assert _leftovers(tmp_path, "out") == ["out.tmp-888888"]


# -- real signals -------------------------------------------------------------------------------------
def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # SIGINT back to its default in the child: a shell without job control starts background
    # commands (`pytest ... &`, nohup) with SIGINT ignored, Python then keeps it ignored, and
    # the interrupt these tests send would never arrive
    return subprocess.Popen([sys.executable, "-m", "losa_zero.cli", *argv], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_tmp(proc: subprocess.Popen, out: Path, timeout: float = 120.0) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(out.parent.glob(out.name + ".tmp-*"))
        if found:
            return found[0]
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before writing anything"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no temporary output appeared")


def _losa(model, train, out, *extra):
    return ["losa", "--model", str(model), "--calib", str(train), "--train", str(train), "--sparsity", "0.5",
            "--steps", "2", "--nsamples", "8", "--seqlen", "64", "--samples-per-step", "400",
            "--final-step-samples", "400", "--max-length", "64", "--optimizer", "adamw", "--out", str(out), *extra]


def test_sigterm_stops_losa_and_a_concurrent_run_is_refused(stories_model_dir, tinystories_split, tmp_path):
    """A running ``losa-zero losa``: a second run to the same --out fails at once; SIGTERM
    then stops the first with 143 and one line, leaving no temporary folder and no lock."""
    train = tinystories_split[1]
    out = tmp_path / "out"
    first = _spawn(_losa(stories_model_dir, train, out), tmp_path / "first.log")
    try:
        _wait_for_tmp(first, out)
        second = subprocess.run([sys.executable, "-m", "losa_zero.cli", *_prune(stories_model_dir, train, out)],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1 and "is being written by another run" in err[0], second.stderr
        assert first.poll() is None, "the first run ended before the signal: make it longer"
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 143
    finally:
        first.kill()
    err = (tmp_path / "first.log").read_text().strip().splitlines()
    assert err[-1].startswith("losa-zero: terminated (SIGTERM)") and "Traceback" not in "\n".join(err), err[-20:]
    assert _leftovers(tmp_path, "out") == [] and not out.exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_prune_interrupted_by_a_signal_leaves_nothing(stories_model_dir, tinystories_split, tmp_path, sig, code):
    eval_txt, train = tinystories_split
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous result")
    proc = _spawn(_prune(stories_model_dir, train, out, "--overwrite", "--method", "sparsegpt", "--nsamples", "64",
                         "--seqlen", "256", "--ppl", str(eval_txt)), tmp_path / "run.log")
    try:
        _wait_for_tmp(proc, out)
        # mid-run, not in the instant between the folder's creation and the with-statement
        # taking it over (a signal there leaves the marked folder and a dead run's lock, which
        # the next run removes: test_sigkill_leftovers_are_cleaned_by_the_next_run)
        time.sleep(1.0)
        proc.send_signal(sig)
        assert proc.wait(60) == code
    finally:
        proc.kill()
    err = (tmp_path / "run.log").read_text().strip().splitlines()
    assert err[-1].startswith("losa-zero: " + ("terminated" if sig == signal.SIGTERM else "interrupted")), err[-20:]
    assert "Traceback" not in "\n".join(err)
    assert _leftovers(tmp_path, "out") == [] and [p.name for p in out.iterdir()] == ["old.txt"]


def test_sigkill_leftovers_are_cleaned_by_the_next_run(capsys, stories_model_dir, tinystories_split, tmp_path,
                                                        caplog):
    eval_txt, train = tinystories_split
    out = tmp_path / "out"
    argv = _prune(stories_model_dir, train, out, "--method", "sparsegpt", "--nsamples", "64", "--seqlen", "256",
                  "--ppl", str(eval_txt))
    proc = _spawn(argv, tmp_path / "run.log")
    try:
        tmp = _wait_for_tmp(proc, out)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        proc.kill()
    assert tmp.is_dir() and (tmp_path / "out.lock").is_file()  # what a SIGKILL leaves
    with caplog.at_level("WARNING", logger="losa_zero"):
        code, err = _cli(capsys, argv[:argv.index("--ppl")])
    assert code == 0, err
    text = "\n".join(r.message for r in caplog.records)
    assert f"removed {tmp}" in text and "took over the lock" in text and f"pid {proc.pid}" in text
    assert _leftovers(tmp_path, "out") == [] and (out / "summary.json").is_file()
