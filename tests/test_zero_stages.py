"""Every ZeRO stage trains, checkpoints and evaluates (DeepSpeed's CPU accelerator, one rank).

``sst-dist eval`` on the saved checkpoint must reproduce the mAP the trainer measured at the end
of the run: the same weights and memory bank came back, whether DeepSpeed stored a consolidated
module (stages 0-2) or only per-rank partitions (stage 3, consolidated by ``zero_to_fp32``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sst_dist.config import load_config

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_checkpoint_evaluates_like_training(tmp_path, capsys, stage):
    from sst_dist.cli import main
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = load_config(
        DEBUG,
        [
            f"output.root={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'data'}",
            f"train.zero_stage={stage}",
            "train.epochs=1",
        ],
    )
    tr = Trainer(cfg)
    tr.train()
    recs = [json.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in recs if r["kind"] == "eval"][-1]["mAP"]
    capsys.readouterr()
    assert main(["eval", str(tr.run_dir), "--out", str(tmp_path / "eval")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1]
    assert json.loads(line)["mAP"] == pytest.approx(trained, abs=1e-6)
