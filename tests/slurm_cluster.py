"""A real, private SLURM cluster on this one machine, for the SLURM tests.

Debian's packages (``munge``, ``slurmctld``, ``slurmd``, ``slurm-client``; CI installs them)
give real daemons. This module starts, in a fresh temporary directory:

- ``munged`` as the ``munge`` user (when run as root) with its own key, socket, pid, log
  and seed files, so it never touches or depends on a system munge;
- ``slurmctld`` and one ``slurmd -N nodeX`` per emulated node. Every node has this host as
  NodeHostname, its own Port, spool directory and pid file, and 1 CPU (the machine's real
  topology from ``slurmd -C`` is reduced to one core per node, and ``SlurmdParameters=
  config_overrides`` makes slurmd trust that instead of the hardware);
- a ``slurm.conf`` with free ports, temporary StateSaveLocation / spool / log files,
  ``proctrack/linuxproc``, ``task/none``, ``select/cons_tres`` (CR_CPU), ``JobRequeue=1`` and
  ``ReturnToService=2``, one partition holding every node, and a 10 s job credential
  lifetime (``AuthInfo=cred_expire=10``): SLURM holds a requeued job for that long (default
  120 s) so that no node still holds the revoked credential of its previous run.

All daemons run in the foreground under this process (``-D`` / ``-F``), so stopping them is
killing the process ids started here; jobs are cancelled first, and the job-step daemons
(``slurmstepd``) that belong to this cluster (identified through their spool directory)
are waited for and, if still alive, killed by pid. Nothing is installed or changed outside
the temporary directory, apart from creating ``/run/munge`` when it is missing (the munge
package's own runtime directory).

Use as a context manager (``with LocalSlurmCluster() as c: c.sbatch(...)``), through the
pytest fixture in ``tests/test_slurm.py``, or by hand::

    python tests/slurm_cluster.py            # starts it, prints SLURM_CONF, waits for Ctrl-C
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel", "srun", "munge", "unmunge")


class ClusterError(RuntimeError):
    pass


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def missing_binaries() -> list[str]:
    """Names of the SLURM / munge programs that are not installed."""
    return [n for n in DAEMONS + CLIENTS if which(n) is None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        return s.getsockname()[1]


def hardware() -> dict[str, int]:
    """What ``slurmd -C`` reports for this machine (CPUs, RealMemory in MB...)."""
    out = subprocess.run([which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=60).stdout
    info = {}
    for key, value in re.findall(r"(\w+)=(\d+)", out.splitlines()[0] if out else ""):
        info[key] = int(value)
    if "CPUs" not in info:
        info["CPUs"] = os.cpu_count() or 1
    if "RealMemory" not in info:
        info["RealMemory"] = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    return info


class LocalSlurmCluster:
    """``nodes`` emulated one-CPU nodes on this host behind one slurmctld."""

    def __init__(self, nodes: int = 2, partition: str = "debug", root: str | Path | None = None,
                 keep_dir: bool = False):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.node_names = [f"node{i + 1}" for i in range(nodes)]
        self.partition = partition
        self._root_given = root is not None
        self.root = Path(root) if root else None
        self.keep_dir = keep_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.conf: Path | None = None
        self.munge_socket: Path | None = None
        self.ports: dict[str, int] = {}

    # -- environment for client commands and jobs ------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        # a SLURM_* variable of an enclosing job (CI inside SLURM) must not leak into ours
        for k in list(env):
            if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_NNODES",
                             "SLURM_NODELIST", "SBATCH_", "SRUN_")):
                del env[k]
        return env

    def run(self, *args: str, timeout: float = 60, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env or self.env)
        if check and r.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    # -- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> None:
        missing = missing_binaries()
        if missing:
            raise ClusterError(f"SLURM / munge programs not installed: {', '.join(missing)}")
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="losa-slurm-"))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        for d in ("state", "spool", "log", "run", "jobs"):
            (self.root / d).mkdir(exist_ok=True)
        os.chmod(self.root / "jobs", 0o1777)
        self._start_munge()
        hw = hardware()
        mem_per_node = max(256, hw["RealMemory"] // len(self.node_names))
        self.ports = {"slurmctld": free_port()}
        for n in self.node_names:
            self.ports[n] = free_port()
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(self._slurm_conf(mem_per_node))
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False, timeout=15).stdout.count("UP") > 0,
                   timeout, "slurmctld did not answer scontrol ping")
        for n in self.node_names:
            (self.root / "spool" / n).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{n}", [which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._all_idle, timeout, "the nodes did not become idle in sinfo")

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        self.munge_socket = mdir / "munge.socket.2"
        as_root = os.geteuid() == 0
        if as_root:
            try:
                pw = pwd.getpwnam("munge")
            except KeyError:
                raise ClusterError("user 'munge' not found (install the munge package)") from None
            for p in (mdir, key):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            run_munge = Path("/run/munge")
            if not run_munge.exists():
                run_munge.mkdir(mode=0o755, parents=True)
                os.chown(run_munge, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o400)
        os.chmod(mdir, 0o700 if not as_root else 0o755)
        cmd = [which("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
               f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2", "--force"]
        # started directly with the munge uid/gid (no runuser/su in between), so it is our
        # child: stopping it is one kill of a pid we own, and it is reaped here
        self._spawn("munged", cmd, user=pw.pw_uid if as_root else None, group=pw.pw_gid if as_root else None)

        def works() -> bool:
            cred = subprocess.run([which("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            back = subprocess.run([which("unmunge"), "-S", str(self.munge_socket)], input=cred.stdout,
                                  capture_output=True, timeout=10)
            return back.returncode == 0

        self._wait(works, 30, "munged did not start")

    def _slurm_conf(self, mem_per_node: int) -> str:
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={self.host} Port={self.ports[n]} CPUs=1 Boards=1 SocketsPerBoard=1 "
            f"CoresPerSocket=1 ThreadsPerCore=1 RealMemory={mem_per_node} State=UNKNOWN"
            for n in self.node_names)
        user = pwd.getpwuid(os.geteuid()).pw_name
        return f"""# generated by tests/slurm_cluster.py for a private test cluster
ClusterName=losatest{os.getpid()}
SlurmctldHost={self.host}
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={self.ports['slurmctld']}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
InactiveLimit=0
KillWait=10
MinJobAge=600
MessageTimeout=20
{nodes}
PartitionName={self.partition} Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _spawn(self, name: str, cmd: list[str], user: int | None = None, group: int | None = None) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        env = dict(self.env) if self.conf else dict(os.environ)
        ids = {} if user is None else {"user": user, "group": group, "extra_groups": []}
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True, cwd=self.root, **ids)
        log.close()

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"{what}: {name} exited with {p.returncode}\n{self.logs()}")
            try:
                if ok():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.5)
        raise ClusterError(f"{what} within {timeout:.0f}s\n{self.logs()}")

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=15).stdout.split("\n")
        states = dict(line.split() for line in out if len(line.split()) == 2)
        return all(states.get(n) == "idle" for n in self.node_names)

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for error messages."""
        if self.root is None:
            return ""
        parts = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            try:
                lines = f.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _our_stepds(self) -> list[int]:
        """Pids of slurmstepd processes of this cluster (their cwd or command line is in our spool)."""
        pids = []
        spool = str(self.root / "spool") if self.root else None
        if spool is None:
            return pids
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if "slurmstepd" not in (d / "comm").read_text():
                    continue
                cwd = os.readlink(d / "cwd")
                cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cwd.startswith(spool) or spool in cmdline:
                pids.append(int(d.name))
        return pids

    def stop(self) -> None:
        """Cancel every job, stop the daemons started here (by pid), remove the directory."""
        if self.conf is not None and self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=20)
                    end = time.monotonic() + 40
                    while time.monotonic() < end and self.run("squeue", "-h", "-o", "%i", check=False,
                                                              timeout=20).stdout.split():
                        time.sleep(1)
            except (subprocess.SubprocessError, OSError):
                pass
        end = time.monotonic() + 20
        while self._our_stepds() and time.monotonic() < end:
            time.sleep(0.5)
        for pid in self._our_stepds():
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)  # slurmstepd leads its own group
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()
        if self.root is not None and not self.keep_dir and not self._root_given:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- jobs ------------------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict | None = None) -> int:
        r = self.run("sbatch", "--parsable", *args, env=env)
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a mapping (empty when the job is gone)."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id), check=False, timeout=20)
        if r.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def steps(self, job_id: int) -> list[str]:
        """Job steps still running (``squeue -s``), the batch step included."""
        r = self.run("squeue", "-h", "-s", "-j", str(job_id), "-o", "%i", check=False, timeout=20)
        return r.stdout.split() if r.returncode == 0 else []

    def wait_state(self, job_id: int, states: set[str], timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Wait until the job's JobState is one of ``states``; returns the job record."""
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise ClusterError(f"job {job_id} not in {sorted(states)} after {timeout:.0f}s (last: "
                           f"{info.get('JobState')} {info.get('Reason')})\n{self.logs(15)}")


def main() -> int:
    missing = missing_binaries()
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 1
    with LocalSlurmCluster() as c:
        print(f"export SLURM_CONF={c.conf}")
        print(c.run("sinfo").stdout)
        print("Ctrl-C stops the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
