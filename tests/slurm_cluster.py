"""A real single-node SLURM cluster on 127.0.0.1 for tests: munged + slurmctld + slurmd.

Everything (munge key and socket, slurm.conf, state, spool, logs) lives in one directory;
ports are picked free at start; nothing in /etc is read or written. Needs Debian's slurm-wlm
and munge (``scripts/install_test_deps.sh``) and root (slurmd runs jobs as their user).

    cluster = SlurmCluster(tmp_dir)
    cluster.start()                       # ~5 s to an idle node
    subprocess.run(["sbatch", ...], env=cluster.env)
    cluster.stop()

By hand: ``python tests/slurm_cluster.py DIR`` starts one, prints the SLURM_CONF to export,
and stops it on Ctrl-C.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol")


def unavailable_reason() -> str | None:
    """Why a test cluster cannot start here (missing binaries, not root), or None if it can."""
    missing = [
        name
        for name in DAEMONS + CLIENTS
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists()
    ]
    if missing:
        return f"SLURM/munge not installed (missing {', '.join(missing)}); run scripts/install_test_deps.sh"
    if os.geteuid() != 0:
        return "the test SLURM cluster runs slurmd as root; not root here"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _memory_mb() -> int:
    """The node memory to declare: 90% of MemTotal (slurmd drains a node declaring more)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    return 1024


class SlurmClusterError(RuntimeError):
    """The cluster did not come up; the message carries the daemons' log tails."""


class SlurmCluster:
    """One munged, one slurmctld and one slurmd, configured for 127.0.0.1, under ``root``.

    ``start()`` brings it to an idle node, ``stop()`` cancels every job and ends the daemons
    (both idempotent); ``env`` is the environment clients need (SLURM_CONF). Also a context
    manager.
    """

    def __init__(self, root: os.PathLike | str, partition: str = "debug", cred_expire_s: int = 10) -> None:
        self.root = Path(root).resolve()
        self.partition = partition
        self.cred_expire_s = cred_expire_s
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        # munged wants every directory above its socket searchable by all, which a private
        # temp dir (pytest's are 0700) is not: the sockets and pid files get their own dir.
        self.run_dir = Path(tempfile.mkdtemp(prefix="hm-slurm-run-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    @property
    def env(self) -> dict:
        """os.environ plus SLURM_CONF pointing at this cluster (for sbatch, squeue, the launcher)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- configuration ---------------------------------------------------------------------
    def _write_files(self) -> None:
        root = self.root
        run = self.run_dir
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # munged insists: the key private to its owner, the socket's directory searchable by all.
        run.chmod(0o755)
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        cpus = os.cpu_count() or 1
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=hmtest",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire is also how long a requeued job waits before it may start again
                    # (default 120 s): short, so the preemption/requeue test stays short.
                    f"AuthInfo=socket={run / 'munge.socket'},cred_expire={self.cred_expire_s}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={root / 'state'}",
                    f"SlurmdSpoolDir={root / 'spool'}",
                    f"SlurmctldPidFile={run / 'slurmctld.pid'}",
                    f"SlurmdPidFile={run / 'slurmd.pid'}",
                    f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                    f"PlugStackConfig={root / 'plugstack.conf'}",
                    # No cgroups, no accounting daemon: processes are tracked by /proc, as in a container.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SchedulerType=sched/builtin",
                    # Test pending jobs every 2 s, not 60: a requeued job starts as soon as it may.
                    "SchedulerParameters=sched_interval=2",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SlurmctldTimeout=30",
                    "SlurmdTimeout=30",
                    "InactiveLimit=0",
                    "KillWait=5",
                    "MinJobAge=300",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} "
                    "State=UNKNOWN",
                    f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        (root / "plugstack.conf").write_text("")

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
        )

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmClusterError(f"{name} exited with {proc.returncode}\n{self.log_tails()}")
            time.sleep(0.2)
        raise SlurmClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.log_tails()}")

    def node_state(self) -> str:
        """The node's state as sinfo reports it (``idle``, ``down*``, ...); '' if unreachable."""
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-n", self.node, "-o", "%T"],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=10,
            )
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def start(self, timeout: float = 40.0) -> SlurmCluster:
        """Write the configuration and start munged, slurmctld and slurmd; returns self.

        Blocks until the node is idle. Raises SlurmClusterError (with log tails) if a daemon
        dies or the node is not idle within ``timeout`` seconds; the cluster is stopped then.
        """
        if self.procs:
            return self
        self._write_files()
        root = self.root
        socket_path = self.run_dir / "munge.socket"
        try:
            self._spawn(
                "munged",
                [
                    _binary("munged"),
                    "--foreground",
                    f"--key-file={root / 'munge' / 'munge.key'}",
                    f"--socket={socket_path}",
                    f"--pid-file={self.run_dir / 'munged.pid'}",
                    f"--log-file={root / 'log' / 'munged.log'}",
                    f"--seed-file={root / 'munge' / 'munged.seed'}",
                ],
            )
            self._wait("munged's socket", socket_path.exists, 10)
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
            self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait("an idle SLURM node", lambda: self.node_state().startswith("idle"), timeout)
        except BaseException:
            self.stop()
            raise
        # A test run that dies without its teardown must not leave daemons behind.
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Cancel every job, then end slurmd, slurmctld and munged (TERM, then KILL after 10 s)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(
                ["scancel", "--quiet", f"--partition={self.partition}"],
                env=self.env,
                capture_output=True,
                timeout=30,
                check=False,
            )
            deadline = time.time() + 10
            while time.time() < deadline and self._has_jobs():
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _has_jobs(self) -> bool:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=10,
            check=False,
        )
        return bool(out.stdout.strip())

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    """``python tests/slurm_cluster.py DIR``: run a cluster in DIR until Ctrl-C."""
    if len(argv) != 1:
        print("usage: python tests/slurm_cluster.py DIR", file=sys.stderr)
        return 2
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    started = time.time()
    with SlurmCluster(argv[0]) as cluster:
        print(f"SLURM up in {time.time() - started:.1f}s: export SLURM_CONF={cluster.conf}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
