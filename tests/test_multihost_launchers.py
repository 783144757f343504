"""Each launcher across two real hosts: network namespaces node0/node1 (tests/netns_hosts.py),
each with its own host name, address and sshd, sharing only the file system.

torchrun (c10d rendezvous on node0), the DeepSpeed launcher (hostfile, pdsh over ssh, through
launch/deepspeed.sh) and SLURM (slurmctld on node0, one slurmd per host, ``sbatch --nodes 2
--ntasks-per-node 2``, then a SIGUSR1 preemption that requeues) each train the debug config on
2 hosts x 2 ranks x batch 2 in two legs, the second resuming across hosts, and must match the
same ranks on one host exactly and one rank with batch 8 within float-event bounds
(tests/multihost_support.py). One namespace pair serves the whole module.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from launch_support import (
    DEBUG_CONFIG,
    ROOT,
    TERMINAL,
    check_run_outputs,
    finish,
    job_fields,
    launch_env,
    listening_sockets,
    require_or_skip,
    slurm_cluster_module,
    start,
    stop_all,
    tail,
    wait_for_job,
)
from multihost_support import (
    PER_RANK_BATCH,
    RANKS_PER_HOST,
    assert_same_training,
    overrides,
    readme_commands,
    reference_runs,
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
    """One data root and the two reference runs (multihost_support), shared by every launcher's test."""
    tmp = tmp_path_factory.mktemp("multihost")
    return tmp, reference_runs(tmp)


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


def _store_listens_on_master_addr_only(hosts, proc: subprocess.Popen, port: int) -> None:
    """While the run trains: rank 0's rendezvous store listens on node0's own address (the one
    MASTER_ADDR names), and no rank process on node0 listens on every interface."""
    node0 = hosts.hosts[0]
    deadline = time.monotonic() + TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        pids = subprocess.run(["ip", "netns", "pids", node0.netns], capture_output=True, text=True).stdout
        ranks = [p for p in pids.split() if "sst_dist.cli" in _cmdline(p)]
        found = {a for p in ranks for a in _listening(p)}
        if any(port_ == port for _, port_ in found):
            assert (node0.addr, port) in found, found
            assert {addr for addr, _ in found} <= {node0.addr, "127.0.0.1"}, found
            return
        time.sleep(0.5)
    pytest.fail(f"never saw rank 0's store listening on port {port} on node0")


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _listening(pid: str) -> list[tuple[str, int]]:
    try:
        return listening_sockets(pid)
    except OSError:  # the process ended meanwhile
        return []


def test_deepspeed_hostfile_pdsh_ssh_two_hosts(hosts, workdir):
    """launch/deepspeed.sh on node0 only: the DeepSpeed runner checks ssh, asks node0 for its
    address (ssh node0 hostname -I) and pdsh starts each host's ranks over ssh. SST_LOG_RANK=all
    must reach node1's ranks: from the user's ./.deepspeed_env in leg 1, from the launching
    shell's environment in leg 2."""
    tmp, ref = workdir
    (line,) = readme_commands("launch/deepspeed.sh")
    cwd = tmp / "ds-cwd"  # the README's relative paths: ./hostfile and ./launch/...
    cwd.mkdir()
    (cwd / "launch").symlink_to(ROOT / "launch")
    hosts.hostfile(cwd / "hostfile", slots=RANKS_PER_HOST)
    (cwd / ".deepspeed_env").write_text("SST_LOG_RANK=all\n")
    env = launch_env(tmp)
    for leg, extra in ((1, []), (2, ["--resume"])):
        if leg == 2:
            (cwd / ".deepspeed_env").unlink()
            env["SST_LOG_RANK"] = "all"
        cmd = ["bash", "-c", f"{line} \"$@\"", "readme", *overrides(tmp, "ds", PER_RANK_BATCH, leg),
               "deepspeed.dump_state=false", *extra]
        log = tmp / f"deepspeed-leg{leg}.log"
        proc = start(hosts.hosts[0].wrap(cmd), env, log, cwd=cwd)
        try:
            if leg == 1:
                _store_listens_on_master_addr_only(hosts, proc, port=29500)
            out = finish(proc, log, TIMEOUT_S, f"deepspeed.sh leg {leg}")
        finally:
            stop_all([proc])
        assert "--hostfile hostfile --launcher pdsh" in out, out[:2000]
        assert "node0: " in out and "node1: " in out, "pdsh prefixes each host's output with its name"
        assert re.search(r"node1: .*\[rank 3\]", out), f"leg {leg}: SST_LOG_RANK=all did not reach node1"
    run = tmp / "runs" / "ds"
    check_run_outputs(run, world_size=4)
    log = (run / "train.log").read_text()
    assert "4 rank(s) via deepspeed" in log, log[:2000]
    ds_config = json.loads((run / "ds_config.json").read_text())
    assert ds_config["dump_state"] is False and ds_config["train_batch_size"] == 4 * PER_RANK_BATCH
    resumed_from(run)
    assert_same_training(run, ref)


@pytest.fixture(scope="module")
def slurm(hosts, tmp_path_factory):
    """slurmctld on node0, one slurmd per host, each bound to its host's address."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel", "squeue"):
        require_or_skip(tool, "a two-host SLURM cluster")
    cluster = slurm_cluster_module().SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=RANKS_PER_HOST,
                                                  hosts=hosts.hosts)
    cluster.start()
    yield cluster
    cluster.stop()


def test_slurm_two_hosts_preempted_requeued(hosts, workdir, slurm):
    """The README's sbatch line on node0 (2 nodes x 2 tasks); SIGUSR1 to every task on both nodes
    once training runs; the job must checkpoint, requeue, resume across hosts and complete."""
    tmp, ref = workdir
    (line,) = readme_commands("sbatch")
    cwd = tmp / "slurm-cwd"  # the submit directory: job output and the preemption marker go here
    cwd.mkdir()
    (cwd / "launch").symlink_to(ROOT / "launch")
    env = {**launch_env(tmp), "SLURM_CONF": str(slurm.conf)}
    sub = subprocess.run(slurm.client(["bash", "-c", f'{line} "$@"', "readme",
                                       *overrides(tmp, "sl", PER_RANK_BATCH, 2)]),
                         env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, f"sbatch failed: {sub.stderr}"
    job_id = re.search(r"Submitted batch job (\d+)", sub.stdout).group(1)
    job_log = cwd / f"sst-dist-{job_id}.out"
    metrics = tmp / "runs" / "sl" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):  # a step was logged
        so_far = job_log.read_text(errors="replace") if job_log.exists() else "(no job output yet)"
        assert time.monotonic() < deadline, f"no training step logged:\n{tail(so_far)}"
        assert job_fields(job_id, env, slurm.client).get("JobState") not in TERMINAL, tail(so_far)
        time.sleep(0.5)
    sig = subprocess.run(slurm.client(["scancel", "--signal=USR1", job_id]), env=env, capture_output=True,
                         text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr
    fields = wait_for_job(job_id, env, TIMEOUT_S, job_log, slurm.client)
    out = job_log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{tail(out)}"
    assert fields["NodeList"] == "node[0-1]" and fields["NumTasks"] == "4", fields
    assert "2 node(s), 4 task(s) (2 per node), master node0:" in out, tail(out)
    assert "preempted after a checkpoint; requeueing" in out, tail(out)
    # a user watching the job's output sees the steps go by, not one line per epoch
    assert re.search(r"step 2/8 \(epoch 0, 2/4\) loss [\d.]+ .* ETA \d+:\d\d:\d\d", out), tail(out)
    run = tmp / "runs" / "sl"
    check_run_outputs(run, world_size=4)
    assert "4 rank(s) via slurm" in (run / "train.log").read_text()
    resumed_from(run, epoch=None)
    assert_same_training(run, ref)


def test_readme_examples_name_real_configs():
    """Every launch/configs/*.yaml a README multi-node line names exists."""
    for marker in ("launch/torchrun.sh", "launch/deepspeed.sh", "sbatch"):
        for cmd in readme_commands(marker):
            for word in shlex.split(cmd):
                if word.startswith("launch/configs/"):
                    assert (ROOT / word).is_file(), f"README names {word}, which does not exist"
    assert DEBUG_CONFIG.is_file()
