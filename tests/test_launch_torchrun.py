"""launch/torchrun.sh as a real two-node job on one machine: two launchers (`torchrun --nnodes 2
--nproc_per_node 1`), one per "node", meet through a c10d rendezvous on 127.0.0.1 and train the
debug config to completion on CPU ranks.
"""

from __future__ import annotations

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
    start,
    stop_all,
)

TIMEOUT_S = 300


@pytest.mark.slow
def test_torchrun_two_nodes_c10d_train_debug_config(tmp_path):
    require_or_skip("torchrun", "torch's elastic launcher")
    require_or_skip("bash")
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for node in (0, 1):
            env = launch_env(tmp_path)
            env.update(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), RDZV_ID=f"test-{port}")
            cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(DEBUG_CONFIG),
                   *debug_overrides(tmp_path, "tr")]
            procs.append(start(cmd, env, tmp_path / f"node{node}.log"))
        outs = [finish(p, tmp_path / f"node{i}.log", TIMEOUT_S, f"torchrun node {i}")
                for i, p in enumerate(procs)]
    finally:
        stop_all(procs)

    for out in outs:
        assert "--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d" in out, out[:2000]
    run = check_run_outputs(tmp_path / "runs" / "tr", world_size=2)
    log = (tmp_path / "runs" / "tr" / "train.log").read_text()
    assert "2 rank(s) via torchrun" in log, log[:2000]
    assert run["meta"]["step"] > 0


def test_torchrun_sh_validates_rendezvous_settings(tmp_path):
    require_or_skip("bash")
    script = str(ROOT / "launch" / "torchrun.sh")
    env = launch_env(tmp_path)

    def call(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", script, *args], env={**env, **extra}, capture_output=True, text=True,
                              timeout=60)

    helped = call("--help")
    assert helped.returncode == 0 and "Exit status: 2" in helped.stdout
    bad_rank = call(str(DEBUG_CONFIG), NNODES="2", NODE_RANK="2")
    assert bad_rank.returncode == 2 and "NODE_RANK must be an integer in [0, 2)" in bad_rank.stderr
    bad_port = call("--dry-run", str(DEBUG_CONFIG), MASTER_PORT="99999")
    assert bad_port.returncode == 2 and "MASTER_PORT must be a port number (1-65535)" in bad_port.stderr
    bad_backend = call("--rdzv-backend", "etcd9", str(DEBUG_CONFIG))
    assert bad_backend.returncode == 2 and "RDZV_BACKEND must be c10d or static" in bad_backend.stderr
    static = call("--dry-run", "--rdzv-backend", "static", str(DEBUG_CONFIG), "train.epochs=1",
                  NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="29123", NPROC_PER_NODE="3")
    assert static.returncode == 0, static.stderr
    assert ("--nnodes 2 --nproc_per_node 3 --node_rank 1 --master_addr 10.0.0.7 --master_port 29123 "
            f"-m sst_dist.cli train {DEBUG_CONFIG} train.epochs=1") in static.stderr
