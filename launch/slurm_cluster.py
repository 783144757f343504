"""A real SLURM cluster (munged + slurmctld + slurmd) in a private directory: one node, or one
slurmd per host of a multi-host test bed (network namespaces, tests/netns_hosts.py).

Why: the SLURM launch path (``launch/slurm/train.sbatch``) deserves a test against real
``sbatch``/``srun``, not a mock, and users without a cluster can try it the same way. Everything
(config, munge key, state, spool, logs, pid files) lives in one private directory that this
module creates fresh (mode 0700, never an existing one) under the given parent, with a fresh
munge key; ``stop`` removes it, key included, whatever happened. The daemons use free ports,
listen on 127.0.0.1 only (``CommunicationParameters=NoCtldInAddrAny,NoInAddrAny``), and are
stopped by the pids we started, so nothing system-wide is touched.

With ``hosts`` (objects with ``name``, ``addr`` and ``wrap(cmd)``, the command as run on that
host), slurmctld runs on the first host and one slurmd per host, each bound to its host's address
(``NodeAddr``); munged stays on this machine (its socket is a file every host reaches). Client
commands must then run on a host too: ``cluster.client(cmd)``.

Python::

    with SlurmCluster(cpus=2) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Shell::

    python launch/slurm_cluster.py start          # prints `export SLURM_CONF=DIR/slurm.conf`
    python launch/slurm_cluster.py stop --dir DIR  # stops the daemons and removes DIR
    python launch/slurm_cluster.py run -- sbatch --wait launch/slurm/train.sbatch CONFIG
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DAEMONS = ("munged", "slurmctld", "slurmd")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find_tool(name: str) -> str | None:
    """Path of a SLURM/munge program; daemons live in sbin dirs that may be off PATH."""
    found = shutil.which(name)
    if found:
        return found
    for d in _SBIN:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_tools() -> list[str]:
    """Programs this module needs that are not installed (see scripts/install_system_deps.sh)."""
    return [t for t in (*DAEMONS, "sbatch", "srun", "sinfo", "scontrol") if find_tool(t) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class SlurmCluster:
    """Start/stop a private one-node SLURM cluster; ``env`` points clients at it."""

    def __init__(self, workdir: str | Path | None = None, cpus: int | None = None,
                 partition: str = "debug", start_timeout: float = 90.0, attach: bool = False,
                 hosts: Sequence[Any] = ()) -> None:
        """``workdir``: parent of the cluster's private directory (default: the temp dir);
        ``attach``: ``workdir`` is the directory of a cluster started earlier (for ``stop``);
        ``hosts``: the hosts of a multi-host cluster (see module doc), ``cpus`` each."""
        self.cpus = int(cpus or os.cpu_count() or 2)
        if self.cpus < 1:
            raise ValueError(f"cpus must be >= 1, got {self.cpus}")
        if attach:
            if workdir is None:
                raise ValueError("attach needs the cluster directory")
            self.dir = Path(workdir)
        else:  # mkdtemp: a new directory with an unpredictable name, mode 0700, owned by us
            self.dir = Path(tempfile.mkdtemp(prefix="sst-slurm-", dir=workdir))
        self.partition = partition
        self.start_timeout = start_timeout
        self.hosts = list(hosts)
        self.host = self.hosts[0].name if self.hosts else socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}

    # -- configuration -------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The caller's environment plus SLURM_CONF and the sbin dirs on PATH."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
        return env

    @property
    def node_names(self) -> list[str]:
        return [h.name for h in self.hosts] if self.hosts else [self.host]

    def client(self, cmd: list[str]) -> list[str]:
        """``cmd`` as a client of this cluster runs it: on the controller's host when multi-host."""
        return self.hosts[0].wrap(cmd) if self.hosts else cmd

    def write_config(self) -> None:
        """Write slurm.conf and a fresh munge key; every path is under ``self.dir``."""
        for sub in ("state", "spool", "log", "munge"):
            (self.dir / sub).mkdir(mode=0o700)
        # O_EXCL: a key is always created here, never taken over from an existing file
        fd = os.open(self.dir / "munge" / "munge.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(1024))
        user = os.environ.get("USER") or subprocess.run(
            ["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        d = self.dir
        if self.hosts:  # one slurmd per host: per-node spool, pid and log files (%n)
            ctld = f"{self.host}({self.hosts[0].addr})"
            nodes = [f"NodeName={h.name} NodeAddr={h.addr} CPUs={self.cpus} State=UNKNOWN"
                     for h in self.hosts]
            spool, slurmd_pid, slurmd_log = f"{d}/spool/%n", f"{d}/slurmd-%n.pid", f"{d}/log/slurmd-%n.log"
        else:
            ctld = f"{self.host}(127.0.0.1)"
            nodes = [f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN"]
            spool, slurmd_pid, slurmd_log = f"{d}/spool", f"{d}/slurmd.pid", f"{d}/log/slurmd.log"
        lines = [
            "ClusterName=sstdist",
            f"SlurmctldHost={ctld}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            # bind to the configured addresses (127.0.0.1 or each host's), not to every interface
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a requeued job waits cred_expire + 1 s before it may start again
            # (default 120 s); 20 s still leaves a loaded machine time to launch a step
            f"AuthInfo=socket={d}/munge/munge.socket,cred_expire=20",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={slurmd_pid}",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={slurmd_log}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d}/log/jobcomp.txt",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job`
            "ReturnToService=2",
            "SlurmdTimeout=120",
            "KillWait=5",
            *nodes,
            f"PartitionName={self.partition} Nodes={','.join(self.node_names)} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # -- lifecycle -----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], detach: bool, host: Any = None, key: str = "") -> None:
        """Start daemon ``name`` (on ``host`` when given; the pid is the daemon's: ip netns exec
        and nsenter exec); ``key`` names it in ``pids`` (default ``name``)."""
        exe = find_tool(name)
        if exe is None:
            raise FileNotFoundError(
                f"{name} not found; install slurm-wlm and munge (scripts/install_system_deps.sh)")
        key = key or name
        cmd = host.wrap([exe, *args]) if host is not None else [exe, *args]
        out = open(self.dir / "log" / f"{key}.stdout", "ab")  # noqa: SIM115 (owned by the child)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env, start_new_session=detach)
        out.close()
        self.procs[key] = proc
        self.pids[key] = proc.pid
        time.sleep(0.3)
        if proc.poll() is not None:
            raise RuntimeError(f"{key} exited at once with code {proc.returncode}:\n"
                               f"{_tail(self.dir / 'log' / f'{key}.stdout')}\n"
                               f"{_tail(self.dir / 'log' / f'{name}.log')}")

    def start(self, detach: bool = False) -> SlurmCluster:
        """Start munged, slurmctld, slurmd (foreground mode, so our pids are theirs); wait idle."""
        missing = missing_tools()
        if missing:
            raise FileNotFoundError(f"missing programs {missing}; run scripts/install_system_deps.sh")
        self.write_config()
        m = self.dir / "munge"
        try:
            self._spawn("munged", ["-F", "--force", f"--key-file={m}/munge.key",
                                   f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                                   f"--log-file={self.dir}/log/munged.log",
                                   f"--seed-file={m}/munged.seed"], detach)
            self._wait_for(lambda: (m / "munge.socket").exists(), "munged socket")
            first = self.hosts[0] if self.hosts else None
            self._spawn("slurmctld", ["-D", "-c", "-f", str(self.conf)], detach, first)
            if self.hosts:
                for h in self.hosts:
                    self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", h.name], detach, h,
                                f"slurmd-{h.name}")
            else:
                self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", self.host], detach)
            self._wait_for(self._node_idle, f"node(s) {','.join(self.node_names)} idle in sinfo")
        except BaseException:
            self.stop()
            raise
        (self.dir / "pids.json").write_text(json.dumps(self.pids))
        return self

    def _node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} died with code {proc.returncode}:\n"
                                   f"{_tail(self.dir / 'log' / f'{name}.log')}")
        r = subprocess.run(self.client([find_tool("sinfo") or "sinfo", "-h", "-N", "-o", "%t", "-n",
                                        ",".join(self.node_names)]),
                           capture_output=True, text=True, env=self.env)
        states = [st.rstrip("*") for st in r.stdout.split()]
        return r.returncode == 0 and states == ["idle"] * len(self.node_names)

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {p.name} ---\n{_tail(p)}" for p in sorted((self.dir / "log").glob("*.log")))
        raise TimeoutError(f"timed out after {self.start_timeout:.0f}s waiting for {what}\n{logs}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemons we started, by pid (slurmd, slurmctld, then munged), then remove the
        cluster directory with its munge key, even when stopping failed."""
        try:
            pids = dict(self.pids)
            if not pids and (self.dir / "pids.json").exists():
                pids = json.loads((self.dir / "pids.json").read_text())
            if "slurmctld" in pids:
                self._cancel_jobs()
            # every slurmd (one per host when multi-host), then slurmctld, then munged
            order = sorted(pids, key=lambda k: -DAEMONS.index(k.split("-", 1)[0]))
            for name in order:
                _terminate(pids[name], self.procs.get(name), timeout)
            self.procs.clear()
            self.pids.clear()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _cancel_jobs(self, timeout: float = 20.0) -> None:
        """Cancel this cluster's unfinished jobs so no task outlives its daemons."""
        squeue, scancel = find_tool("squeue"), find_tool("scancel")
        if squeue is None or scancel is None:
            return
        try:
            jobs = subprocess.run(self.client([squeue, "-h", "-o", "%i"]), capture_output=True, text=True,
                                  env=self.env, timeout=10).stdout.split()
            if not jobs:
                return
            subprocess.run(self.client([scancel, *jobs]), env=self.env, timeout=10, capture_output=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                left = subprocess.run(self.client([squeue, "-h", "-o", "%i"]), capture_output=True, text=True,
                                      env=self.env, timeout=10).stdout.split()
                if not left:
                    return
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            return  # the controller is already gone: nothing left to ask

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(pid: int, proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM one pid, then SIGKILL if it outlives ``timeout``; reap it when it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        proc.wait(timeout=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start/stop a private one-node SLURM cluster.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start the daemons in the background; print SLURM_CONF")
    p_stop = sub.add_parser("stop", help="stop the daemons started with `start --dir DIR`")
    p_run = sub.add_parser("run", help="start, run a command with SLURM_CONF set, stop")
    for p in (p_start, p_stop, p_run):
        p.add_argument("--dir", type=Path, default=None,
                       help="start/run: parent of the new private cluster directory (default: "
                            "the temp dir); stop: the cluster directory that start printed")
    for p in (p_start, p_run):
        p.add_argument("--cpus", type=int, default=None, help="CPUs of the node (default: nproc)")
    p_run.add_argument("command", nargs=argparse.REMAINDER, help="command after --")
    args = parser.parse_args(argv)

    if args.cmd == "stop":
        if args.dir is None or not (args.dir / "pids.json").exists():
            parser.error(f"stop needs --dir of a started cluster (no pids.json in {args.dir})")
        SlurmCluster(args.dir, attach=True).stop()
        print(f"stopped the cluster in {args.dir} and removed it")
        return 0
    cluster = SlurmCluster(args.dir, cpus=args.cpus)
    if args.cmd == "start":
        cluster.start(detach=True)
        print(f"export SLURM_CONF={shlex.quote(str(cluster.conf))}")
        print(f"# stop with: python {sys.argv[0]} stop --dir {cluster.dir}", file=sys.stderr)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a command after --")
    with cluster:
        rc = subprocess.run(command, env=cluster.env).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
