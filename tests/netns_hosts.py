"""Several "hosts" on one machine: Linux network namespaces on a private bridge, with sshd.

Why: a launcher test whose nodes all share 127.0.0.1 cannot see what breaks on a real cluster:
host name resolution, the rendezvous address, node ranks, ssh fan-out, a job step spanning
nodes. :class:`NetnsHosts` builds ``n`` hosts ``node0``, ``node1``, ... each a network
namespace with its own host name (a UTS namespace), its own address ``10.213.0.(i+1)/24`` on a
veth whose other end sits on a bridge in a namespace of its own (the machine's own network
namespace gets no interface, address or route), and an ``/etc/hosts`` naming every host. That
hosts file and an ssh directory, made in this fixture's private directory, are bind-mounted over
/etc/hosts and /etc/ssh in a private mount namespace of every command run on a host: the
machine's own /etc is not edited, and /sys (with the cgroups slurmd needs) stays. Each host runs
a real ``sshd`` on its address with a host key made here; the client key, ``known_hosts`` and
the ssh client configuration (batch mode, strict host key checking) are made here too and used
only inside the namespaces. The hosts have no route anywhere else: traffic can reach only the
hosts built here.

:meth:`NetnsHosts.close` always runs (context manager, pytest fixture teardown): it ends every
process left in the namespaces, unmounts and deletes them and removes the private directory.
Needs root, ``ip`` (iproute2), ``nsenter``/``unshare`` (util-linux), and ``sshd``/``ssh``/
``ssh-keygen`` (scripts/install_system_deps.sh).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.213.0"
TOOLS = ("ip", "nsenter", "unshare", "sshd", "ssh", "ssh-keygen")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def find(tool: str) -> str | None:
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def missing() -> list[str]:
    """What this module needs and this machine lacks (root counts as a need)."""
    lack = [t for t in TOOLS if find(t) is None]
    if os.geteuid() != 0:
        lack.append("root (network namespaces)")
    return lack


def _kill_netns_processes(names: list[str]) -> None:
    """SIGTERM, then SIGKILL, every process still inside the namespaces ``names``."""
    def pids() -> list[int]:
        out = []
        for ns in names:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
            out += [int(p) for p in r.stdout.split() if p.isdigit()]
        return out

    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = pids()
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = pids()
        if not left:
            return


def remove_stale() -> list[str]:
    """Delete the namespaces of fixtures whose creating process died without its teardown
    (SIGKILL, a CI timeout). Names carry that pid; a live owner's namespaces are left alone."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    stale = []
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(r"sst(\d+)x[0-9a-f]{6}-(br|node\d+)", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            stale.append(name)
    if stale:
        _kill_netns_processes(stale)
        for ns in stale:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    return stale


@dataclass(frozen=True)
class Host:
    name: str  # host name inside the namespace, resolvable on every host
    addr: str  # its only non-loopback address
    netns: str  # the namespace's name (ip netns)
    uts: Path  # bind-mounted UTS namespace file (nsenter --uts)
    etc: Path  # this host's hosts file and ssh directory

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run on this host: its network, host name, /etc/hosts and /etc/ssh (the
        pid stays the command's: nsenter, unshare and sh all exec)."""
        binds = f"mount --bind {self.etc}/hosts /etc/hosts"
        if (self.etc / "ssh").is_dir():
            binds += f" && mount --bind {self.etc}/ssh /etc/ssh"
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--uts={self.uts}", "--",
                "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", f'{binds} && exec "$@"', "sh", *cmd]


class NetnsHosts:
    """``n`` hosts on a private bridge (see module doc); ``hosts[i].wrap(cmd)`` runs on host i."""

    def __init__(self, n: int = 2, sshd: bool = True) -> None:
        if n < 1 or n > 200:
            raise ValueError(f"n must be in 1..200, got {n}")
        lack = missing()
        if lack:
            raise RuntimeError(f"NetnsHosts needs {', '.join(lack)} (scripts/install_system_deps.sh)")
        remove_stale()
        self.tag = secrets.token_hex(3)
        self.dir = Path(tempfile.mkdtemp(prefix="sst-netns-"))  # 0700, unpredictable
        owner = f"sst{os.getpid()}x{self.tag}"  # the creating pid: remove_stale() knows when it died
        self.bridge_ns = f"{owner}-br"
        self.hosts = [Host(f"node{i}", f"{SUBNET}.{i + 1}", f"{owner}-node{i}", self.dir / f"uts{i}",
                           self.dir / f"etc{i}") for i in range(n)]
        self._made_ns: list[str] = []
        self._mounted: list[Path] = []
        self.sshd: dict[str, subprocess.Popen] = {}
        try:
            self._build()
            if sshd:
                self._start_sshd()
        except BaseException:
            self.close()
            raise

    # -- building ------------------------------------------------------------------------------
    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def _build(self) -> None:
        self._ip("netns", "add", self.bridge_ns)
        self._made_ns.append(self.bridge_ns)
        self._ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts_text = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        for i, h in enumerate(self.hosts):
            self._ip("netns", "add", h.netns)
            self._made_ns.append(h.netns)
            # both ends are made in the root namespace under unique names, then moved at once
            outer, inner = f"s{self.tag}b{i}", f"s{self.tag}h{i}"
            self._ip("link", "add", outer, "netns", self.bridge_ns, "type", "veth", "peer", "name", inner,
                     "netns", h.netns)
            self._ip("-n", self.bridge_ns, "link", "set", outer, "master", "br0", "up")
            self._ip("-n", h.netns, "link", "set", inner, "name", "eth0")
            self._ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            self._ip("-n", h.netns, "link", "set", "eth0", "up")
            self._ip("-n", h.netns, "link", "set", "lo", "up")
            h.etc.mkdir(mode=0o755)
            (h.etc / "hosts").write_text(hosts_text)
            h.uts.touch()
            subprocess.run(["unshare", f"--uts={h.uts}", "hostname", h.name], check=True, timeout=30)
            self._mounted.append(h.uts)

    def _start_sshd(self) -> None:
        """One sshd per host on its address; the host's ``etc/ssh`` becomes its /etc/ssh."""
        keys = self.dir / "ssh"
        keys.mkdir(mode=0o700)
        keygen = find("ssh-keygen")
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "sst-netns-client", "-f",
                        str(keys / "id_ed25519")], check=True, timeout=60)
        (keys / "authorized_keys").write_text((keys / "id_ed25519.pub").read_text())
        known = []
        for i, h in enumerate(self.hosts):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", h.name, "-f",
                            str(keys / f"host{i}")], check=True, timeout=60)
            known.append(f"{h.name},{h.addr} {(keys / f'host{i}.pub').read_text().split(' ')[0]} "
                         f"{(keys / f'host{i}.pub').read_text().split(' ')[1]}")
        (keys / "known_hosts").write_text("\n".join(known) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        for i, h in enumerate(self.hosts):
            etc_ssh = h.etc / "ssh"
            etc_ssh.mkdir(mode=0o755)
            (etc_ssh / "ssh_config").write_text(
                "Host *\n"
                f"  IdentityFile {keys / 'id_ed25519'}\n"
                "  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {keys / 'known_hosts'}\n"
                "  GlobalKnownHostsFile /dev/null\n"
                "  StrictHostKeyChecking yes\n"
                "  BatchMode yes\n"
                "  ConnectTimeout 10\n")
            (etc_ssh / "sshd_config").write_text(
                f"ListenAddress {h.addr}\n"
                f"HostKey {keys / f'host{i}'}\n"
                f"PidFile {self.dir / f'sshd{i}.pid'}\n"
                f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "PermitUserEnvironment no\n"
                "X11Forwarding no\n"
                "AllowTcpForwarding no\n")
            log = open(self.dir / f"sshd{i}.log", "wb")  # noqa: SIM115 (owned by the child)
            self.sshd[h.name] = subprocess.Popen(
                h.wrap([find("sshd"), "-D", "-e", "-f", "/etc/ssh/sshd_config"]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
        deadline = time.monotonic() + 30
        for h in self.hosts:
            while True:
                r = self.run(0, ["ssh", h.name, "hostname"], timeout=30)
                if r.returncode == 0 and r.stdout.strip() == h.name:
                    break
                if time.monotonic() > deadline:
                    logs = "\n".join((self.dir / f"sshd{i}.log").read_text(errors="replace")[-800:]
                                     for i in range(len(self.hosts)))
                    raise RuntimeError(f"ssh node0 -> {h.name} failed: {r.stderr.strip()}\n{logs}")
                time.sleep(0.3)

    # -- use -----------------------------------------------------------------------------------
    def run(self, i: int, cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` on host ``i`` to completion (text output captured)."""
        return subprocess.run(self.hosts[i].wrap(cmd), capture_output=True, text=True, timeout=timeout, **kw)

    def hostfile(self, path: Path, slots: int) -> Path:
        """A DeepSpeed hostfile naming every host with ``slots`` slots."""
        path.write_text("".join(f"{h.name} slots={slots}\n" for h in self.hosts))
        return path

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """End every process in our namespaces, delete them and everything made for them."""
        _kill_netns_processes(self._made_ns)
        for proc in self.sshd.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for uts in self._mounted:
            subprocess.run(["umount", str(uts)], capture_output=True, timeout=30)
        for ns in reversed(self._made_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
        self._made_ns, self._mounted = [], []

    def __enter__(self) -> NetnsHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
