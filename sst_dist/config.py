"""Run configuration: nested dataclasses that validate themselves, loaded from YAML.

A run is described by one YAML file plus ``key.sub=value`` overrides from the command line
(each value typed by the dataclass field it sets). Everything is validated here, before any
heavy import or data access, so a typo fails in a second with the key and the allowed values
instead of after model construction. ``${VAR}`` / ``${VAR:-default}`` in string fields expand
from the environment, so configs hold no machine-specific paths (``${SST_DATA_ROOT}``,
``${SST_OUTPUT_ROOT}``). The model section is the model's own :class:`ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sst_dist.model.config import ModelConfig  # re-exported: the model section of a RunConfig


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r}: {msg}")


@dataclass
class SyntheticConfig:
    """Generated scenes for tests and the demo (data_shards.synthetic), built when missing."""

    enabled: bool = False
    num_train: int = 64
    num_test: int = 32
    num_classes: int = 6
    image_size: int = 64
    seed: int = 0

    def validate(self, prefix: str) -> None:
        for name in ("num_train", "num_test", "num_classes", "image_size"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", f"must be > 0, got {getattr(self, name)}")


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
        _check(self.image_size >= 32, f"{prefix}.image_size", f"must be >= 32, got {self.image_size}")
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


@dataclass
class RunConfig:
    """The whole run: model (the model's own ModelConfig), data, losses, pseudo labels, training."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> RunConfig:
        for name in ("data", "loss", "pseudo", "train", "output"):
            getattr(self, name).validate(name)
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, key: str = "?") -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset VAR without default is an error."""

    def sub(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise ConfigError(f"config key {key!r}: environment variable {var} is not set (value {value!r})")

    return _ENV.sub(sub, value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: allowed values {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key {key!r}: {value!r} fits none of {args}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return expand_env(str(value), key)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!r}; allowed keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"config section {prefix or '<root>'!r}: {e}") from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config section {prefix or '<root>'!r}: {e}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` entries into the raw mapping (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    return raw


def _expand_str_fields(obj: Any) -> None:
    """Expand env vars in string defaults the YAML did not set (defaults may hold ``${...}``)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _expand_str_fields(v)
        elif isinstance(v, str) and "${" in v:
            setattr(obj, f.name, expand_env(v, f.name))


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Typed, env-expanded, validated RunConfig from a plain mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(raw).__name__}")
    if "model" not in raw:
        raise ConfigError("config key 'model': missing (needs at least model.num_classes)")
    cfg = _build(RunConfig, raw, "")
    _expand_str_fields(cfg)
    return cfg.validate()


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"run config {p} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    return config_from_dict(apply_overrides(raw, list(overrides or [])))


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (beside the run's outputs, for reproducibility)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return p
