"""Run-config sections: nested dataclasses that validate their own values.

Each section's ``validate(prefix)`` checks ranges and names the offending key, so that a bad
value is refused when the config is loaded instead of crashing a run hours later. Loading,
overrides and ``${SST_*}`` expansion live in :mod:`sst_dist.config`, which re-exports all of
this; import from there. No torch here: a config is checked in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sst_dist.model.config import ModelConfig

SEED_MAX = 2**32 - 1  # numpy's RandomState takes seeds in [0, 2**32)


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message names the key."""


class ConfigFileError(ConfigError, FileNotFoundError):
    """The run config file is missing (also a FileNotFoundError, for callers that catch that)."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r}: {msg}")


def _check_seed(value: int, key: str) -> None:
    _check(0 <= value <= SEED_MAX, key, f"must be in [0, 2**32 - 1], got {value}")


@dataclass
class SyntheticConfig:
    """Generated scenes for tests and the demo (data_shards.synthetic), built when missing."""

    enabled: bool = False
    num_train: int = 64
    num_test: int = 32
    num_classes: int = 6
    image_size: int = 64
    seed: int = 0
    # easy: large clean objects; hard: small objects, look-alike distractors, clutter, lighting
    # and blur (data_shards.synthetic), so that a pretrained trunk does not saturate the task
    difficulty: Literal["easy", "hard"] = "easy"

    def validate(self, prefix: str) -> None:
        for name in ("num_train", "num_test", "num_classes", "image_size"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", f"must be > 0, got {getattr(self, name)}")
        _check_seed(self.seed, f"{prefix}.seed")


@dataclass
class DataConfig:
    """Where the shards are and how the loader reads them (data_shards.loaders.build_loader)."""

    root: str = "${SST_DATA_ROOT:-data}/coco2014"
    train_split: str = "train"
    test_split: str = "test"
    proportion: float = 0.1
    seed: int = 0
    image_size: int = 448
    backend: Literal["auto", "dali", "torch", "torch-gpu"] = "auto"
    num_workers: int = 2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, prefix: str) -> None:
        _check(
            0.0 < self.proportion <= 1.0, f"{prefix}.proportion", f"must be in (0, 1], got {self.proportion}"
        )
        # the trunk downsamples by 32 and the neck pools 2x2: smaller images leave no feature map
        _check(self.image_size >= 64, f"{prefix}.image_size", f"must be >= 64, got {self.image_size}")
        _check_seed(self.seed, f"{prefix}.seed")
        _check(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(bool(self.root), f"{prefix}.root", "must not be empty")
        self.synthetic.validate(f"{prefix}.synthetic")


@dataclass
class LossConfig:
    """Loss weights (DESIGN §3) and the epoch-0 ramp of the co-occurrence/contrastive terms
    (``sst_dist.losses.LossWeights`` applies them)."""

    bce: float = 1.0
    intra_bce: float = 1.0
    inter_bce: float = 1.0
    cooccurrence: float = 10.0
    contrastive: float = 0.05
    ramp_epochs: int = 1
    # pair-head targets: "reference" counts unknown labels as 0 (DESIGN); "known" leaves out the
    # pairs whose target is unknown (see docs/accuracy.md)
    pair_targets: Literal["reference", "known"] = "reference"

    def validate(self, prefix: str) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)):
                _check(v >= 0, f"{prefix}.{f.name}", f"must be >= 0, got {v}")


@dataclass
class PseudoConfig:
    """Warm-up epoch E0 and the margin schedule (start, step per epoch >= E0, floor)."""

    warmup_epochs: int = 5
    margin_start: float = 0.95
    margin_step: float = 0.025
    margin_min: float = 0.75
    # cross-image pseudo labels: "margin" (the paper) compares the bank similarity with the margin;
    # "calibrated" with per-class thresholds, the margin-quantile of the bank's own similarities
    # (sst_dist.pseudo.bank_thresholds; see docs/accuracy.md)
    inter_threshold: Literal["margin", "calibrated"] = "margin"
    # "hard": a cross-image pseudo positive counts like a known label (the paper); "similarity":
    # it counts with weight clamp(its bank similarity, 0, 1) in the inter BCE's weighted mean
    inter_weight: Literal["hard", "similarity"] = "hard"

    def validate(self, prefix: str) -> None:
        _check(self.warmup_epochs >= 0, f"{prefix}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(
            0.0 <= self.margin_min <= self.margin_start <= 1.0,
            f"{prefix}.margin_start",
            f"need 0 <= margin_min <= margin_start <= 1, got {self.margin_min}, {self.margin_start}",
        )
        _check(self.margin_step >= 0, f"{prefix}.margin_step", f"must be >= 0, got {self.margin_step}")


@dataclass
class TrainConfig:
    """Optimisation and engine settings; batch_size is per rank (DeepSpeed micro batch)."""

    epochs: int = 20
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 5e-4
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    clip_grad: float = 0.0
    # bf16: DeepSpeed's bf16 mode (bf16 weights, fp32 master copy); bf16-autocast: fp32 weights
    # and optimizer, bf16 matmuls under torch.autocast (DeepSpeed's torch_autocast)
    precision: Literal["fp32", "bf16", "bf16-autocast", "fp16"] = "fp32"
    zero_stage: int = 0
    batchnorm: Literal["sync", "frozen", "local"] = "sync"
    seed: int = 0
    max_bad_steps: int = 5
    max_steps_per_epoch: int = 0
    init_from: str = ""  # weights to start from: a `sst-dist convert-checkpoint` output (official SST)
    log_every: int = 10
    eval_every: int = 1
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    progress: bool = True

    def validate(self, prefix: str) -> None:
        for name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "lr_step_epochs",
            "max_bad_steps",
            "log_every",
            "eval_every",
        ):
            v = getattr(self, name)
            _check(v >= 1, f"{prefix}.{name}", f"must be >= 1, got {v}")
        _check(
            self.zero_stage in (0, 1, 2, 3),
            f"{prefix}.zero_stage",
            f"allowed values: 0, 1, 2, 3; got {self.zero_stage}",
        )
        _check(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _check_seed(self.seed, f"{prefix}.seed")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 < self.lr_gamma <= 1, f"{prefix}.lr_gamma", f"must be in (0, 1], got {self.lr_gamma}")
        _check(self.clip_grad >= 0, f"{prefix}.clip_grad", f"must be >= 0 (0 = off), got {self.clip_grad}")
        _check(
            self.max_steps_per_epoch >= 0, f"{prefix}.max_steps_per_epoch", "must be >= 0 (0 = whole epoch)"
        )
        _check(
            self.checkpoint_every >= 0 and self.checkpoint_every % self.grad_accum == 0,
            f"{prefix}.checkpoint_every",
            f"must be >= 0 and a multiple of grad_accum={self.grad_accum}, got {self.checkpoint_every}",
        )
        _check(
            not self.init_from or os.path.isfile(os.path.expanduser(self.init_from)),
            f"{prefix}.init_from",
            f"file not found: {self.init_from}",
        )


@dataclass
class OutputConfig:
    """Where checkpoints, logs and evaluation artefacts go: ``{root}/{name}``."""

    root: str = "${SST_OUTPUT_ROOT:-runs}"
    name: str = "run"
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def validate(self, prefix: str) -> None:
        _check(
            self.keep_checkpoints >= 1,
            f"{prefix}.keep_checkpoints",
            f"must be >= 1, got {self.keep_checkpoints}",
        )
        _check(
            bool(self.name) and "/" not in self.name,
            f"{prefix}.name",
            f"must be a plain name, got {self.name!r}",
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name


# DeepSpeed keys the run config already sets from train.*: the loaders, the scheduler and the
# checkpoints read the train.* value, so a second value in `deepspeed:` would silently disagree.
DS_OWNED = {
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.clip_grad",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "torch_autocast": "train.precision",
    "optimizer": "train.lr and train.weight_decay (the trainer builds Adam)",
    "scheduler": "train.lr_step_epochs and train.lr_gamma (the trainer builds StepLR)",
    "zero_optimization.stage": "train.zero_stage",
}


def merge_mappings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: nested mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_mappings(out[key], value)
        else:
            out[key] = value
    return out


def deepspeed_section(section: Any, prefix: str = "deepspeed") -> dict[str, Any]:
    """The DeepSpeed settings a run config adds: ``config_file`` (a JSON object) with the inline
    keys merged over it. Raises ConfigError naming the key or file for a bad section."""
    import json

    _check(isinstance(section, dict), prefix, f"must be a mapping of DeepSpeed config keys, got {section!r}")
    inline = dict(section)
    merged: dict[str, Any] = {}
    path = inline.pop("config_file", "") or ""
    if path:
        _check(isinstance(path, str), f"{prefix}.config_file", f"must be a path, got {path!r}")
        try:
            merged = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(
                f"config key '{prefix}.config_file': cannot read {path} ({e.strerror})"
            ) from None
        except ValueError as e:
            raise ConfigError(f"config key '{prefix}.config_file': {path} is not JSON ({e})") from None
        _check(isinstance(merged, dict), f"{prefix}.config_file", f"{path} must hold a JSON object")
    merged = merge_mappings(merged, inline)
    zero = merged.get("zero_optimization")
    for key, owner in DS_OWNED.items():
        head, _, sub = key.partition(".")
        present = sub in zero if sub and isinstance(zero, dict) else (not sub and head in merged)
        _check(not present, f"{prefix}.{key}", f"is set by {owner}; set that instead")
    try:
        json.dumps(merged)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key {prefix!r}: not expressible as JSON ({e})") from None
    return merged


@dataclass
class RunConfig:
    """The whole run: model (the model's own ModelConfig), data, losses, pseudo labels, training."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # merged over the generated DeepSpeed config (deepspeed_section; `config_file` names a JSON file)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # dotted key -> the text the user wrote, for string values that held ${SST_*} references
    # (filled by sst_dist.config; save_config writes these instead of the expanded values)
    as_written: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self) -> RunConfig:
        for name in ("data", "loss", "pseudo", "train", "output"):
            getattr(self, name).validate(name)
        deepspeed_section(self.deepspeed)
        if self.data.synthetic.enabled:
            _check(
                self.model.num_classes == self.data.synthetic.num_classes,
                "model.num_classes",
                f"must equal data.synthetic.num_classes={self.data.synthetic.num_classes}, "
                f"got {self.model.num_classes}",
            )
        validate_model = getattr(self.model, "validate", None)
        if callable(validate_model):
            validate_model()
        return self

    def to_dict(self, as_written: bool = False) -> dict[str, Any]:
        """Plain mapping of every section; ``as_written`` puts back ``${SST_*}`` references."""
        out = dataclasses.asdict(self)
        del out["as_written"]
        if as_written:
            for key, text in self.as_written.items():
                *sections, name = key.split(".")
                node = out
                for section in sections:
                    node = node[section]
                node[name] = text
        return out
