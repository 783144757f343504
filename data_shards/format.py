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

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

IMAGE_EXT = "jpg"
LABEL_EXT = "lbl"
INDEX_EXT = "idx"
KEY_DIGITS = 9
SHARD_DIGITS = 6
#: dataset and split names: plain words, so file names built from them are shell- and path-safe
WORD = re.compile(r"[A-Za-z0-9_]+")
_SHARD_RE = re.compile(r"([A-Za-z0-9_]+)-([A-Za-z0-9_]+)-(\d{6})\.tar")  # 6 = SHARD_DIGITS
_LABELS_RE = re.compile(r"([A-Za-z0-9_]+)-([A-Za-z0-9_]+)-labels(-\d{6})?\.npy")
_SHA = re.compile(r"[0-9a-f]{64}")


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(name: str, split: str, number: int) -> str:
    return f"{name}-{split}-{number:0{SHARD_DIGITS}d}.tar"


def shard_number(name: str, dataset: str, split: str) -> int | None:
    """The number of a plain shard file name of ``dataset``/``split``; None for any other name."""
    m = _SHARD_RE.fullmatch(name)
    return int(m.group(3)) if m and m.group(1) == dataset and m.group(2) == split else None


def labels_name(name: str, split: str, first_shard: int = 0) -> str:
    """Label matrix file name; a split rewritten beside an old one numbers it after its first shard."""
    tail = f"-{first_shard:0{SHARD_DIGITS}d}" if first_shard else ""
    return f"{name}-{split}-labels{tail}.npy"


def is_labels_name(name: str, dataset: str, split: str) -> bool:
    m = _LABELS_RE.fullmatch(name)
    return bool(m and m.group(1) == dataset and m.group(2) == split)


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
    """Load and validate ``_info.json`` (:func:`validate_info`); every listed file must exist."""
    path = find_info(shard_dir, split)
    info = load_info(path)
    if num_classes is not None and len(info["classes"]) != num_classes:
        raise ValueError(
            f"{path}: dataset has {len(info['classes'])} classes but the config says {num_classes}"
        )
    for shard in info["shards"]:
        shard_path = Path(shard_dir) / shard["name"]
        if not shard_path.is_file():
            raise FileNotFoundError(f"{path} lists shard {shard['name']} but {shard_path} is missing")
    return info


def load_info(path: Path) -> dict:
    """Parse and validate one ``_info.json``; ValueError naming the file and the key."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    validate_info(info, path)
    return info


def _require(ok: bool, path, key: str, value, want: str) -> None:
    if not ok:
        raise ValueError(f"{path}: {key} = {value!r:.80} is not {want}")


def validate_info(info, path) -> None:
    """Shard metadata is checked before any reader sees it: types, counts and plain file names.

    A shard or label file name must be exactly ``{dataset}-{split}-NNNNNN.tar`` /
    ``{dataset}-{split}-labels[-NNNNNN].npy``: no directory part, nothing a shell interprets.
    """
    _require(isinstance(info, dict), path, "the top level", type(info).__name__, "a JSON object")
    dataset, split = info.get("dataset"), info.get("split")
    for key, value in (("dataset", dataset), ("split", split)):
        _require(isinstance(value, str) and WORD.fullmatch(value) is not None, path, key, value,
                 "a plain name of letters, digits and _")
    classes = info.get("classes")
    _require(isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
             and len(set(classes)) == len(classes), path, "classes", classes, "a list of unique names")
    n = info.get("num_samples")
    _require(type(n) is int and n > 0, path, "num_samples", n, "a positive integer")
    shards = info.get("shards")
    _require(isinstance(shards, list) and shards, path, "shards", shards, "a non-empty list")
    seen, total = set(), 0
    for k, shard in enumerate(shards):
        key = f"shards[{k}]"
        _require(isinstance(shard, dict), path, key, shard, "an object")
        name = shard.get("name")
        _require(isinstance(name, str) and shard_number(name, dataset, split) is not None
                 and name not in seen, path, f"{key}.name", name,
                 f"a plain, unique shard file name {dataset}-{split}-NNNNNN.tar")
        seen.add(name)
        for field in ("samples", "bytes"):
            v = shard.get(field)
            _require(type(v) is int and v > (0 if field == "samples" else 1023), path, f"{key}.{field}", v,
                     "a positive integer")
        for field in ("sha256", "index_sha256"):
            if field in shard or field == "sha256":
                v = shard.get(field)
                _require(isinstance(v, str) and _SHA.fullmatch(v) is not None, path, f"{key}.{field}", v,
                         "a sha256 hex digest")
        total += shard["samples"]
    _require(total == n, path, "the shards' sample counts", total, f"num_samples ({n})")
    labels = info.get("labels", labels_name(dataset, split))
    _require(isinstance(labels, str) and is_labels_name(labels, dataset, split), path, "labels", labels,
             f"a plain label file name {dataset}-{split}-labels[-NNNNNN].npy")
    if "labels_sha256" in info:
        v = info["labels_sha256"]
        _require(isinstance(v, str) and _SHA.fullmatch(v) is not None, path, "labels_sha256", v,
                 "a sha256 hex digest")


def load_label_matrix(shard_dir: str | Path, info: dict) -> np.ndarray:
    """The split's (N, C) int8 +1/-1 label matrix; ValueError naming the file for any mismatch."""
    path = Path(shard_dir) / info.get("labels", labels_name(info["dataset"], info["split"]))
    shape = (int(info["num_samples"]), len(info["classes"]))
    if not path.is_file():
        raise FileNotFoundError(f"label matrix {path} is missing (needed for the partial labels)")
    raw = path.read_bytes()
    sha256 = info.get("labels_sha256")
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 differs from the one in _info.json (damaged or replaced)")
    try:
        full = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a numpy label matrix: {err}") from err
    if full.shape != shape:
        raise ValueError(f"{path}: label matrix shape {full.shape}, _info.json says {shape}")
    if not np.isin(full, (1, -1)).all():
        raise ValueError(f"{path}: label matrix holds values other than +1/-1")
    return full.astype(np.int8)
