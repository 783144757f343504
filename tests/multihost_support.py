"""Shared pieces of the multi-host launcher tests (tests/test_multihost_launchers.py).

Every launcher trains the debug config on 2 hosts x 2 CPU ranks x batch 2 in two legs (epoch 0,
then ``--resume`` to epoch 1, so the second leg resumes across hosts), and must end where one
rank with batch 8 ends after two uninterrupted epochs: the loss of every logged step and every
weight and memory-bank entry within 1e-5.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from launch_support import DEBUG_CONFIG, ROOT, launch_env, tail

TOL = 1e-5
PER_RANK_BATCH, RANKS_PER_HOST, REF_BATCH = 2, 2, 8
README = ROOT / "README.md"


def overrides(tmp: Path, name: str, batch: int, epochs: int) -> list[str]:
    """The run's data and outputs under ``tmp`` (data shared by every run), batch and epochs."""
    return [f"output.root={tmp / 'runs'}", f"output.name={name}", f"data.root={tmp / 'data'}",
            f"train.batch_size={batch}", f"train.epochs={epochs}"]


def reference_run(tmp: Path) -> Path:
    """One rank, batch 8, two epochs straight: what every multi-host run must reproduce. It
    also generates the synthetic data every later run reads."""
    env = launch_env(tmp)
    cmd = [sys.executable, "-m", "sst_dist.cli", "train", str(DEBUG_CONFIG),
           *overrides(tmp, "ref", REF_BATCH, 2)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"reference run failed:\n{tail(r.stdout + r.stderr)}"
    return tmp / "runs" / "ref"


def step_losses(run_dir: Path) -> dict[int, float]:
    """The global loss of every logged step (``train.log_every``), by global step. Per step, not
    the epoch means: after a mid-epoch resume an epoch's mean covers only the resumed steps."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"}


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Weights, buffers and memory bank of the run's latest checkpoint (tensors-only load)."""
    from sst_dist.train.inference import load_for_inference

    model, _, meta = load_for_inference(run_dir)
    assert meta["epoch"] == 2, f"{run_dir}: latest checkpoint is of epoch {meta['epoch']}"
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def assert_same_training(run_dir: Path, ref_dir: Path) -> None:
    """``run_dir`` trained like ``ref_dir``: every logged step's loss and the final state within TOL."""
    got, want = step_losses(run_dir), step_losses(ref_dir)
    assert got.keys() == want.keys() and len(want) >= 4, (got, want)
    assert all(abs(got[k] - want[k]) <= TOL for k in want), f"step losses {got} vs 1 rank {want}"
    a, b = final_state(run_dir), final_state(ref_dir)
    assert a.keys() == b.keys()
    worst = max(((k, (a[k] - b[k]).abs().max().item()) for k in a if a[k].numel()), key=lambda kv: kv[1])
    assert worst[1] <= TOL, f"{run_dir.name}: {worst[0]} differs from the 1-rank run by {worst[1]:.2e}"
    moved = max((a[k] - s).abs().max().item() for k, s in epoch1_state(ref_dir).items() if k in a)
    assert moved > 100 * TOL, "training did not move the weights: the comparison would prove nothing"


def epoch1_state(ref_dir: Path) -> dict[str, torch.Tensor]:
    """The reference's state after epoch 1 (the final state must have moved away from it)."""
    from sst_dist.train.inference import load_for_inference

    ckpts = sorted((ref_dir / "checkpoints").glob("epoch_0001*"))
    assert ckpts, f"no epoch-1 checkpoint in {ref_dir / 'checkpoints'}"
    model, _, _ = load_for_inference(ckpts[0])
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def resumed_from(run_dir: Path, epoch: int | None = 1) -> re.Match:
    """The run's resume line (from a checkpoint of ``epoch``, any epoch when None)."""
    log = (run_dir / "train.log").read_text()
    m = re.search(r"resumed from \S+/(epoch_\d{4}\S*) \(epoch (\d+), step (\d+)\)", log)
    ok = m is not None and (epoch is None or int(m.group(2)) == epoch)
    assert ok, f"no resume (epoch {epoch}) in {run_dir / 'train.log'}:\n{log[-2000:]}"
    return m


def readme_commands(marker: str) -> list[str]:
    """The README's multi-node example lines that contain ``marker``, prompt (``node0$``) cut."""
    text = README.read_text()
    block = re.search(r"<!-- multi-node examples -->\n```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its multi-node examples block"
    lines = [re.sub(r"^\S+\$ ", "", ln).strip() for ln in block.group(1).splitlines()]
    found = [ln for ln in lines if marker in ln and not ln.startswith("#")]
    assert found, f"README multi-node examples have no line with {marker!r}"
    return found
