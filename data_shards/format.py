"""The on-disk shard format shared by the converters (writers) and the loaders (readers).

A shard is ``{name}-{split}-{NNNNNN}.tar`` in GNU tar format. Each sample is three members
with the same key (the zero-padded global index, so keys sort in dataset order):

- ``KEY.jpg``  the original encoded image bytes (JPEG kept as is; other formats re-encoded);
- ``KEY.lbl``  the full label vector, C bytes of int8 in {+1, -1};
- ``KEY.idx``  the global sample index, 8 bytes little-endian int64.

Beside the shards, ``{name}-{split}-_info.json`` (see :func:`info_path`) holds the dataset
name, split, class names, sample count, per-shard name/count/bytes/sha256, per-class positive
counts; each shard ``X.tar`` has a DALI index ``X.tar.idx``. ``{name}-{split}-labels.npy``
holds the full (N, C) int8 label matrix in dataset order, so loaders derive the partial labels of
any proportion (DESIGN §4) once and attach them by global index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_EXT = "jpg"
LABEL_EXT = "lbl"
INDEX_EXT = "idx"
KEY_DIGITS = 9
SHARD_DIGITS = 6


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(name: str, split: str, number: int) -> str:
    return f"{name}-{split}-{number:0{SHARD_DIGITS}d}.tar"


def info_path(shard_dir: str | Path, name: str, split: str) -> Path:
    return Path(shard_dir) / f"{name}-{split}-_info.json"


def labels_path(shard_dir: str | Path, name: str, split: str) -> Path:
    return Path(shard_dir) / f"{name}-{split}-labels.npy"


def dali_index_path(shard_path: str | Path) -> Path:
    return Path(f"{shard_path}.idx")


def encode_labels(labels: np.ndarray) -> bytes:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.isin(arr, (1, -1)).all():
        raise ValueError(f"full labels must be a 1-D vector in {{+1,-1}}, got shape {arr.shape}")
    return arr.astype(np.int8).tobytes()


def decode_labels(raw: bytes, num_classes: int | None = None, where: str = "") -> np.ndarray:
    arr = np.frombuffer(raw, dtype=np.int8)
    if num_classes is not None and arr.size != num_classes:
        raise ValueError(f"{where}: label vector has {arr.size} entries, expected {num_classes}")
    return arr


def encode_index(index: int) -> bytes:
    return np.array([index], dtype="<i8").tobytes()


def decode_index(raw: bytes, where: str = "") -> int:
    if len(raw) != 8:
        raise ValueError(f"{where}: index member has {len(raw)} bytes, expected 8")
    return int(np.frombuffer(raw, dtype="<i8")[0])


def find_info(shard_dir: str | Path, split: str) -> Path:
    """The single ``*-{split}-_info.json`` in ``shard_dir``; a clear error if none or several."""
    found = sorted(Path(shard_dir).glob(f"*-{split}-_info.json"))
    if not found:
        raise FileNotFoundError(f"no shards for split {split!r} in {shard_dir}: missing *-{split}-_info.json")
    if len(found) > 1:
        raise ValueError(f"several datasets for split {split!r} in {shard_dir}: {[p.name for p in found]}")
    return found[0]


def read_info(shard_dir: str | Path, split: str, num_classes: int | None = None) -> dict:
    """Load and check ``_info.json``; every listed shard must exist."""
    path = find_info(shard_dir, split)
    info = json.loads(path.read_text())
    if num_classes is not None and len(info["classes"]) != num_classes:
        raise ValueError(
            f"{path}: dataset has {len(info['classes'])} classes but the config says {num_classes}"
        )
    for shard in info["shards"]:
        shard_path = Path(shard_dir) / shard["name"]
        if not shard_path.exists():
            raise FileNotFoundError(f"{path} lists shard {shard['name']} but {shard_path} is missing")
    return info
