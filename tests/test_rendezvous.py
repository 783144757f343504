"""The rendezvous store listens nowhere at world size 1 and only on loopback on one node."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from launch_support import ROOT, free_port, rank_env

from sst_dist.train.rendezvous import is_loopback, is_single_node

# One rank: join with the trainer's init_distributed, all-reduce, then report this process's
# listening TCP sockets while every rank is still in the group.
RANK_CODE = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
import torch.distributed as dist
from launch_support import listening_sockets
from sst_dist.train import distributed as D
env = D.init_distributed(timeout_s=120)
t = torch.ones(1)
D.all_reduce_sum(t)
total = float(D.all_reduce_sum(t).item())
listening = listening_sockets()
D.barrier()
print("RESULT", json.dumps({{"rank": env.rank, "sum": total, "listening": listening,
                             "master": env.master_addr, "port": env.master_port,
                             "single_node": env.single_node}}))
"""


def _run_ranks(envs: list[dict[str, str]], timeout: float = 240) -> list[dict]:
    code = RANK_CODE.format(tests=str(ROOT / "tests"))
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for env in envs
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            line = next(x for x in out.splitlines() if x.startswith("RESULT "))
            results.append(json.loads(line[len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def test_world_size_one_has_no_store():
    """A plain single process: no TCP store at all; gloo's own device socket stays on loopback."""
    env = rank_env(0, 1, 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"):
        env.pop(key, None)
    (result,) = _run_ranks([env])
    assert result["sum"] == 1.0
    assert all(p != result["port"] for _, p in result["listening"]), result
    assert {a for a, _ in result["listening"]} <= {"127.0.0.1"}, result


def test_single_node_store_listens_on_loopback_only():
    """Two ranks as the deepspeed launcher starts them on one node, with MASTER_ADDR set to the
    host's name: every listening socket (store, gloo) must be bound to 127.0.0.1."""
    port = free_port()
    envs = []
    for rank in range(2):
        env = rank_env(rank, 2, port)
        env.update(MASTER_ADDR=socket.gethostname(), LOCAL_SIZE="2", CROSS_SIZE="1")
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(key, None)
        envs.append(env)
    results = _run_ranks(envs)
    assert [r["sum"] for r in results] == [2.0, 2.0]
    store = [(a, p) for a, p in results[0]["listening"] if p == port]
    assert store == [("127.0.0.1", port)], results[0]["listening"]
    for r in results:
        assert r["single_node"] and r["master"] == "127.0.0.1"
        assert r["listening"] and {a for a, _ in r["listening"]} == {"127.0.0.1"}, r


@pytest.mark.parametrize(
    "env, world, addr, single",
    [
        ({}, 1, "node7", True),
        ({"LOCAL_WORLD_SIZE": "4"}, 4, "node7", True),  # torchrun
        ({"LOCAL_WORLD_SIZE": "4"}, 8, "127.0.0.1", False),
        ({"LOCAL_SIZE": "2", "CROSS_SIZE": "1"}, 2, "node7", True),  # deepspeed launcher
        ({"CROSS_SIZE": "2"}, 4, "node7", False),
        ({"SLURM_STEP_NUM_NODES": "1"}, 4, "node7", True),
        ({"SLURM_NNODES": "3"}, 6, "node7", False),
        ({}, 2, "127.0.0.1", True),  # nothing said: only a loopback master is certainly local
        ({}, 2, "localhost", True),
        ({}, 2, "node7.invalid", False),
    ],
)
def test_single_node_detection(env, world, addr, single):
    assert is_single_node(env, world, addr) is single


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("8.8.8.8") and not is_loopback("no-such-host.invalid")
