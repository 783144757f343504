"""launch/deepspeed.sh end to end: `deepspeed --num_gpus 2` starts two CPU ranks (gloo) that
train the debug config to completion; the run must leave its resolved config, metrics and a
complete checkpoint written by a world of two.

The first DeepSpeed start on a machine builds its CPU shared-memory comm op (about two minutes,
cached in ~/.cache/torch_extensions afterwards), hence the generous timeout.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from launch_support import (
    DEBUG_CONFIG,
    ROOT,
    check_run_outputs,
    debug_overrides,
    finish,
    free_port,
    launch_env,
    require_or_skip,
    run_checked,
    start,
    stop_all,
)

TIMEOUT_S = 420


@pytest.mark.slow
def test_deepspeed_two_cpu_ranks_train_debug_config(tmp_path):
    require_or_skip("deepspeed", "the DeepSpeed launcher")
    require_or_skip("bash")
    env = launch_env(tmp_path)
    cmd = ["bash", str(ROOT / "launch" / "deepspeed.sh"), "--num-gpus", "2",
           "--master-port", str(free_port()), str(DEBUG_CONFIG), *debug_overrides(tmp_path, "ds")]
    out = run_checked(cmd, env, tmp_path / "deepspeed.log", TIMEOUT_S)

    assert "--num_gpus 2" in out and "--module sst_dist.cli train" in out, out[:2000]
    run = check_run_outputs(tmp_path / "runs" / "ds", world_size=2)
    # the overrides reached the ranks: the resolved config names this run, not the default
    resolved = (tmp_path / "runs" / "ds" / "config.yaml").read_text()
    assert "name: ds" in resolved, resolved
    assert run["meta"]["step"] > 0


def test_deepspeed_sh_rejects_bad_input(tmp_path):
    require_or_skip("bash")
    script = str(ROOT / "launch" / "deepspeed.sh")
    env = launch_env(tmp_path)

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=60)

    ok = call("--help")
    assert ok.returncode == 0 and "Usage: launch/deepspeed.sh" in ok.stdout and "Exit status: 2" in ok.stdout
    missing = call("--num-gpus", "2")
    assert missing.returncode == 2 and "missing CONFIG" in missing.stderr
    nofile = call(str(tmp_path / "nope.yaml"))
    assert nofile.returncode == 2 and "nope.yaml' does not exist" in nofile.stderr
    badnum = call("--num-gpus", "two", str(DEBUG_CONFIG))
    assert badnum.returncode == 2 and "--num-gpus must be a positive integer" in badnum.stderr
    for args, needle in [
        (("--num-gpus", "0"), "--num-gpus must be a positive integer, got '0'"),
        (("--master-port", "99999"), "--master-port must be a port number (1-65535), got '99999'"),
        (("--launcher", "foo"), "--launcher must be one of pdsh, openmpi, mvapich, mpich, impi, slurm"),
        (("--no-ssh",), "--no-ssh (DS_NO_SSH=1) is a multi-node mode: it needs --hostfile"),
    ]:
        bad = call("--dry-run", *args, str(DEBUG_CONFIG))
        assert bad.returncode == 2 and needle in bad.stderr, (args, bad.stderr)
    # dry run: overrides and --resume pass through unchanged, after the module entry point
    dry = call("--dry-run", "--num-gpus", "2", str(DEBUG_CONFIG), "train.epochs=3", "--resume")
    assert dry.returncode == 0, dry.stderr
    assert f"--module sst_dist.cli train {DEBUG_CONFIG} train.epochs=3 --resume" in dry.stderr


@pytest.mark.slow
def test_deepspeed_hostfile_two_nodes_without_ssh(tmp_path):
    """The multi-node path: a two-host hostfile, one launcher per "node" (--no-ssh --node-rank),
    each rank of the probe all-reduces its rank+1 across both nodes."""
    require_or_skip("deepspeed", "the DeepSpeed launcher")
    require_or_skip("bash")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port, out_dir = free_port(), tmp_path / "probe"
    procs: list[subprocess.Popen] = []
    try:
        for node in (0, 1):
            cmd = ["bash", str(ROOT / "launch" / "deepspeed.sh"), "--hostfile", str(hostfile), "--no-ssh",
                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "--probe", str(out_dir)]
            procs.append(start(cmd, launch_env(tmp_path), tmp_path / f"node{node}.log"))
        for node, proc in enumerate(procs):
            finish(proc, tmp_path / f"node{node}.log", 180, f"deepspeed node {node}")
    finally:
        stop_all(procs)
    results = sorted((json.loads(p.read_text()) for p in out_dir.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], results
    for r in results:
        assert r["world_size"] == 2 and r["local_rank"] == 0 and r["backend"] == "gloo", r
        assert r["allreduce_sum"] == 3.0, r


# What pdsh + ssh do on every node: a shell parses the joined command string again. The rank
# program itself is replaced by `:` so that only that parsing runs (no training).
FAKE_PDSH = r"""#!/usr/bin/env bash
while [[ $# -gt 0 ]]; do case "$1" in -S) shift ;; -f|-w) shift 2 ;; *) break ;; esac; done
cmd="$*"
cmd=${cmd//%n/0}
cmd=${cmd//"$SST_FAKE_PYTHON"/:}
exec bash -c "$cmd"
"""


@pytest.mark.parametrize("where", ["argument", "environment"])
def test_remote_shell_cannot_run_injected_commands(tmp_path, where):
    """A `$(touch marker)` in an override or a forwarded variable must not run on the nodes."""
    require_or_skip("bash")
    require_or_skip("deepspeed", "the DeepSpeed launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(FAKE_PDSH)
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 127.0.0.1\n")  # the launcher's reachability check
    for tool in ("pdsh", "ssh"):
        (bin_dir / tool).chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    marker = tmp_path / "marker"
    env = launch_env(tmp_path)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["SST_FAKE_PYTHON"] = str(ROOT / ".venv" / "bin" / "python")
    args = [str(DEBUG_CONFIG), "train.epochs=1"]
    if where == "argument":
        args.append(f"output.name=$(touch {marker})")
    else:
        env["SST_DATA_ROOT"] = f"/data$(touch {marker})"
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "deepspeed.sh"), "--hostfile", str(hostfile), "--master-addr",
         "127.0.0.1", *args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert not marker.exists(), f"the remote shell ran an injected command:\n{out.stderr[-2000:]}"
    assert out.returncode == 2 and "a remote shell would re-parse" in out.stderr, out.stderr[-2000:]
    assert "touch" in out.stderr.splitlines()[0]


def test_user_deepspeed_env_is_checked(tmp_path):
    """The user's ./.deepspeed_env is read (test_multihost_launchers shows it reaching node1); a line
    a remote shell would re-parse, or that is not KEY=VALUE, is refused naming file and line."""
    require_or_skip("bash")
    require_or_skip("deepspeed", "the DeepSpeed launcher")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = {**launch_env(tmp_path), "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()

    def dry(text: str) -> subprocess.CompletedProcess:
        (tmp_path / ".deepspeed_env").write_text(text)
        return subprocess.run(["bash", str(ROOT / "launch" / "deepspeed.sh"), "--dry-run", "--hostfile",
                               str(hostfile), "--master-addr", "node0", str(DEBUG_CONFIG)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    ok = dry("# comment\n\nNCCL_IB_DISABLE=1\n")
    assert ok.returncode == 0, ok.stderr
    bad = dry("A=1\nB=$(touch x)\n")
    assert bad.returncode == 2 and ".deepspeed_env:2: the value of B" in bad.stderr, bad.stderr
    assert not (tmp_path / "x").exists()
    junk = dry("just words\n")
    assert junk.returncode == 2 and ".deepspeed_env:1: expected KEY=VALUE" in junk.stderr, junk.stderr
