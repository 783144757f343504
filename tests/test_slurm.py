"""launch/slurm/train.sbatch on a real one-node SLURM cluster (launch/slurm_cluster.py): sbatch
with two tasks trains the debug config end to end; the job must end COMPLETED with exit code 0
(scontrol and the job-completion log) and leave a complete run written by a world of two. A
second job is preempted with SIGUSR1 mid-run: it must checkpoint, requeue itself and finish.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from launch_support import (
    DEBUG_CONFIG,
    ROOT,
    TERMINAL,
    check_run_outputs,
    debug_overrides,
    job_fields,
    launch_env,
    listening_sockets,
    require_or_skip,
    slurm_cluster_module,
    tail,
    wait_for_job,
)

TIMEOUT_S = 360


def _submit(env: dict[str, str], job_log: Path, args: list[str]) -> str:
    cmd = ["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={job_log}",
           str(ROOT / "launch" / "slurm" / "train.sbatch"), str(DEBUG_CONFIG), *args]
    submit = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, f"sbatch failed: {submit.stderr}"
    return submit.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel"):
        require_or_skip(tool, "a one-node SLURM cluster")
    c = slurm_cluster_module().SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    c.start()
    yield c
    c.stop()


def test_cluster_is_private_fresh_loopback_only_and_removed(tmp_path):
    """A key planted where an old cluster lived is not reused; the daemons listen on 127.0.0.1
    only; the private directory (munge key included) is gone after stop."""
    for tool in ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "scancel"):
        require_or_skip(tool, "a one-node SLURM cluster")
    planted = tmp_path / "munge" / "munge.key"
    planted.parent.mkdir()
    planted.write_bytes(b"k" * 1024)
    cluster = slurm_cluster_module().SlurmCluster(tmp_path, cpus=1)
    try:
        cluster.start()
        assert cluster.dir.parent == tmp_path and cluster.dir.stat().st_mode & 0o777 == 0o700
        key = cluster.dir / "munge" / "munge.key"
        assert key.read_bytes() != planted.read_bytes() and key.stat().st_mode & 0o777 == 0o600
        for name, pid in cluster.pids.items():
            addrs = {addr for addr, _ in listening_sockets(pid)}
            assert addrs <= {"127.0.0.1"}, f"{name} listens on {addrs}"
            if name != "munged":  # munged talks over its unix socket only
                assert addrs == {"127.0.0.1"}, f"{name} listens on nothing"
    finally:
        cluster.stop()
    assert not cluster.dir.exists()
    assert planted.read_bytes() == b"k" * 1024  # someone else's file is left alone


@pytest.mark.slow
def test_sbatch_two_tasks_train_debug_config(tmp_path, cluster):
    env = {**launch_env(tmp_path), "SLURM_CONF": str(cluster.conf)}
    job_log = tmp_path / "job.out"
    job_id = _submit(env, job_log, debug_overrides(tmp_path, "sl"))
    fields = wait_for_job(job_id, env, TIMEOUT_S, job_log)
    out = job_log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{tail(out)}"
    assert fields["NumTasks"] == "2", fields
    completion = (cluster.dir / "log" / "jobcomp.txt").read_text()
    assert re.search(rf"JobId={job_id} .*JobState=COMPLETED", completion), completion

    assert re.search(r"2 task\(s\) \(2 per node\), master \S+:\d+, accelerator cpu", out), tail(out)
    run = check_run_outputs(tmp_path / "runs" / "sl", world_size=2)
    train_log = (tmp_path / "runs" / "sl" / "train.log").read_text()
    assert "2 rank(s) via slurm" in train_log, train_log[:2000]
    assert run["meta"]["step"] > 0


@pytest.mark.slow
def test_sbatch_preempted_job_checkpoints_requeues_and_finishes(tmp_path, cluster):
    """SIGUSR1 to the job's tasks (what --signal=USR1@120 sends near the time limit) in epoch 1:
    the ranks save a mid-epoch checkpoint and exit 75, the script requeues the job, the requeued
    run resumes from that checkpoint and the job ends COMPLETED after one restart."""
    env = {**launch_env(tmp_path), "SLURM_CONF": str(cluster.conf)}
    job_log = tmp_path / "job.out"
    epochs = 4
    job_id = _submit(env, job_log, [*debug_overrides(tmp_path, "pre"), f"train.epochs={epochs}"])
    first = tmp_path / "runs" / "pre" / "checkpoints" / "epoch_0001" / "meta.json"
    deadline = time.monotonic() + TIMEOUT_S
    while not first.is_file():
        assert time.monotonic() < deadline, f"no epoch-1 checkpoint:\n{tail(job_log.read_text())}"
        assert job_fields(job_id, env).get("JobState") not in TERMINAL, tail(job_log.read_text())
        time.sleep(0.5)
    sig = subprocess.run(["scancel", "--signal=USR1", job_id], env=env, capture_output=True, text=True,
                         timeout=30)
    assert sig.returncode == 0, sig.stderr
    fields = wait_for_job(job_id, env, TIMEOUT_S, job_log)
    out = job_log.read_text(errors="replace")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", f"{fields}\n{tail(out)}"
    assert "preempted after a checkpoint; requeueing" in out, tail(out)
    run_dir = tmp_path / "runs" / "pre"
    train_log = (run_dir / "train.log").read_text()
    resumed = re.search(r"resumed from \S+/(epoch_\d{4}_step_\d{8}) \(epoch (\d+), step (\d+)\)", train_log)
    assert resumed and int(resumed.group(2)) >= 1, train_log[-3000:]
    check_run_outputs(run_dir, world_size=2, epochs=epochs)


def test_sbatch_script_refuses_to_run_outside_slurm(tmp_path):
    require_or_skip("bash")
    env = {k: v for k, v in launch_env(tmp_path).items() if not k.startswith("SLURM_")}
    script = str(ROOT / "launch" / "slurm" / "train.sbatch")
    helped = subprocess.run(["bash", script, "--help"], env=env, capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "one task per GPU" in helped.stdout
    outside = subprocess.run(["bash", script, str(DEBUG_CONFIG)], env=env, capture_output=True, text=True,
                             timeout=30)
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


def test_missing_tool_skips_on_a_workstation_but_fails_in_ci(monkeypatch):
    tool = "sst-dist-no-such-tool"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=tool):
        require_or_skip(tool)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"CI=true: {tool} not installed"):
        require_or_skip(tool)
    assert require_or_skip("bash").endswith("bash")
