"""Suite-wide settings: CPU fallbacks for Triton and DeepSpeed, and the gpu marker."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # Triton kernels run in the interpreter on CPU; DeepSpeed uses its CPU accelerator (gloo).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="module")
def _restore_environment():
    """In-process trainers export RANK/MASTER_PORT/... into os.environ; a later module's
    subprocesses (an sbatch job exports the whole environment) would then reuse a port this
    process still holds. Every test module starts from the environment the session had."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true a skip is a failure (README: a missing tool or module fails in CI), except
    for ``gpu``-marked tests on a machine without CUDA. Covers ``skipif`` marks, importorskip and
    ``pytest.skip`` alike, so no test file can skip silently in CI."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and _in_ci()) or "gpu" in item.keywords:
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true: {item.nodeid} would be skipped ({reason}); install what it needs"
