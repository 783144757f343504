"""Checking a checkpoint's files before anything is loaded, and DeepSpeed's loads without pickle.

Why a separate pass: a resume must name the damaged file and fall back to the previous checkpoint
*before* DeepSpeed starts loading (its loads are collective; one rank failing halfway would hang the
others), and a crafted file must be refused before any unpickler sees it. The pass reads every
``.pt`` file's zip records (CRC check, no unpickling) and lists the globals its pickle would import
(:func:`torch.serialization.get_unsafe_globals_in_checkpoint`, which does not execute them).

DeepSpeed's own ``checkpoint_engine.load`` calls ``torch.load(weights_only=False)``. While a
checkpoint loads, :func:`safe_engine_loads` routes it through :func:`sst_dist.safe_load.load_tensors`
(``weights_only=True``) with a short allowlist of DeepSpeed's plain value types that its ZeRO
optimizer files hold (a dataclass of two ints, an int enum, the loss scaler's attributes); only
``--trust-checkpoint`` restores the pickle path.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sst_dist.safe_load import TRUST_HINT, UnsafeCheckpointError, load_tensors

# DeepSpeed classes found in its ZeRO-1/2/3 optimizer files (get_unsafe_globals_in_checkpoint); none
# runs code when rebuilt: a dataclass of two ints, an int Enum, a plain attribute holder.
DEEPSPEED_VALUE_TYPES = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


class DamagedCheckpoint(ValueError):
    """A checkpoint misses a file or holds a truncated/corrupt one; the message names the file."""


def _import(qualname: str) -> Any:
    import importlib

    module, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def allowed_globals() -> list[Any]:
    """The DeepSpeed value types that may appear in engine files (those importable here)."""
    return [c for c in (_import(q) for q in DEEPSPEED_VALUE_TYPES) if c is not None]


def load_checkpoint_file(path: str | Path, trust: bool = False, map_location: Any = "cpu") -> Any:
    """:func:`load_tensors` of one checkpoint file, DeepSpeed's value types allowed."""
    import torch

    with torch.serialization.safe_globals(allowed_globals()):
        return load_tensors(path, trust=trust, map_location=map_location)


def check_torch_file(path: Path, trust: bool) -> None:
    """Raise :class:`DamagedCheckpoint` for a torn/corrupt torch zip file, and
    :class:`UnsafeCheckpointError` when its pickle imports anything beyond tensors, plain
    containers and :data:`DEEPSPEED_VALUE_TYPES` (unless ``trust``). Nothing is unpickled."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DamagedCheckpoint(f"{path}: truncated or not a torch checkpoint file ({e})") from None
    if bad is not None:
        raise DamagedCheckpoint(f"{path}: record {bad} is corrupt (CRC mismatch)")
    if trust:
        return
    try:
        found = get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # an unreadable pickle stream
        raise DamagedCheckpoint(f"{path}: unreadable pickle stream ({type(e).__name__})") from None
    unsafe = sorted(set(found) - set(DEEPSPEED_VALUE_TYPES))
    if unsafe:
        raise UnsafeCheckpointError(
            f"{path} holds objects that only pickle can load ({', '.join(unsafe[:3])}), "
            f"which could run code; {TRUST_HINT}"
        )


def verify_checkpoint(path: Path, trust: bool = False) -> dict[str, Any]:
    """meta.json of checkpoint ``path`` after checking every file it lists (existence, size,
    zip integrity, no pickle-only objects). Raises :class:`DamagedCheckpoint` naming the first bad
    file, or :class:`UnsafeCheckpointError`."""
    meta_file = path / "meta.json"
    if path.is_symlink() or not path.is_dir():
        raise DamagedCheckpoint(f"{path} is not a checkpoint directory")
    if not meta_file.is_file():
        raise DamagedCheckpoint(f"{meta_file} missing (incomplete checkpoint)")
    try:
        meta = json.loads(meta_file.read_text())
        files = [str(f) for f in meta["files"]]
        sizes = dict(meta.get("sizes", {}))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(f"{meta_file}: damaged ({type(e).__name__}: {e})") from None
    for rel in files:
        f = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or f.is_symlink():
            raise DamagedCheckpoint(f"{meta_file}: lists {rel!r}, not a plain file of the checkpoint")
        if not f.is_file():
            raise DamagedCheckpoint(f"{f} missing")
        if rel in sizes and f.stat().st_size != int(sizes[rel]):
            raise DamagedCheckpoint(f"{f}: {f.stat().st_size} bytes, {sizes[rel]} were written (truncated?)")
        if f.suffix == ".pt":
            check_torch_file(f, trust)
    return meta


@contextlib.contextmanager
def safe_engine_loads(engine: Any, trust: bool) -> Iterator[None]:
    """While active, ``engine.checkpoint_engine.load`` reads with ``weights_only=True``."""
    ce = getattr(engine, "checkpoint_engine", None)
    if trust or ce is None:
        yield
        return

    def load(path: str, map_location: Any = None) -> Any:
        return load_checkpoint_file(path, trust=False, map_location=map_location)

    ce.load = load  # instance attribute shadows the class's pickle-based method
    try:
        yield
    finally:
        del ce.load
