"""launch/slurm/train.sbatch: what a requeued job runs.

After a preemption the job is requeued with the same arguments it was submitted with. A job
submitted with ``--resume-from PATH`` must then continue from the checkpoint its preemption just
saved (``--resume``), not go back to PATH and lose the work in between. The script's own command
line is read from its ``+ srun ...`` line; ``srun`` and ``scontrol`` are stand-ins that only let
the script reach that line (the real preemption and requeue run in tests/test_slurm.py).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from launch_support import DEBUG_CONFIG, ROOT, launch_env

SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"


def train_args(tmp_path: Path, restart_count: int, *args: str) -> list[str]:
    """The arguments the job passes to `sst_dist.cli train` after CONFIG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", "exit 0"), ("scontrol", "echo localhost")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = launch_env(tmp_path)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST="localhost",
               SLURM_NTASKS="1", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_RESTART_COUNT=str(restart_count))
    proc = subprocess.run(["bash", str(SCRIPT), str(DEBUG_CONFIG), *args], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("+ srun "))
    words = shlex.split(line)
    return words[words.index(str(DEBUG_CONFIG)) + 1:]


@pytest.mark.parametrize(
    ("submitted", "requeued"),
    [
        (["--resume-from", "runs/x/checkpoints/epoch_0001"], ["--resume"]),
        (["--resume-from=runs/x/checkpoints/epoch_0001", "train.epochs=4"], ["train.epochs=4", "--resume"]),
        (["--resume", "train.epochs=4"], ["train.epochs=4", "--resume"]),
        (["train.epochs=4", "--overwrite"], ["train.epochs=4", "--overwrite", "--resume"]),
    ],
)
def test_a_requeued_job_resumes_from_its_latest_checkpoint(tmp_path, submitted, requeued):
    assert train_args(tmp_path, 1, *submitted) == requeued


def test_the_first_start_runs_as_submitted(tmp_path):
    submitted = ["--resume-from", "runs/x/checkpoints/epoch_0001", "train.epochs=4"]
    assert train_args(tmp_path, 0, *submitted) == submitted
