"""``shards verify``: every file a loader reads is checked, not only the tars.

Per split: ``_info.json`` is validated (plain names, counts, digests); each shard's sha256 and
size; its DALI index's sha256 (format 2) and structure, and that every index entry equals the
member the tar's own headers describe (a swapped or shifted entry fails even with a consistent
hash); each sample's ``.idx`` and ``.lbl`` members against its key and the label matrix; the
label matrix's sha256 (format 2), shape, values and the per-class positive counts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_shards import format as fmt
from data_shards import shard_index as sidx


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
    return sha.hexdigest()


def _check_split(shard_dir: Path, info_file: Path) -> list[str]:
    try:
        info = fmt.load_info(info_file)
    except ValueError as err:
        return [str(err)]
    problems = []
    c = len(info["classes"])
    try:
        full = fmt.load_label_matrix(shard_dir, info)
        if (full == 1).sum(axis=0).tolist() != info.get("positives", (full == 1).sum(axis=0).tolist()):
            problems.append(f"{info_file.name}: positives differ from the label matrix")
    except (OSError, ValueError) as err:
        problems.append(str(err))
        full = None
    first = 0
    for shard in info["shards"]:
        path = shard_dir / shard["name"]
        first, start = first + shard["samples"], first
        if not path.is_file():
            problems.append(f"{info_file.name}: missing shard {path}")
            continue
        if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256/size differ from {info_file.name}")
            continue
        index = fmt.dali_index_path(path)
        if not index.is_file():
            problems.append(f"{path}: missing DALI index {index.name}")
            continue
        if "index_sha256" in shard and sha256_file(index) != shard["index_sha256"]:
            problems.append(f"{index}: sha256 differs from {info_file.name}")
        try:
            entries = sidx.parse_index(index, path, start, shard["samples"], c)
            if entries != sidx.parse_tar(path, start, shard["samples"], c):
                raise ValueError(f"{index}: entries differ from the members in the tar's headers")
            sidx.check_all_headers(path, entries)
            if full is not None:
                _check_members(path, entries, full)
        except (OSError, ValueError) as err:
            problems.append(str(err))
    return problems


def _check_members(path: Path, entries: list[sidx.Sample], full: np.ndarray) -> None:
    with open(path, "rb") as f:
        for i, members in entries:
            where = f"shard {path.name}, key {fmt.sample_key(i)}"
            m = members[fmt.INDEX_EXT]
            f.seek(m.offset)
            if fmt.decode_index(f.read(m.size), where) != i:
                raise ValueError(f"{where}: .idx member disagrees with the key")
            m = members[fmt.LABEL_EXT]
            f.seek(m.offset)
            if not np.array_equal(fmt.decode_labels(f.read(m.size), full.shape[1], where), full[i]):
                raise ValueError(f"{where}: .lbl differs from row {i} of the label matrix")


def verify_shards(shard_dir: str | Path, split: str | None = None) -> list[str]:
    """Problems found in every split (or ``split``) of ``shard_dir`` (empty: all good)."""
    shard_dir = Path(shard_dir)
    pattern = f"*-{split}-_info.json" if split else "*-_info.json"
    infos = sorted(shard_dir.glob(pattern))
    if not infos:
        return [f"no {pattern} in {shard_dir}"]
    return [p for info_file in infos for p in _check_split(shard_dir, info_file)]
