"""``train.clip_grad=0`` means no clipping: the generated DeepSpeed config must say so explicitly,
because DeepSpeed's own default (``gradient_clipping`` absent) clips the global norm at 1.0."""

from __future__ import annotations

from pathlib import Path

from sst_dist.config import load_config
from sst_dist.train.engine_setup import deepspeed_config

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"


def test_clip_zero_is_explicitly_off_and_a_value_passes_through():
    off = deepspeed_config(load_config(DEBUG, ["train.clip_grad=0"]), 1)
    assert off["gradient_clipping"] == 0.0
    on = deepspeed_config(load_config(DEBUG, ["train.clip_grad=2.5"]), 2)
    assert on["gradient_clipping"] == 2.5


def test_deepspeed_engine_does_not_clip_when_off():
    """The engine built from the generated config reports clipping off (its default is 1.0)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = DeepSpeedConfig(deepspeed_config(load_config(DEBUG, ["train.clip_grad=0"]), 1))
    assert ds.gradient_clipping == 0.0
    assert DeepSpeedConfig({"train_batch_size": 1}).gradient_clipping == 1.0  # why it must be explicit
