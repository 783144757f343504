"""Shared helpers of the launcher tests (torchrun, deepspeed, SLURM): tools, env, run checks.

These tests start real launchers as subprocesses and train the debug config end to end, then
check what a run must leave behind. A workstation without a tool skips; CI (``CI=true``) must
have every tool, so there a missing one fails instead of silently skipping.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = ROOT / "launch" / "configs" / "debug.yaml"
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_or_skip(tool: str, why: str = "") -> str:
    """Path of ``tool``; skip the test when absent, but fail under CI=true."""
    path = shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]))
    if path is None:
        venv_tool = Path(sys.executable).parent / tool
        path = str(venv_tool) if venv_tool.is_file() else None
    if path is None:
        msg = f"{tool} not installed{': ' + why if why else ''} (see scripts/install_system_deps.sh)"
        if in_ci():
            pytest.fail(f"CI=true: {msg}")
        pytest.skip(msg)
    return path


def slurm_cluster_module():
    """launch/slurm_cluster.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_cluster", ROOT / "launch" / "slurm_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """Environment of one hand-started CPU rank (what a launcher would export), 1 thread each."""
    env = dict(
        os.environ,
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_rank_processes(args: list[str], world: int, out: Path, tag: str, timeout: float = 300) -> None:
    """Start ``python *args`` once per rank (as a launcher would), wait, and fail with a rank's log
    tail if any exits non-zero. Logs go to ``out/{tag}-w{world}-r{rank}.log``."""
    port, procs = free_port(), []
    for rank in range(world):
        log = out / f"{tag}-w{world}-r{rank}.log"
        with log.open("w") as fh:
            procs.append(subprocess.Popen([sys.executable, *args], env=rank_env(rank, world, port),
                                          cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, p in enumerate(procs):
        text = (out / f"{tag}-w{world}-r{rank}.log").read_text(errors="replace")
        assert p.returncode == 0, f"{tag} world {world} rank {rank} exited {p.returncode}:\n{text[-4000:]}"


def launch_env(tmp: Path) -> dict[str, str]:
    """Environment for a launched run: CPU ranks, the repo importable, outputs under ``tmp``."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", SST_ROOT=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               SST_DATA_ROOT=str(tmp / "data"), SST_OUTPUT_ROOT=str(tmp / "runs"))
    env["SST_VENV"] = str(Path(sys.executable).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # deepspeed's runner would otherwise try to honour it
    return env


def debug_overrides(tmp: Path, name: str) -> list[str]:
    """Overrides that put the run's data and outputs in the test's temp dir."""
    if not DEBUG_CONFIG.is_file():
        pytest.fail(f"{DEBUG_CONFIG} is missing: the launcher tests train the debug config")
    return [f"output.root={tmp / 'runs'}", f"output.name={name}", f"data.root={tmp / 'data' / 'debug'}"]


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def check_run_outputs(run_dir: Path, world_size: int, epochs: int = 2) -> dict:
    """What a finished run must leave: resolved config, metrics.jsonl with every epoch and an
    evaluation, and a complete checkpoint of the last epoch written by ``world_size`` ranks."""
    assert run_dir.is_dir(), f"run directory {run_dir} was not created"
    config = run_dir / "config.yaml"
    assert config.is_file() and config.stat().st_size > 0, f"resolved config {config} missing"
    metrics = run_dir / "metrics.jsonl"
    assert metrics.is_file(), f"{metrics} missing; run dir has {sorted(p.name for p in run_dir.iterdir())}"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epoch_recs = [r for r in records if r.get("kind") == "epoch"]
    assert [r["epoch"] for r in epoch_recs] == list(range(epochs)), f"epoch records: {epoch_recs}"
    assert all(math.isfinite(r["loss"]) for r in epoch_recs), f"non-finite loss: {epoch_recs}"
    evals = [r for r in records if r.get("kind") == "eval"]
    assert evals and all(0.0 <= r["mAP"] <= 1.0 for r in evals), f"eval records: {evals}"
    ckpt_root = run_dir / "checkpoints"
    latest = ckpt_root / "latest"
    assert latest.is_file(), f"{latest} missing; checkpoints: {list(ckpt_root.glob('*'))}"
    ckpt = ckpt_root / latest.read_text().strip()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == world_size, f"checkpoint of world {meta['world_size']}, not {world_size}"
    assert meta["epoch"] == epochs, f"last checkpoint is of epoch {meta['epoch']}, expected {epochs}"
    missing = [f for f in meta.get("files", []) if not (ckpt / f).is_file()]
    assert not missing, f"checkpoint {ckpt} lacks {missing}"
    return {"records": records, "meta": meta, "checkpoint": ckpt}


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """Start a launcher in its own process group (so a timeout can end all of its ranks)."""
    out = open(log, "w")  # noqa: SIM115 (closed by finish)
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL the process group this test started (its pgid is the launcher's pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=10)


def finish(proc: subprocess.Popen, log: Path, timeout: float, what: str) -> str:
    """Wait for a started launcher; fail with its log's tail on timeout or a non-zero exit."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_group(proc)
        pytest.fail(f"{what} timed out after {timeout:.0f}s:\n{tail(log.read_text(errors='replace'))}")
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{tail(out)}"
    return out


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Cleanup for a finally: end whatever this test started and is still running."""
    for proc in procs:
        if proc.poll() is None:
            _end_group(proc)


def run_checked(cmd: list[str], env: dict[str, str], log: Path, timeout: float, cwd: Path = ROOT) -> str:
    """Run a launcher to completion and return its output; fail with its tail otherwise."""
    proc = start(cmd, env, log, cwd)
    try:
        return finish(proc, log, timeout, " ".join(cmd[:3]))
    finally:
        stop_all([proc])


def listening_sockets(pid: int | str = "self") -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that process ``pid`` has listening, from /proc."""
    import ipaddress

    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        # /proc/PID/net: the sockets of that process's network namespace (a test host's too)
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((str(ipaddress.ip_address(raw)), int(hex_port, 16)))
    return found


# -- SLURM jobs ------------------------------------------------------------------------------------
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def _as_is(cmd: list[str]) -> list[str]:
    return cmd


def job_fields(job_id: str, env: dict[str, str], client=_as_is) -> dict[str, str]:
    """``scontrol show job`` as a dict; ``client`` wraps the command to run where the cluster is."""
    out = subprocess.run(client(["scontrol", "show", "job", "-o", job_id]), env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id} failed: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for_job(
    job_id: str, env: dict[str, str], timeout: float, log: Path, client=_as_is
) -> dict[str, str]:
    """Fields of the job once it reached a terminal state; cancel it and fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job_id, env, client)
        if fields.get("JobState") in TERMINAL:
            return fields
        time.sleep(2)
    subprocess.run(client(["scancel", job_id]), env=env, timeout=30)
    text = log.read_text(errors="replace") if log.exists() else "(no job output yet)"
    pytest.fail(f"SLURM job {job_id} did not finish within {timeout}s:\n{tail(text)}")
