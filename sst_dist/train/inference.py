"""One way from any checkpoint to a model for ``sst-dist eval`` and ``sst-dist predict``.

:func:`load_for_inference` accepts a run directory (its ``latest`` checkpoint), a checkpoint
directory, a ``best``/``latest`` pointer file, or a file written by ``sst-dist convert-checkpoint``,
and checkpoints of every ZeRO stage. Why one function: the rules below must hold for every kind.

- Nothing is unpickled. Every ``.pt`` file is read with ``weights_only=True`` (plus DeepSpeed's
  plain value types, :func:`sst_dist.train.ckpt_files.load_checkpoint_file`); ZeRO-3 partitions
  are consolidated here from those tensors instead of by DeepSpeed's pickle-based
  ``zero_to_fp32``. ``trust=True`` (``--trust-checkpoint``) is the only way to pickle.
- Pointer files are followed only to a checkpoint of their own run (``read_pointer``).
- No weights are fetched that the checkpoint overwrites: the model is built with
  ``pretrained=None`` and the checkpoint's own label embeddings (the returned config is unchanged).
- The checkpoint's model config is the truth: a converted file carries one, a run checkpoint has
  its ``config.yaml``. A run config (``config``) or override that disagrees with it in any field
  that changes outputs is an error, never a silent change of results.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sst_dist.model.config import check_model_agreement

_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # zip-format and legacy torch files


def load_for_inference(
    source: str | Path, config: str | Path | None = None, overrides: Sequence[str] = (), trust: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
    """(SSTModel in eval mode on the CPU, RunConfig, meta) for any checkpoint ``source``.

    ``config`` is a run config to use instead of the checkpoint's own (e.g. for the data of a
    converted file); ``overrides`` are ``key.sub=value`` entries applied to it. ``meta`` holds
    ``checkpoint`` (the resolved directory or file), ``kind`` (``run`` or ``converted``),
    ``class_names`` (or None) and the run checkpoint's ``meta.json`` entries. Raises
    FileNotFoundError / ValueError (including ``UnsafeCheckpointError``) with one-line messages.
    """
    kind, path = resolve_source(source)
    if kind == "converted":
        state, saved_model, meta = _read_converted(path, config, trust)
    else:
        state, saved_model, meta = _read_run_checkpoint(path, trust)
    cfg = _run_config(path, kind, config, overrides, saved_model)
    check_model_agreement(saved_model, cfg.model, where=str(config) if config else "the overrides")
    model = _build(cfg.model, state, path, strict_bank=kind == "run")
    return model, cfg, {**meta, "kind": kind, "checkpoint": path}


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """(``run`` and the checkpoint directory) or (``converted`` and the file) for ``source``."""
    from sst_dist.train.checkpoint import read_pointer

    p = Path(source)
    if p.is_dir():
        if (p / "meta.json").is_file():
            return "run", p
        if (p / "checkpoints").is_dir():
            target = read_pointer(p / "checkpoints", "latest")
            if target is None:
                raise FileNotFoundError(
                    f"run directory {p} has no checkpoints/latest (no complete checkpoint)"
                )
            return "run", target
        raise FileNotFoundError(
            f"{p} is neither a checkpoint directory (with meta.json) nor a run directory (with checkpoints/)"
        )
    if p.is_file():
        if p.name in ("best", "latest") and not _looks_like_torch_file(p):
            target = read_pointer(p.parent, p.name)
            assert target is not None  # the file exists
            return "run", target
        return "converted", p
    raise FileNotFoundError(f"checkpoint {p} does not exist")


def _looks_like_torch_file(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(_TORCH_MAGIC)


def _load(path: Path, trust: bool) -> Any:
    from sst_dist.train.ckpt_files import load_checkpoint_file

    return load_checkpoint_file(path, trust=trust)


def _read_converted(
    path: Path, config: str | Path | None, trust: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(state without the memory bank, its model config, meta) of a convert-checkpoint file."""
    from sst_dist.convert import read_converted

    state, model_cfg, info = read_converted(path, trust=trust)
    if model_cfg is None and config is None:
        raise ValueError(f"{path} carries no model config: pass --config RUN_CONFIG")
    meta = {"class_names": None, "epoch": info.get("epoch"), "model_config": model_cfg}
    return state, dict(model_cfg or {}), meta


def _read_run_checkpoint(
    ckpt: Path, trust: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(full module state incl. the memory bank, saved model config, meta.json) of a run checkpoint."""
    import yaml

    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{ckpt / 'meta.json'}: damaged ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{ckpt / 'meta.json'}: not a JSON object")
    saved = saved_config_path(ckpt)
    try:
        raw = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{saved}: unreadable run config ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{saved}: has no model section")
    engine = ckpt / "engine"
    consolidated = sorted(engine.glob("mp_rank_*_model_states.pt"))
    if consolidated:  # ZeRO 0-2: one consolidated module state
        states = _load(consolidated[0], trust)
        module = states.get("module") if isinstance(states, dict) else None
        if not isinstance(module, dict) or not module:
            raise ValueError(f"{consolidated[0]}: holds no module state")
    elif sorted(engine.glob("zero_pp_rank_*_model_states.pt")):
        module = consolidate_zero3(engine, trust)
    else:
        raise FileNotFoundError(f"no DeepSpeed model states (engine/*model_states.pt) in {ckpt}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    return state, dict(raw["model"]), meta


def saved_config_path(ckpt: Path) -> Path:
    """The checkpoint's own ``config.yaml``, else its run's (checkpoints written before it had one)."""
    for f in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if f.is_file():
            return f
    raise FileNotFoundError(f"run config {ckpt / 'config.yaml'} (written by training) is missing")


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def consolidate_zero3(engine_dir: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 module state of a ZeRO-3 checkpoint, from its per-rank partitions.

    Same layout rules as DeepSpeed's ``zero_to_fp32`` (stage 3): every rank holds, per
    parameter in ``param_shapes`` order, ``ceil(numel / world)`` elements of the flattened
    parameter (the last rank zero-padded) in its ``fp32_flat_groups``; frozen parameters are
    ``frozen_param_fragments`` cut the same way; buffers come whole from rank 0's module state.
    """
    model_files = sorted(engine_dir.glob("zero_pp_rank_*_model_states.pt"), key=_natural)
    optim_files = sorted(engine_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=_natural)
    world = len(model_files)
    if len(optim_files) != world:
        raise ValueError(
            f"{engine_dir}: {world} model state files but {len(optim_files)} optimizer partitions"
        )
    models = [_load(f, trust) for f in model_files]
    flats = []
    for f in optim_files:
        osd = _load(f, trust).get("optimizer_state_dict", {})
        if int(osd.get("zero_stage", -1)) != 3 or "fp32_flat_groups" not in osd:
            raise ValueError(f"{f}: not a ZeRO-3 optimizer partition")
        count = osd.get("partition_count")
        if int(max(count) if isinstance(count, list) else count) != world:
            raise ValueError(f"{f}: written by {count} ranks, but {world} partitions are here")
        flats.append(torch.cat([g.reshape(-1).float() for g in osd["fp32_flat_groups"]]))
    first = models[0]
    buffer_names = set(first.get("buffer_names", []))
    state: dict[str, torch.Tensor] = {k: v for k, v in first["module"].items() if k in buffer_names}
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        frags = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
        state[name] = torch.cat(frags)[: shape.numel()].view(shape).float()
    offset = 0
    for group in first["param_shapes"]:
        for name, shape in group.items():
            n = shape.numel()
            part = -(-n // world)
            chunks = [flat[offset : offset + part] for flat in flats]
            if any(len(c) != part for c in chunks):
                raise ValueError(f"{engine_dir}: ZeRO-3 partitions end before parameter {name}")
            state[name] = torch.cat(chunks)[:n].view(shape).clone()
            offset += part
    if any(offset != len(flat) for flat in flats):
        raise ValueError(
            f"{engine_dir}: ZeRO-3 partitions hold {len(flats[0])} elements, parameters {offset}"
        )
    for alias, target in (first.get("shared_params") or {}).items():
        if target in state:
            state[alias] = state[target]
    return state


def _run_config(
    path: Path, kind: str, config: str | Path | None, overrides: Sequence[str], saved_model: dict[str, Any]
) -> Any:
    """The RunConfig to evaluate with: ``config`` (else the checkpoint's own) plus ``overrides``."""
    from sst_dist.config import config_from_dict, load_config

    if config is not None:
        return load_config(config, list(overrides))
    if kind == "run":
        return load_config(saved_config_path(path), list(overrides))
    from sst_dist.config import apply_overrides

    return config_from_dict(apply_overrides({"model": dict(saved_model)}, list(overrides)))


def _build(model_cfg: Any, state: dict[str, torch.Tensor], path: Path, strict_bank: bool) -> Any:
    """SSTModel from ``model_cfg`` without fetching weights, then ``state`` loaded into it."""
    from sst_dist.model.sst import SSTModel

    for key in ("adj_in", "label_embeddings"):
        if key not in state:
            raise ValueError(f"{path}: state has no {key!r}; not an SST model checkpoint")
    changes: dict[str, Any] = {"pretrained": None, "embeddings": None}
    if "bank.bank" in state:  # the bank's size is a training choice; take the checkpoint's
        changes["bank_size"] = int(state["bank.bank"].shape[1])
    cfg = dataclasses.replace(model_cfg, **changes)
    C = cfg.num_classes
    if tuple(state["adj_in"].shape) != (C, C) or state["label_embeddings"].shape[0] != C:
        raise ValueError(f"{path}: adjacency/embeddings are not for num_classes={C}")
    model = SSTModel(cfg, state["adj_in"], embeddings=state["label_embeddings"])
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise ValueError(f"{path} does not fit its model config: {' '.join(lines[1:3])[:300]}") from None
    missing = [k for k in result.missing_keys if strict_bank or not k.startswith("bank.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit its model config: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()
