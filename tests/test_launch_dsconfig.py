"""The run config's ``deepspeed:`` section: merged over the generated DeepSpeed config (a JSON
file first, inline keys over it), keys owned by train.* refused with one line naming the key."""

from __future__ import annotations

import json

import pytest
from launch_support import DEBUG_CONFIG

from sst_dist.config import ConfigError, load_config
from sst_dist.train.engine_setup import deepspeed_config, save_deepspeed_config


def test_section_and_json_file_merge_over_the_generated_config(tmp_path):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 5},
                                   "dump_state": True}))
    cfg = load_config(DEBUG_CONFIG, [f"deepspeed.config_file={ds_json}", "deepspeed.dump_state=false",
                                     "deepspeed.zero_optimization.reduce_bucket_size=7",
                                     "train.zero_stage=1"])
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 7}
    assert ds["dump_state"] is False  # inline beats the file
    assert ds["train_batch_size"] == 8 and "config_file" not in ds
    saved = save_deepspeed_config(ds, tmp_path)
    assert json.loads(saved.read_text()) == ds
    assert deepspeed_config(load_config(DEBUG_CONFIG), 1)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("override, key", [
    ("deepspeed.train_micro_batch_size_per_gpu=3", "micro_batch_size_per_gpu': is set by train"),
    ("deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage': is set by train.zero_stage"),
    ("deepspeed.bf16.enabled=true", "deepspeed.bf16': is set by train.precision"),
    ("deepspeed=7", "'deepspeed': must be a mapping"),
    ("deepspeed.config_file=/no/such/ds.json", "cannot read /no/such/ds.json"),
])
def test_bad_section_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        load_config(DEBUG_CONFIG, [override])


def test_json_file_that_sets_an_owned_key_or_is_not_an_object(tmp_path):
    owned, listy = tmp_path / "owned.json", tmp_path / "list.json"
    owned.write_text('{"gradient_clipping": 1.0}')
    listy.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"deepspeed\.gradient_clipping': is set by train\.clip_grad"):
        load_config(DEBUG_CONFIG, [f"deepspeed.config_file={owned}"])
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(DEBUG_CONFIG, [f"deepspeed.config_file={listy}"])
