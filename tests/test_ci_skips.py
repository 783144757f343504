"""Under CI=true no test may skip (except gpu-marked ones without CUDA): conftest turns skips into
failures. Checked in a child pytest so the CI flag does not leak into this session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PROBE = '''
import importlib.util
import pytest

def test_skipif_mark_missing_module():
    pass
test_skipif_mark_missing_module = pytest.mark.skipif(
    importlib.util.find_spec("no_such_module_xyz") is None, reason="no_such_module_xyz missing"
)(test_skipif_mark_missing_module)

def test_importorskip():
    pytest.importorskip("no_such_module_xyz")

@pytest.mark.gpu
def test_gpu_marked():
    pytest.skip("needs a CUDA GPU")

def test_passes():
    pass
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA GPU\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_skips_fail_under_ci_but_not_gpu_marked(tmp_path):
    res = _run(tmp_path, "true")
    out = res.stdout
    assert res.returncode == 1, out
    # a skipif mark skips in setup (reported as an error), importorskip in the call (a failure)
    assert "1 failed" in out and "1 error" in out and "1 passed" in out and "1 skipped" in out, out
    assert "CI=true: test_probe.py::test_importorskip would be skipped" in out, out
    assert "no_such_module_xyz missing" in out, out


def test_skips_stay_skips_outside_ci(tmp_path):
    res = _run(tmp_path, None)
    assert res.returncode == 0 and "3 skipped" in res.stdout and "1 passed" in res.stdout, res.stdout
