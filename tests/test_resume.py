"""Resume reproduces an uninterrupted run: weights, Adam moments, LR scheduler, bank, metrics.

``test_crash_then_resume_across_a_steplr_decay`` (one process, ZeRO 0): run B crashes at step 7,
after its checkpoint at step 4 and after logging step 6; the resumed run C passes the StepLR decay
at step 8 and must end with run A's weights, Adam moments and scheduler state, and with each step
once in metrics.jsonl and TensorBoard. A scheduler that is not restored decays at step 12 instead.

``test_sigkill_then_resume_matches_uninterrupted``: kill a rank with SIGKILL after epoch 1,
relaunch with --resume: same result as never stopping.

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
            "train.lr_step_epochs=1",  # StepLR decays after every epoch: once more after the kill
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
    """Weights, optimizer (Adam moments), LR scheduler and SST state of the run's last checkpoint.

    At ZeRO 0 DeepSpeed keeps the optimizer inside the model-states file; at ZeRO >= 1 in
    per-rank partition files. Either way it must be there: a missing one fails, never skips."""
    from sst_dist.train.ckpt_files import load_checkpoint_file

    ck = run_dir / "checkpoints" / f"epoch_{EPOCHS:04d}"
    module = load_checkpoint_file(ck / "engine" / "mp_rank_00_model_states.pt")
    optim_files = sorted((ck / "engine").glob("*optim_states.pt"))
    optim = [load_checkpoint_file(f) for f in optim_files] if optim_files else module["optimizer"]
    moments = [k for k in _flat_tensors(optim) if k.endswith(("exp_avg", "exp_avg_sq"))]
    assert moments, f"no Adam moments in {ck}"
    assert module["lr_scheduler"] and module["lr_scheduler"]["last_epoch"] > 0, module.get("lr_scheduler")
    return {
        "module": module["module"],
        "optim": optim,
        "sched": {k: v for k, v in module["lr_scheduler"].items() if isinstance(v, (int, float, list))},
        "sst": load_checkpoint_file(ck / "sst_state.pt"),
        "meta": json.loads((ck / "meta.json").read_text()),
    }


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
    assert sa["sched"] == sb["sched"]
    ta = _flat_tensors({k: sa[k] for k in ("module", "sst", "optim")})
    tb = _flat_tensors({k: sb[k] for k in ("module", "sst", "optim")})
    assert ta.keys() == tb.keys() and any("bank" in k for k in ta) and any("exp_avg_sq" in k for k in ta)
    for k in ta:
        x, y = ta[k], tb[k]
        if x.is_floating_point():
            assert torch.allclose(x, y, rtol=0, atol=1e-6), f"{k}: max diff {(x - y).abs().max().item():.3e}"
        else:
            assert torch.equal(x, y), k


def _inproc_cfg(tmp: Path, name: str, *extra: str):
    from sst_dist.config import load_config

    return load_config(
        DEBUG,
        [
            f"output.root={tmp / 'runs'}",
            f"data.root={tmp / 'data'}",
            f"output.name={name}",
            "train.lr_step_epochs=1",  # 8 steps per epoch: the lr drops 10x after step 8 and 16
            "train.lr_gamma=0.1",
            "output.tensorboard=true",
            *extra,
        ],
    )


def _engine_state(tr) -> dict:
    opt = tr.optimizer.state_dict()
    assert any("exp_avg_sq" in k for k in _flat_tensors(opt["state"])), "no Adam moments"
    return {
        "module": {k: v.detach().clone() for k, v in tr.model.state_dict().items()},
        "optim": opt["state"],
        "lr": [g["lr"] for g in opt["param_groups"]],
        "sched": {k: v for k, v in tr.scheduler.state_dict().items() if k in ("last_epoch", "_last_lr")},
    }


def _tb_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_crash_then_resume_across_a_steplr_decay(tmp_path):
    import os

    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    a = Trainer(_inproc_cfg(tmp_path, "A"))
    a.train()
    want = _engine_state(a)
    assert want["sched"]["last_epoch"] == 16 and want["lr"][0] == pytest.approx(1e-6)  # two decays

    b = Trainer(_inproc_cfg(tmp_path, "B", "train.checkpoint_every=4"))
    step = b.train_step

    def step_then_crash(*args, **kw):
        res = step(*args, **kw)
        if b.global_step == 7:
            raise RuntimeError("simulated crash")
        return res

    b.train_step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        b.train()
    assert (b.run_dir / "checkpoints" / "latest").read_text().strip() == "epoch_0000_step_00000004"

    c = Trainer(_inproc_cfg(tmp_path, "B", "train.checkpoint_every=4"), resume=True)
    assert (c.global_step, c.scheduler.state_dict()["last_epoch"]) == (4, 4)
    c.train()
    got = _engine_state(c)
    assert got["sched"] == want["sched"] and got["lr"] == want["lr"]
    ta, tb = (
        _flat_tensors({k: want[k] for k in ("module", "optim")}),
        _flat_tensors({k: got[k] for k in ("module", "optim")}),
    )
    assert ta.keys() == tb.keys()
    for k in ta:
        x, y = ta[k].double(), tb[k].double()
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5), f"{k}: max diff {(x - y).abs().max().item():.3e}"

    def records(run: str) -> list[tuple[str, int]]:
        lines = (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()
        return [(r["kind"], r["step"]) for r in map(json.loads, lines)]

    assert records("B") == records("A")  # step 6, logged before the crash, is there once
    assert _tb_steps(c.run_dir, "train/loss") == _tb_steps(a.run_dir, "train/loss")
