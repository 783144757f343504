"""Each launcher across two real hosts: network namespaces node0/node1 (tests/netns_hosts.py),
each with its own host name, address and sshd, sharing only the file system.

torchrun (c10d rendezvous on node0), the DeepSpeed launcher (hostfile, pdsh over ssh, through
launch/deepspeed.sh) and SLURM (slurmctld on node0, one slurmd per host, ``sbatch --nodes 2
--ntasks-per-node 2``, then a SIGUSR1 preemption that requeues) each train the debug config on
2 hosts x 2 ranks x batch 2 in two legs, the second resuming across hosts, and must match one
rank with batch 8 (tests/multihost_support.py). One namespace pair serves the whole module.
"""

from __future__ import annotations

import shlex
import subprocess

import pytest
from launch_support import (
    DEBUG_CONFIG,
    ROOT,
    check_run_outputs,
    finish,
    launch_env,
    require_or_skip,
    start,
    stop_all,
)
from multihost_support import (
    PER_RANK_BATCH,
    RANKS_PER_HOST,
    assert_same_training,
    overrides,
    readme_commands,
    reference_run,
    resumed_from,
)

TIMEOUT_S = 420
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts():
    for tool in ("ip", "nsenter", "unshare", "sshd", "ssh", "ssh-keygen", "pdsh"):
        require_or_skip(tool, "the multi-host tests (network namespaces + sshd + pdsh)")
    import netns_hosts

    if netns_hosts.missing():
        require_or_skip("sst-dist-root", f"multi-host tests need {netns_hosts.missing()}")
    with netns_hosts.NetnsHosts(2) as h:
        yield h


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One data root and the 1-rank batch-8 reference run, shared by every launcher's test."""
    tmp = tmp_path_factory.mktemp("multihost")
    return tmp, reference_run(tmp)


def _on_hosts(hosts, cmds: list[list[str]], env: dict[str, str], logdir, what: str) -> list[str]:
    """Start ``cmds[i]`` on host i at once, wait for all; fail with the logs on any error."""
    procs: list[subprocess.Popen] = []
    try:
        for i, cmd in enumerate(cmds):
            procs.append(start(hosts.hosts[i].wrap(cmd), env, logdir / f"{what}-node{i}.log"))
        return [finish(p, logdir / f"{what}-node{i}.log", TIMEOUT_S, f"{what} on node{i}")
                for i, p in enumerate(procs)]
    finally:
        stop_all(procs)


def test_torchrun_two_hosts_c10d(hosts, workdir):
    tmp, ref = workdir
    line = readme_commands("launch/torchrun.sh")  # node0's and node1's line, as the README has them
    assert len(line) == 2 and "MASTER_ADDR=node0" in line[0], line
    env = {**launch_env(tmp), "NPROC_PER_NODE": str(RANKS_PER_HOST), "MASTER_PORT": "29400", "RDZV_ID": "tr"}
    for leg, extra in ((1, []), (2, ["--resume"])):
        cmds = [["bash", "-c", f"{line[i]} \"$@\"", "readme",
                 *overrides(tmp, "tr", PER_RANK_BATCH, leg), *extra] for i in range(2)]
        outs = _on_hosts(hosts, cmds, env, tmp, f"torchrun-leg{leg}")
        assert all("--rdzv_backend c10d --rdzv_endpoint node0:29400" in o for o in outs), outs[0][:2000]
    run = tmp / "runs" / "tr"
    check_run_outputs(run, world_size=4)
    log = (run / "train.log").read_text()
    assert "4 rank(s) via torchrun" in log, log[:2000]
    resumed_from(run)
    assert_same_training(run, ref)


def test_readme_examples_name_real_configs():
    """Every launch/configs/*.yaml a README multi-node line names exists."""
    for marker in ("launch/torchrun.sh", "launch/deepspeed.sh", "sbatch"):
        for cmd in readme_commands(marker):
            for word in shlex.split(cmd):
                if word.startswith("launch/configs/"):
                    assert (ROOT / word).is_file(), f"README names {word}, which does not exist"
    assert DEBUG_CONFIG.is_file()
