"""Config loading is fast (no torch), complete (non-finite values refused) and leaks no secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_and_model_config_import_no_torch(tmp_path):
    """Validating a config must not pay for torch/torchvision (5-15 s on a busy node)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {num_classes: 3, backbone: resnet18}\n")
    code = (
        "import sys\n"
        "import sst_dist.model.config\n"
        "from sst_dist.config import load_config\n"
        "from sst_dist.model import ModelConfig\n"
        f"cfg = load_config({str(cfg)!r}, ['train.lr=0.1'])\n"
        "assert isinstance(cfg.model, ModelConfig)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'numpy', 'deepspeed') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout and "deepspeed" not in out.stdout, out.stdout


def test_model_config_is_one_class_everywhere():
    from sst_dist.config import ModelConfig as A
    from sst_dist.model import ModelConfig as B
    from sst_dist.model.config import ModelConfig as C
    from sst_dist.model.sst import ModelConfig as D

    assert A is B is C is D
