"""Kill a rank with SIGKILL after epoch 1, relaunch with --resume: same result as never stopping.

Two 2-rank runs of the debug config (3 epochs, fp32, CPU, gloo) start side by side, each rank a
real ``python -m sst_dist.cli train`` process with a launcher's RANK/WORLD_SIZE/MASTER_*
variables. Run B's rank 1 is SIGKILLed as soon as B's ``latest`` checkpoint pointer names
epoch 1 (its rank 0 then hangs in a collective and is killed as well, as a launcher would);
B is relaunched with ``--resume`` and must end with the same weights, optimizer moments, bank and
synchronized generator as run A, within 1e-6.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_support import rank_env

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "launch" / "configs" / "debug.yaml"
EPOCHS = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, name: str, resume: bool = False) -> list[subprocess.Popen]:
    port = _port()
    procs = []
    for rank in range(2):
        env = rank_env(rank, 2, port)
        cmd = [
            sys.executable,
            "-m",
            "sst_dist.cli",
            "train",
            str(DEBUG),
            f"output.root={tmp / 'runs'}",
            f"output.name={name}",
            f"data.root={tmp / 'data'}",
            f"train.epochs={EPOCHS}",
            "train.eval_every=100",
            "data.synthetic.num_train=24",
            "data.synthetic.num_test=8",
        ]
        if resume:
            cmd.append("--resume")
        log = open(tmp / f"{name}{'-resume' if resume else ''}-r{rank}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _wait(procs: list[subprocess.Popen], tmp: Path, what: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    _kill(procs)
    logs = "\n".join(
        f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(tmp.glob("*.log"))
    )
    assert all(p.returncode == 0 for p in procs), f"{what} failed: {[p.returncode for p in procs]}\n{logs}"


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()


def _final_state(run_dir: Path) -> dict:
    ck = run_dir / "checkpoints" / f"epoch_{EPOCHS:04d}"
    module = torch.load(ck / "engine" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    optim = sorted((ck / "engine").glob("*optim_states.pt"))
    sst = torch.load(ck / "sst_state.pt", map_location="cpu", weights_only=False)
    out = {"module": module["module"], "sst": sst, "meta": json.loads((ck / "meta.json").read_text())}
    if optim:
        out["optim"] = torch.load(optim[0], map_location="cpu", weights_only=False)
    return out


def _flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat_tensors(v, f"{prefix}/{i}"))
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    # generate the shared synthetic data once so the two runs do not race to write it
    from sst_dist.config import load_config
    from sst_dist.train.data import ensure_synthetic

    ensure_synthetic(
        load_config(
            DEBUG,
            [f"data.root={tmp_path / 'data'}", "data.synthetic.num_train=24", "data.synthetic.num_test=8"],
        )
    )
    a = _start(tmp_path, "A")
    b = _start(tmp_path, "B")
    pointer = tmp_path / "runs" / "B" / "checkpoints" / "latest"
    killed_after = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and any(p.poll() is None for p in b):
            if pointer.is_file() and pointer.read_text().strip():
                killed_after = pointer.read_text().strip()
                b[1].send_signal(signal.SIGKILL)  # the real thing: no handler, no cleanup
                break
            time.sleep(0.02)
        assert killed_after is not None, "run B never wrote its first checkpoint"
        b[1].wait(timeout=30)
        assert b[1].returncode == -signal.SIGKILL
        time.sleep(1.0)
        _kill(b)  # rank 0 is stuck in a collective with a dead peer
        assert killed_after == "epoch_0001", f"rank killed after {killed_after}, expected epoch_0001"
        assert not (tmp_path / "runs" / "B" / "checkpoints" / f"epoch_{EPOCHS:04d}").exists()
        _wait(a, tmp_path, "uninterrupted run A")
        resumed = _start(tmp_path, "B", resume=True)
        _wait(resumed, tmp_path, "resumed run B")
    finally:
        _kill(a + b)
    log = (tmp_path / "B-resume-r0.log").read_text()
    assert "resumed from" in log and "epoch_0001" in log, log[-2000:]

    sa, sb = _final_state(tmp_path / "runs" / "A"), _final_state(tmp_path / "runs" / "B")
    assert sa["meta"]["step"] == sb["meta"]["step"] and sa["meta"]["epoch"] == sb["meta"]["epoch"] == EPOCHS
    ta, tb = (
        _flat_tensors({k: sa[k] for k in ("module", "sst", "optim") if k in sa}),
        _flat_tensors({k: sb[k] for k in ("module", "sst", "optim") if k in sb}),
    )
    assert ta.keys() == tb.keys() and any("bank" in k for k in ta) and any("module" in k for k in ta)
    for k in ta:
        x, y = ta[k], tb[k]
        if x.is_floating_point():
            assert torch.allclose(x, y, rtol=0, atol=1e-6), f"{k}: max diff {(x - y).abs().max().item():.3e}"
        else:
            assert torch.equal(x, y), k
