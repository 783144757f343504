"""Run config: YAML + typed overrides, env expansion, validation errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sst_dist.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    save_config,
)
from sst_dist.model.sst import ModelConfig
from sst_dist.train.distributed import detect_env, first_slurm_host

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


def _write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_overrides_are_typed_by_the_field(tmp_path):
    p = _write(tmp_path, {"model": {"num_classes": 20, "backbone": "resnet18"}})
    cfg = load_config(
        p,
        [
            "data.proportion=0.3",
            "train.lr=1e-3",
            "train.epochs=7",
            "train.progress=false",
            "data.root=123",
            "model.pretrained=null",
            "train.precision=bf16",
        ],
    )
    assert isinstance(cfg.model, ModelConfig) and cfg.model.num_classes == 20
    assert cfg.data.proportion == 0.3 and isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-3
    assert cfg.train.epochs == 7 and cfg.train.progress is False
    assert cfg.data.root == "123"  # a str field stays a string even when YAML reads a number
    assert cfg.model.pretrained is None and cfg.train.precision == "bf16"


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("train.precision=fp8", "train.precision", "fp32"),
        ("train.zero_stage=4", "train.zero_stage", "0, 1, 2, 3"),
        ("train.epochs=two", "train.epochs", "integer"),
        ("data.proportion=1.5", "data.proportion", "(0, 1]"),
        ("data.backend=opencv", "data.backend", "dali"),
        ("train.batchnorm=none", "train.batchnorm", "sync"),
        ("trian.epochs=1", "trian", "allowed keys"),
        ("train.epoch=1", "train.epoch ", "did you mean train.epochs?"),
        ("model.backbone=vgg", "model", "resnet101"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(tmp_path, override, key, hint):
    p = _write(tmp_path, {"model": {"num_classes": 5}})
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    assert key in str(e.value) and hint in str(e.value)


def test_missing_model_section_and_file(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        config_from_dict({"train": {}})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.epochs"])


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("SST_DATA_ROOT", "/data/x")
    monkeypatch.delenv("SST_OUTPUT_ROOT", raising=False)
    monkeypatch.delenv("SST_UNSET_VAR", raising=False)
    cfg = config_from_dict({"model": {"num_classes": 3}, "data": {"root": "${SST_DATA_ROOT}/voc"}})
    assert cfg.data.root == "/data/x/voc"
    assert cfg.output.root == "runs"  # the default's ${SST_OUTPUT_ROOT:-runs}
    with pytest.raises(ConfigError, match="SST_UNSET_VAR"):
        config_from_dict({"model": {"num_classes": 3}, "data": {"root": "${SST_UNSET_VAR}/x"}})


def test_synthetic_classes_must_match_model():
    with pytest.raises(ConfigError, match="model.num_classes"):
        config_from_dict(
            {"model": {"num_classes": 4}, "data": {"synthetic": {"enabled": True, "num_classes": 6}}}
        )


def test_saved_config_loads_back_identically(tmp_path):
    cfg = config_from_dict({"model": {"num_classes": 4, "backbone": "resnet18"}, "train": {"zero_stage": 2}})
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert again == cfg and isinstance(again, RunConfig)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path, monkeypatch):
    monkeypatch.setenv("SST_DATA_ROOT", "/d")
    monkeypatch.setenv("SST_OUTPUT_ROOT", "/o")
    cfg = load_config(path, ["data.proportion=0.1"])
    assert cfg.data.proportion == 0.1
    assert cfg.output.root.startswith("/o") and cfg.data.root.startswith("/d")


def test_reference_hyperparameters_are_the_defaults():
    cfg = config_from_dict({"model": {"num_classes": 80}})
    t, p, lw = cfg.train, cfg.pseudo, cfg.loss
    assert (t.lr, t.weight_decay, t.lr_step_epochs, t.lr_gamma, t.epochs, t.batch_size) == (
        1e-5,
        5e-4,
        10,
        0.1,
        20,
        8,
    )
    assert (p.warmup_epochs, p.margin_start, p.margin_step, p.margin_min) == (5, 0.95, 0.025, 0.75)
    assert (lw.bce, lw.intra_bce, lw.inter_bce, lw.cooccurrence, lw.contrastive) == (1, 1, 1, 10, 0.05)


# ------------------------------------------------------------------ launcher environment detection
def test_detect_env_torchrun_deepspeed_slurm_single():
    e = detect_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "h1",
            "MASTER_PORT": "1234",
            "TORCHELASTIC_RUN_ID": "x",
        }
    )
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3,
        4,
        1,
        "h1",
        1234,
        "torchrun",
    )
    assert detect_env({"RANK": "0", "WORLD_SIZE": "2"}).launcher == "deepspeed"
    s = detect_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "77",
            "SLURM_NODELIST": "gpu[07-09,12]",
            "PATH": "/nonexistent",
        }
    )
    assert (s.rank, s.world_size, s.local_rank, s.launcher) == (5, 8, 1, "slurm")
    assert s.master_addr in ("gpu07",) and s.master_port == 20077
    one = detect_env({})
    assert (one.rank, one.world_size, one.launcher) == (0, 1, "single")
    with pytest.raises(ValueError, match="rank 4 out of range"):
        detect_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize(
    "nodelist, first",
    [("node01", "node01"), ("gpu[07-09,12]", "gpu07"), ("a[3,5],b[1-2]", "a3"), ("host-1,host-2", "host-1")],
)
def test_first_slurm_host_parsing(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # force the parser, not scontrol
    assert first_slurm_host(nodelist) == first


def test_log_rank_selection(monkeypatch):
    from sst_dist.train.logging_utils import log_rank_enabled

    monkeypatch.delenv("SST_LOG_RANK", raising=False)
    assert log_rank_enabled(0) and not log_rank_enabled(1)
    monkeypatch.setenv("SST_LOG_RANK", "1")
    assert log_rank_enabled(1) and not log_rank_enabled(0)
    monkeypatch.setenv("SST_LOG_RANK", "all")
    assert log_rank_enabled(0) and log_rank_enabled(3)
    monkeypatch.setenv("SST_LOG_RANK", "first")
    with pytest.raises(ValueError, match="SST_LOG_RANK"):
        log_rank_enabled(0)
