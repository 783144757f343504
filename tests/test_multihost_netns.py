"""The multi-host test bed itself (tests/netns_hosts.py): hosts with their own names and
addresses that resolve each other and ssh to each other, no route to anything else, the
machine's own network and /etc untouched, and nothing left behind after teardown."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from launch_support import require_or_skip


def _module():
    for tool in ("ip", "nsenter", "unshare", "sshd", "ssh", "ssh-keygen"):
        require_or_skip(tool, "the multi-host test bed")
    import netns_hosts

    if netns_hosts.missing():
        require_or_skip("sst-dist-root", f"the test bed needs {netns_hosts.missing()}")
    return netns_hosts


def _ns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_hosts_resolve_and_reach_each_other_and_nothing_else():
    netns_hosts = _module()
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    hosts_before = Path("/etc/hosts").read_bytes()
    with netns_hosts.NetnsHosts(2) as bed:
        made = {h.netns for h in bed.hosts} | {bed.bridge_ns}
        assert made <= _ns_list()
        r = bed.run(0, ["ssh", "node1", "hostname; hostname -I; getent hosts node0"])
        assert r.returncode == 0, r.stderr
        name, addr, node0 = r.stdout.splitlines()
        assert (name, addr.strip(), node0.split()) == ("node1", "10.213.0.2", ["10.213.0.1", "node0"])
        routes = bed.run(1, ["ip", "-4", "route"]).stdout.strip().splitlines()
        assert routes == ["10.213.0.0/24 dev eth0 proto kernel scope link src 10.213.0.2"], routes
        out = bed.run(1, ["bash", "-c", "exec 3<>/dev/tcp/192.0.2.1/80"], timeout=30)
        assert out.returncode != 0 and "unreachable" in out.stderr, out.stderr
        # only the hosts' own view changes: the machine's /etc/hosts and interfaces stay as they were
        assert Path("/etc/hosts").read_bytes() == hosts_before
        assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout == root_links
        private = bed.dir
    assert not made & _ns_list(), "namespaces left after teardown"
    assert not private.exists()


def test_stale_namespaces_of_a_dead_owner_are_removed_live_ones_kept():
    netns_hosts = _module()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"sst{dead.pid}xabcdef-node0", f"sst{os.getpid()}xabcdef-node0"
    for ns in (stale, live):
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        if Path(f"/proc/{dead.pid}").exists():
            pytest.skip("the dead pid was reused at once")
        assert netns_hosts.remove_stale() == [stale]
        assert stale not in _ns_list() and live in _ns_list()
    finally:
        for ns in (stale, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
