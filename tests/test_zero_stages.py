"""Every ZeRO stage trains, checkpoints, evaluates and resumes (DeepSpeed's CPU accelerator, one rank).

The saved checkpoint must give back exactly the weights and memory bank the run ended with, both
to ``sst-dist eval`` (through :func:`load_for_inference`: a consolidated module for stages 0-2,
per-rank partitions consolidated for stage 3) and to a resumed Trainer; and ``sst-dist eval``
must reproduce the mAP the trainer measured at the end of the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sst_dist.config import load_config

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"


def _full_state(trainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the trainer's module, gathered when ZeRO-3 partitions them."""
    import deepspeed

    model, stage3 = trainer.model, trainer.cfg.train.zero_stage == 3
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage3):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() == want.keys(), f"{where}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for k, v in want.items():
        assert torch.equal(got[k].to(v.dtype), v), f"{where}: {k} differs"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_checkpoint_evaluates_like_training(tmp_path, capsys, stage):
    from sst_dist.cli import main
    from sst_dist.train.inference import load_for_inference
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    overrides = [
        f"output.root={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'data'}",
        f"train.zero_stage={stage}",
        "train.epochs=1",
    ]
    tr = Trainer(load_config(DEBUG, overrides))
    tr.train()
    trained = _full_state(tr)
    assert trained["bank.filled"].sum() > 0 and trained["bank.bank"].abs().max() > 0

    model, _, _ = load_for_inference(tr.run_dir)
    _same({k: v.cpu() for k, v in model.state_dict().items()}, trained, f"ZeRO-{stage} eval load")

    again = Trainer(load_config(DEBUG, overrides), resume=True)
    try:
        assert again.epoch == 1
        _same(_full_state(again), trained, f"ZeRO-{stage} resume")
    finally:
        again.release()

    recs = [json.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    mAP = [r for r in recs if r["kind"] == "eval"][-1]["mAP"]
    capsys.readouterr()
    assert main(["eval", str(tr.run_dir), "--out", str(tmp_path / "eval")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1]
    assert json.loads(line)["mAP"] == pytest.approx(mAP, abs=1e-6)
