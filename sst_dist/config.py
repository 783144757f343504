"""Run configuration: one YAML file plus ``key.sub=value`` overrides, validated before any heavy work.

Each value is typed by the dataclass field it sets (:mod:`sst_dist.config_schema`) and checked
there, so a typo or an out-of-range value fails in a fraction of a second (no torch import)
with one line that names the file and the key. Non-finite numbers are refused everywhere.

Environment expansion (README "Trust model"): ``${VAR}`` / ``${VAR:-default}`` in string
fields expand only for variables named ``SST_*``, read once while loading; any other name is
refused, so a config cannot copy ``${HOME}`` or ``${AWS_SECRET_ACCESS_KEY}`` into directory
names, logs or the saved config. The expansion is a single pass: a variable's value is never
expanded again. ``save_config`` writes the text the user wrote (``${SST_DATA_ROOT:-data}/x``),
not the expanded value; loading the saved file expands it again.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from data_shards.safe_io import atomic_write_text
from sst_dist.config_schema import (
    SEED_MAX,
    ConfigError,
    ConfigFileError,
    DataConfig,
    LossConfig,
    OutputConfig,
    PseudoConfig,
    RunConfig,
    SyntheticConfig,
    TrainConfig,
)
from sst_dist.model.config import ModelConfig

__all__ = [
    "ENV_PREFIX",
    "SEED_MAX",
    "ConfigError",
    "ConfigFileError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OutputConfig",
    "PseudoConfig",
    "RunConfig",
    "SyntheticConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "expand_env",
    "load_config",
    "save_config",
]

ENV_PREFIX = "SST_"  # the only environment variables a config may reference
_ENV = re.compile(r"\$\{([^}:]*)(?::-([^}]*))?\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_env(value: str, key: str = "?") -> str:
    """Expand ``${SST_*}`` and ``${SST_*:-default}`` once; other names, or an unset one without
    a default, are errors that name the key (never the variable's value)."""

    def sub(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        if not _VAR_NAME.fullmatch(var) or not var.startswith(ENV_PREFIX):
            raise ConfigError(
                f"config key {key!r}: ${{{var}}} is not expanded: a config may only use "
                f"{ENV_PREFIX}* environment variables (README, Trust model)"
            )
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise ConfigError(f"config key {key!r}: environment variable {var} is not set (value {value!r})")

    return _ENV.sub(sub, value)


def _coerce(value: Any, tp: Any, key: str, written: dict[str, str]) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the key.

    Strings holding ``${...}`` are expanded here and their text as written goes to ``written``."""
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
        for a in args:
            try:
                return _coerce(value, a, key, written)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: {value!r} fits none of {args}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return _build(tp, value, key, written)
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
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"config key {key!r}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        text = str(value)
        if "${" not in text:
            return text
        written[key] = text
        return expand_env(text, key)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, written: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(set(raw) - names, key=str)
    if unknown:
        key = unknown[0] if isinstance(unknown[0], str) else repr(unknown[0])
        close = difflib.get_close_matches(key, sorted(names), n=1)
        hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown config key {prefix + '.' if prefix else ''}{key}{hint}; allowed keys: {sorted(names)}"
        )
    kwargs = {}
    for f in fields:
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], key, written)
        elif dataclasses.is_dataclass(hints[f.name]):  # a section left out: its defaults, expanded
            kwargs[f.name] = _build(hints[f.name], {}, key, written)
        elif isinstance(f.default, str) and "${" in f.default:  # e.g. DataConfig.root
            kwargs[f.name] = _coerce(f.default, str, key, written)
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
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key!r} is not a key like section.name")
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: invalid YAML value ({_yaml_problem(e)})") from None
    return raw


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Typed, env-expanded, validated RunConfig from a plain mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(raw).__name__}")
    if not isinstance(raw.get("model"), dict):
        raise ConfigError("config key 'model': missing or not a mapping (needs at least model.num_classes)")
    written: dict[str, str] = {}
    cfg = _build(RunConfig, raw, "", written)
    cfg.as_written = written
    return cfg.validate()


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line L, column C: problem' from a YAML error (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_yaml_config(path: str | Path) -> Any:
    """The parsed YAML of a config file; a missing, unreadable or invalid file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigFileError(f"run config {p}: {'is not a file' if p.exists() else 'does not exist'}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"run config {p}: cannot read it ({e})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"run config {p} {_yaml_problem(e)} (invalid YAML)") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides, validate.

    Every problem is a ConfigError whose one-line message names the file."""
    raw = read_yaml_config(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {path}: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(apply_overrides(raw, list(overrides or [])))
    except ConfigError as e:
        # blame the override when the problem is its key (a typo on the command line is not the file's)
        m = re.search(r"config key '?([\w.]+?)'?[ :;]", str(e))
        culprit = next((o for o in overrides or [] if m and o.split("=", 1)[0].strip() == m.group(1)), None)
        where = f"override {culprit!r} (run config {path})" if culprit else f"run config {path}"
        raise ConfigError(f"{where}: {e}") from None


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the config as YAML beside the run's outputs, atomically, with ``${SST_*}`` references
    as the user wrote them (the expanded values are machine-specific and stay out of the file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    header = "# sst-dist run config; ${SST_*} references are kept as written and expand when loaded\n"
    atomic_write_text(p, header + yaml.safe_dump(cfg.to_dict(as_written=True), sort_keys=False))
    return p
