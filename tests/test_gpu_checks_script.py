"""benchmarks/gpu_checks.sh on the CPU: the parts a device session depends on before any GPU work.

A device session has 15 minutes in all, so the script must keep to its budget, run the steps in
the order named (most important first), and leave its results packed after every step so that
a call killed at its limit still brings back what finished. The GPU steps themselves run only on
the device; ``sync-check`` exits 0 on the CPU, which makes it a real step to run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"


def checks_env(tmp_path: Path, budget: int) -> dict[str, str]:
    """The script's environment as on the device: results under tmp_path/res, packed into tmp_path/out."""
    return dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"),
                GPU_RESULTS=str(tmp_path / "res"), BUDGET_S=str(budget))


def run_checks(tmp_path: Path, *steps: str, budget: int) -> tuple[subprocess.CompletedProcess, Path]:
    env = checks_env(tmp_path, budget)
    proc = subprocess.run(["bash", str(SCRIPT), *steps], env=env, capture_output=True, text=True, timeout=240)
    return proc, tmp_path / "out" / "gpu-results.tgz"


def packed(tgz: Path) -> dict[str, str]:
    with tarfile.open(tgz) as tar:
        return {
            m.name.removeprefix("./"): tar.extractfile(m).read().decode()
            for m in tar.getmembers()
            if m.isfile()
        }


def test_steps_past_the_budget_are_skipped_and_said(tmp_path: Path) -> None:
    proc, tgz = run_checks(tmp_path, "kernels", "gpu-step", budget=0)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    files = packed(tgz)
    summary = files["summary.txt"]
    assert "kernels: skipped (budget" in summary and "gpu-step: skipped (budget" in summary
    assert "kernels.log" not in files  # nothing was started


def test_a_step_that_ran_is_packed_with_its_log(tmp_path: Path) -> None:
    proc, tgz = run_checks(tmp_path, "sync-check", budget=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = packed(tgz)
    assert "sync-check: rc=0" in files["summary.txt"]
    assert "no CUDA device" in files["sync-check.log"]
    assert "torch" in files["gpu-card.txt"]


def test_steps_run_in_the_order_named(tmp_path: Path) -> None:
    proc, _ = run_checks(tmp_path, "sync-check", "kernels", budget=0)
    assert proc.stdout.index("== sync-check") < proc.stdout.index("== kernels")
    proc, _ = run_checks(tmp_path, "kernels", "sync-check", budget=0)
    assert proc.stdout.index("== kernels") < proc.stdout.index("== sync-check")


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path: Path) -> None:
    proc, tgz = run_checks(tmp_path, "sync-check", "sync-chek", budget=200)
    assert proc.returncode == 2
    assert "unknown step 'sync-chek'" in proc.stderr
    assert not tgz.exists()


def test_a_call_killed_mid_step_keeps_what_finished(tmp_path: Path) -> None:
    """The device kills a call at its limit: the steps before survive in the packed results, and
    the running step's limit was cut to the budget (on the CPU gpu-step runs far longer)."""
    out, budget = tmp_path / "out", 60
    env = checks_env(tmp_path, budget)
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "sync-check", "gpu-step"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("== gpu-step"):
                limit = int(line.split("limit ")[1].rstrip("s)\n"))
                break
        else:
            raise AssertionError("gpu-step never started")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert 0 < limit < budget
    files = packed(out / "gpu-results.tgz")
    assert "sync-check: rc=0" in files["summary.txt"]
    assert "gpu-step: not run" in files["summary.txt"]
    assert "sync-check.log" in files


def test_a_second_call_on_a_warm_machine_writes_its_own_folder(tmp_path: Path) -> None:
    """The device keeps /tmp between calls while warm: a rerun must neither replace the first
    call's results nor be refused by the commands that keep earlier outputs (profile, eval, train)."""
    first, _ = run_checks(tmp_path, "sync-check", budget=200)
    second, tgz = run_checks(tmp_path, "sync-check", budget=200)
    assert first.returncode == 0 and second.returncode == 0, second.stdout + second.stderr
    calls = sorted(p for p in (tmp_path / "res").iterdir() if p.name.startswith("call-"))
    assert len(calls) == 2 and all((c / "sync-check.log").is_file() for c in calls)
    assert "sync-check: rc=0" in packed(tgz)["summary.txt"]
