"""Crafted shard metadata: validated before any reader (ours, webdataset's, DALI's) sees it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_loaders import C, make_shards

from data_shards import format as fmt
from data_shards.loaders import build_loader
from data_shards.loaders.common import build_sample_table
from data_shards.loaders.torch_loader import shard_url_for
from data_shards.verify import verify_shards


def _info(out: Path) -> dict:
    return json.loads(fmt.info_path(out, "toy", "train").read_text())


def _save_info(out: Path, info: dict) -> None:
    fmt.info_path(out, "toy", "train").write_text(json.dumps(info))


def _craft_index(out: Path, edit) -> Path:
    """Edit shard 0's DALI index lines (list of str) and record the new hash: self-consistent metadata."""
    info = _info(out)
    index = fmt.dali_index_path(out / info["shards"][0]["name"])
    lines = index.read_text().splitlines()
    edit(lines)
    text = "\n".join(lines) + "\n"
    index.write_text(text)
    info["shards"][0]["index_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    _save_info(out, info)
    return index


def _load(out, **kw):
    return build_loader(out, "train", train=False, batch_size=2, image_size=16, num_workers=0,
                        backend="torch", **kw)


@pytest.fixture
def shards(tmp_path):
    out = tmp_path / "shards"
    make_shards(out)
    return out


@pytest.mark.parametrize("name", ["$(touch MARKER)-train-000000.tar", "toy-train-000000.tar;touch MARKER",
                                  "../elsewhere/toy-train-000000.tar", "/etc/passwd", "toy-train-0.tar"])
def test_shard_names_must_be_plain(shards, name, monkeypatch):
    info = _info(shards)
    info["shards"][0]["name"] = name
    _save_info(shards, info)
    monkeypatch.chdir(shards)
    for kw in ({}, {"shard_url": "pipe:cat {dir}/{name}"}):
        with pytest.raises(ValueError, match=r"shards\[0\]\.name .* not a plain"):
            _load(shards, **kw)
    assert verify_shards(shards) and not (shards / "MARKER").exists()


def test_pipe_url_quotes_the_directory(tmp_path, monkeypatch):
    out = tmp_path / "x$(touch MARKER)y"
    make_shards(out)
    monkeypatch.chdir(tmp_path)
    assert shard_url_for("pipe:cat {dir}/{name}", out, "toy-train-000000.tar") == \
        f"pipe:cat '{out}'/toy-train-000000.tar"
    got = list(_load(out, shard_url="pipe:cat {dir}/{name}"))
    assert sum(len(b.index) for b in got) == 13 and not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda ls: ls.__setitem__(1, ls[1].replace(ls[1].split()[1], "99999999999", 1)),
     "past the end|overlaps"),
    (lambda ls: ls.__setitem__(1, ls[1].replace(ls[1].split()[2], "9" * 15, 1)), "past the end"),
    (lambda ls: ls.__setitem__(1, ls[1].replace(ls[1].split()[1], "-512", 1)), "non-negative"),
    (lambda ls: ls.__setitem__(1, ls[1].replace(ls[1].split()[1], "100", 1)), "block-aligned"),
    (lambda ls: ls.__setitem__(2, ls[2] + " jpg 512 9 000000001.jpg"), "members"),
    (lambda ls: ls.__setitem__(0, "v1.2 999"), "expected a DALI index"),
    (lambda ls: ls.__setitem__(1, ls[1].replace("000000000.", "000000005.")), "swapped entry"),
])
def test_poisoned_index_is_refused_at_open(shards, edit, message):
    _craft_index(shards, edit)
    with pytest.raises(ValueError, match=message):
        _load(shards)
    assert verify_shards(shards)


def test_swapped_samples_in_index_are_refused(shards):
    """Lines 1 and 2 swapped, names edited to match: would serve sample 1's image as sample 0."""
    def swap(lines):
        a, b = lines[1].split(), lines[2].split()
        for parts, other in ((a, "000000001"), (b, "000000000")):
            for j in range(3, len(parts), 4):
                parts[j] = other + parts[j][9:]
        lines[1], lines[2] = " ".join(b), " ".join(a)
    _craft_index(shards, swap)
    with pytest.raises(ValueError, match="overlaps"):
        _load(shards)
    problems = verify_shards(shards)
    assert problems and "toy-train-000000.tar" in problems[0]


def test_entry_disagreeing_with_tar_header_fails_on_read_and_verify(shards):
    """In bounds, in order, plausible: only the tar header shows the image is cut short."""
    def shrink(lines):
        parts = lines[1].split()
        parts[2] = str(int(parts[2]) - 100)
        lines[1] = " ".join(parts)
    _craft_index(shards, shrink)
    loader = _load(shards)
    with pytest.raises(ValueError, match="tar header there is '000000000.jpg'"):
        list(loader)
    info = _info(shards)
    table = build_sample_table(shards, info)
    with pytest.raises(ValueError, match="index and shard disagree"):
        table.check_headers()  # what the DALI webdataset reader path runs before DALI sees the index
    assert any("differ from the members" in p or "disagree" in p for p in verify_shards(shards))


def test_unrecorded_index_change_fails_hash(shards):
    info = _info(shards)
    index = fmt.dali_index_path(shards / info["shards"][0]["name"])
    index.write_text(index.read_text() + "\n")
    with pytest.raises(ValueError, match="sha256 differs"):
        _load(shards)
    assert any("sha256 differs" in p for p in verify_shards(shards))


def test_label_matrix_is_checked_by_hash_and_verify(shards):
    info = _info(shards)
    path = shards / info["labels"]
    full = np.load(path)
    full[[0, 1]] = full[[1, 0]]  # swapped rows: images under the wrong labels
    np.save(path, full)
    with pytest.raises(ValueError, match="sha256 differs"):
        _load(shards)
    assert any(info["labels"] in p for p in verify_shards(shards))
    info["labels_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # crafted consistent hash
    info["positives"] = (full == 1).sum(axis=0).tolist()
    _save_info(shards, info)
    if not (full[0] == full[1]).all():
        assert any(".lbl differs" in p for p in verify_shards(shards))


@pytest.mark.parametrize("field, value", [("num_samples", -1), ("num_samples", 10**12), ("classes", "abc"),
                                          ("labels", "../x-train-labels.npy"), ("dataset", "a b")])
def test_bad_info_fields_name_the_key(shards, field, value):
    info = _info(shards)
    info[field] = value
    _save_info(shards, info)
    with pytest.raises(ValueError, match=field):
        _load(shards)


def test_verify_passes_on_good_shards_and_checks_members(shards):
    assert verify_shards(shards) == []
    assert C == len(_info(shards)["classes"])
