"""Mid-epoch checkpoints and SIGUSR1 preemption resume at the exact step.

Run A trains the debug config (8 steps per epoch, pseudo labels from epoch 1) for 2 epochs
straight. Run B (2 DataLoader workers) checkpoints every 3 steps and, after global step 12
(inside epoch 1, where the memory bank and pseudo labels are active), it and its workers receive
a real SIGUSR1, as slurmstepd signals every process of a job step. It must save a checkpoint at
that step and stop with ``Preempted``; the workers must survive the signal. Run C resumes B and
finishes; its weights and bank must equal A's, which holds only if the loader position, RNG,
bank, optimizer and scheduler all came back at step 12, and B's metrics.jsonl must then hold A's
records, each step once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from sst_dist.config import load_config

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"


def _cfg(tmp: Path, name: str, *extra: str):
    return load_config(
        DEBUG,
        [f"output.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", f"output.name={name}", *extra],
    )


def _state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.slow
def test_sigusr1_saves_mid_epoch_and_resume_matches_uninterrupted(tmp_path):
    from sst_dist.train.preemption import Preempted
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    a = Trainer(_cfg(tmp_path, "A"))
    a.train()
    want = _state(a)

    b_args = ("train.checkpoint_every=3", "output.keep_checkpoints=10", "data.num_workers=2")
    b = Trainer(_cfg(tmp_path, "B", *b_args))
    step = b.train_step

    def step_then_signal(*args, **kw):
        res = step(*args, **kw)
        if b.global_step == 12:
            workers = psutil.Process().children(recursive=True)
            assert workers, "expected DataLoader worker processes"
            for pid in [w.pid for w in workers] + [os.getpid()]:
                os.kill(pid, signal.SIGUSR1)
            time.sleep(0.5)
            dead = [w.pid for w in workers if not w.is_running() or w.status() == psutil.STATUS_ZOMBIE]
            assert not dead, f"DataLoader workers {dead} died of SIGUSR1"
        return res

    b.train_step = step_then_signal
    with pytest.raises(Preempted):
        b.train()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler removed again
    root = b.run_dir / "checkpoints"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == [
        "epoch_0000_step_00000003",
        "epoch_0000_step_00000006",
        "epoch_0001",
        "epoch_0001_step_00000011",
        "epoch_0001_step_00000012",
    ]
    assert (root / "latest").read_text().strip() == "epoch_0001_step_00000012"

    c = Trainer(_cfg(tmp_path, "B", *b_args), resume=True)
    assert (c.epoch, c.global_step, c.data.train_loader.position) == (1, 12, 4)
    c.train()
    assert c.global_step == a.global_step == 16
    got = _state(c)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k].double(), want[k].double(), atol=1e-6, rtol=1e-5), k
    # the metrics of B + C are A's: step 12 logged once, before its checkpoint (none lost, none twice)
    assert _records(b.run_dir) == _records(a.run_dir)
    # epoch 1's means cover all 8 of its steps, the 4 before the checkpoint included
    epoch_a, epoch_b = _epoch_record(a.run_dir, 1), _epoch_record(b.run_dir, 1)
    means = [k for k in epoch_a if k == "loss" or k in ("bce", "intra", "inter", "cooc", "contrastive")]
    assert len(means) >= 4, epoch_a
    for k in means:
        assert epoch_b[k] == pytest.approx(epoch_a[k], rel=1e-5, abs=1e-7), k
    assert epoch_b["skipped_steps_epoch"] == epoch_a["skipped_steps_epoch"] == 0


def _records(run_dir: Path) -> list[tuple[str, int]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["kind"], r["step"]) for r in map(json.loads, lines)]


def _epoch_record(run_dir: Path, epoch: int) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if r["kind"] == "epoch" and r["epoch"] == epoch]
    assert len(recs) == 1, recs
    return recs[0]
