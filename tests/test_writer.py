"""ShardWriter: GNU tar members per data_shards.format, checksums, DALI index, atomic commit."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards import format as fmt
from data_shards.verify import verify_shards
from data_shards.writer import FORMAT_VERSION, ShardWriter, dali_index_text

CLASSES = ["a", "b", "c", "d"]


def _samples(n: int, seed: int = 0) -> list[tuple[int, bytes, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        side = int(rng.integers(8, 40))
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append((i, buf.getvalue(), np.where(rng.random(4) < 0.4, 1, -1).astype(np.int8)))
    return out


def _write(out: Path, samples, shard_bytes: float = 8000, **kw) -> dict:
    with ShardWriter(out, "toy", "train", CLASSES, shard_bytes=shard_bytes, **kw) as w:
        for s in samples:
            w.write(*s)
        return w.close()


def test_shards_read_back_with_tarfile(tmp_path):
    samples = _samples(23)
    info = _write(tmp_path, samples)
    assert len(info["shards"]) > 2, "small shard_bytes must split the data"
    assert [s["name"] for s in info["shards"]] == [fmt.shard_name("toy", "train", k)
                                                  for k in range(len(info["shards"]))]
    seen = []
    for shard in info["shards"]:
        path = tmp_path / shard["name"]
        raw = path.read_bytes()
        assert raw[257:265] == b"ustar  \x00", "GNU tar magic expected"
        assert shard["bytes"] == len(raw) and shard["sha256"] == hashlib.sha256(raw).hexdigest()
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert len(members) == 3 * shard["samples"]
            for m in members:
                assert m.isfile() and m.mtime == 0 and m.uid == 0
            for k in range(0, len(members), 3):
                key = members[k].name.split(".")[0]
                assert [m.name for m in members[k : k + 3]] == [f"{key}.jpg", f"{key}.lbl", f"{key}.idx"]
                index = fmt.decode_index(tar.extractfile(members[k + 2]).read())
                assert key == fmt.sample_key(index)
                i, jpg, labels = samples[index]
                assert tar.extractfile(members[k]).read() == jpg
                lbl = tar.extractfile(members[k + 1]).read()
                np.testing.assert_array_equal(fmt.decode_labels(lbl, 4), labels)
                seen.append(index)
    assert seen == list(range(23))
    assert sum(s["samples"] for s in info["shards"]) == 23


def test_info_labels_and_positives(tmp_path):
    samples = _samples(17)
    info = _write(tmp_path, samples)
    on_disk = json.loads(fmt.info_path(tmp_path, "toy", "train").read_text())
    assert on_disk == info
    assert info["format_version"] == FORMAT_VERSION and info["dataset"] == "toy" and info["split"] == "train"
    assert info["classes"] == CLASSES and info["num_samples"] == 17
    labels = np.load(fmt.labels_path(tmp_path, "toy", "train"))
    assert labels.dtype == np.int8
    np.testing.assert_array_equal(labels, np.stack([s[2] for s in samples]))
    positives = [sum(int(s[2][c] == 1) for s in samples) for c in range(4)]
    assert info["positives"] == positives
    assert fmt.read_info(tmp_path, "train", num_classes=4)["num_samples"] == 17


def test_dali_index_matches_members(tmp_path):
    info = _write(tmp_path, _samples(9))
    for shard in info["shards"]:
        path = tmp_path / shard["name"]
        text = fmt.dali_index_path(path).read_text()
        assert text == dali_index_text(path)  # DALI's wds2idx output == our tarfile-derived one
        lines = text.splitlines()
        assert lines[0] == f"v1.2 {shard['samples']}"
        raw = path.read_bytes()
        with tarfile.open(path) as tar:
            for line in lines[1:]:
                parts = line.split()
                for ext, offset, size, name in zip(parts[0::4], parts[1::4], parts[2::4], parts[3::4]):
                    assert name.endswith("." + ext)
                    assert raw[int(offset) : int(offset) + int(size)] == tar.extractfile(name).read()


def test_webdataset_library_reads_shards(tmp_path):
    import webdataset as wds

    samples = _samples(11)
    info = _write(tmp_path, samples)
    urls = [str(tmp_path / s["name"]) for s in info["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [g["__key__"] for g in got] == [fmt.sample_key(i) for i in range(11)]
    for g, (i, jpg, labels) in zip(got, samples):
        assert g["jpg"] == jpg and fmt.decode_index(g["idx"]) == i
        np.testing.assert_array_equal(fmt.decode_labels(g["lbl"]), labels)


def test_same_samples_same_bytes(tmp_path):
    samples = _samples(10)
    a = _write(tmp_path / "a", samples)
    b = _write(tmp_path / "b", samples)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_interrupted_write_leaves_nothing_finished(tmp_path):
    samples = _samples(12)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "toy", "train", CLASSES, shard_bytes=4000) as w:
            for s in samples:
                if s[0] == 9:  # several shards done by now: still only hidden temporaries on disk
                    names = [p.name for p in tmp_path.iterdir()]
                    hidden = all(n.startswith(".") and n.endswith((".tmp", ".lock")) for n in names)
                    assert len(names) > 2 and hidden and ".toy-train.lock" in names  # held while writing
                    raise RuntimeError("boom")
                w.write(*s)
    assert list(tmp_path.iterdir()) == []


def _split_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_existing_split_needs_overwrite_and_is_swapped_in_whole(tmp_path):
    _write(tmp_path, _samples(8), shard_bytes=5000)
    with pytest.raises(FileExistsError, match="toy-train-"):
        ShardWriter(tmp_path, "toy", "train", CLASSES)
    info = _write(tmp_path, _samples(3, seed=1), shard_bytes=1e9, overwrite=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([info["shards"][0]["name"], info["shards"][0]["name"] + ".idx",
                            "toy-train-_info.json", info["labels"]])
    assert fmt.read_info(tmp_path, "train")["num_samples"] == 3 and verify_shards(tmp_path) == []


@pytest.mark.parametrize("fail_at", ["write", "close"])
def test_failed_overwrite_leaves_the_old_split_intact(tmp_path, fail_at, monkeypatch):
    old = _write(tmp_path, _samples(8), shard_bytes=5000)
    before = _split_files(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "toy", "train", CLASSES, shard_bytes=3000, overwrite=True) as w:
            for s in _samples(6, seed=2):
                w.write(*s)
            if fail_at == "close":  # every new file is complete; the commit itself fails
                import data_shards.writer as writer_mod

                def boom(*a, **k):
                    raise RuntimeError("boom")
                monkeypatch.setattr(writer_mod, "atomic_write_text", boom)
                w.close()
            raise RuntimeError("boom")
    assert _split_files(tmp_path) == before
    assert fmt.read_info(tmp_path, "train")["shards"] == old["shards"] and verify_shards(tmp_path) == []


def test_killed_conversion_leaves_old_split_and_next_run_cleans_up(tmp_path):
    _write(tmp_path, _samples(8), shard_bytes=5000)
    before = _split_files(tmp_path)
    w = ShardWriter(tmp_path, "toy", "train", CLASSES, shard_bytes=3000, overwrite=True)
    for s in _samples(6, seed=2):
        w.write(*s)
    w._tar.close()  # a hard kill now: no abort, temporaries stay
    os.close(w._lock._fd)  # and the kernel drops the dead writer's flock (its lock file stays)
    assert {n for n in os.listdir(tmp_path) if n.startswith(".")}
    assert {k: v for k, v in _split_files(tmp_path).items() if not k.startswith(".")} == before
    assert verify_shards(tmp_path) == []
    _write(tmp_path, _samples(5, seed=3), overwrite=True)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert fmt.read_info(tmp_path, "train")["num_samples"] == 5 and verify_shards(tmp_path) == []


def test_planted_links_are_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "shards"
    out.mkdir()
    # every name the writer will commit, and the old writer's fixed temporary names, point at the victim
    for name in ["toy-train-000000.tar", "toy-train-000000.tar.idx", "toy-train-000000.tar.tmp",
                 "toy-train-000000.tar.idx.tmp", "toy-train-labels.npy", "toy-train-labels.npy.tmp",
                 "toy-train-_info.json.tmp"]:
        (out / name).symlink_to(victim)
    with pytest.raises(FileExistsError):  # links named like a split are not silently replaced
        _write(out, _samples(4))
    info = _write(out, _samples(4), overwrite=True)
    assert victim.read_text() == "precious"
    committed = [info["shards"][0]["name"], info["shards"][0]["name"] + ".idx", info["labels"],
                 "toy-train-_info.json"]
    assert not any((out / n).is_symlink() for n in committed) and verify_shards(out) == []


def test_shard_dir_must_be_own_real_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError, match="symbolic link"):
        ShardWriter(tmp_path / "link", "toy", "train", CLASSES)


def test_bad_input(tmp_path):
    w = ShardWriter(tmp_path, "toy", "train", CLASSES)
    i, jpg, labels = _samples(1)[0]
    with pytest.raises(ValueError, match="expected index 0, got 1"):
        w.write(1, jpg, labels)
    with pytest.raises(ValueError, match=r"labels shape \(3,\)"):
        w.write(0, jpg, labels[:3])
    with pytest.raises(ValueError, match="1-D vector"):
        w.write(0, jpg, np.zeros(4))
    w.abort()
    with pytest.raises(ValueError, match="split"):
        ShardWriter(tmp_path, "toy", "tr-ain", CLASSES)
    with pytest.raises(ValueError, match="name"):
        ShardWriter(tmp_path, "$(touch x)", "train", CLASSES)
    with pytest.raises(ValueError, match="class_names"):
        ShardWriter(tmp_path, "toy", "train", ["a", "a"])
    assert list(tmp_path.iterdir()) == []


def test_verify_detects_corruption(tmp_path):
    info = _write(tmp_path, _samples(10))
    assert verify_shards(tmp_path) == []
    path = tmp_path / info["shards"][1]["name"]
    raw = bytearray(path.read_bytes())
    raw[600] ^= 0xFF
    path.write_bytes(bytes(raw))
    problems = verify_shards(tmp_path, "train")
    assert len(problems) == 1 and info["shards"][1]["name"] in problems[0]


@pytest.mark.slow
def test_dali_reads_shards_with_index(tmp_path):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    samples = _samples(10)
    info = _write(tmp_path, samples)
    tars = [str(tmp_path / s["name"]) for s in info["shards"]]

    @dali.pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl, idx = fn.readers.webdataset(paths=tars, index_paths=[t + ".idx" for t in tars],
                                              ext=["jpg", "lbl", "idx"],
                                              missing_component_behavior="error",
                                              random_shuffle=False)
        return jpg, lbl, idx

    p = pipe()
    p.build()
    got = []
    for _ in range(2):
        jpg, lbl, idx = p.run()
        for k in range(5):
            got.append((fmt.decode_index(np.array(idx[k]).tobytes()), np.array(jpg[k]).tobytes(),
                        np.array(lbl[k]).view(np.int8)))
    for (index, jpg, labels), (i, want_jpg, want_labels) in zip(got, samples):
        assert index == i and jpg == want_jpg
        np.testing.assert_array_equal(labels, want_labels)


def test_a_second_writer_of_a_split_is_refused_while_the_first_writes(tmp_path):
    """Two conversions into one split: the second used to delete the first one's temporaries
    (taking them for a killed run's) and fail with a bare "No such file" line, or both exited 0
    with one's shards replaced by the other's. Now the second is refused, naming the first."""
    ready, out = tmp_path / "ready", tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from data_shards.writer import ShardWriter\n"
        f"w = ShardWriter({str(out)!r}, 'toy', 'train', ['a', 'b', 'c'])\n"
        "w.write(0, b'jpeg', __import__('numpy').array([1, -1, 1]))\n"
        f"Path({str(ready)!r}).touch(); time.sleep(30)\n")])
    try:
        for _ in range(600):
            if ready.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), "the first writer did not start"
        temporaries = sorted(os.listdir(out))
        with pytest.raises(FileExistsError, match=f"being written by another conversion \\(pid {first.pid} "):
            ShardWriter(out, "toy", "train", CLASSES)
        assert sorted(os.listdir(out)) == temporaries  # the first one's work is untouched
        ShardWriter(out, "toy", "test", CLASSES).abort()  # another split of the folder is free
    finally:
        first.kill()
        first.wait()
    _write(out, _samples(3))  # the dead writer's lock is stale: the next conversion proceeds
    assert fmt.read_info(out, "train")["num_samples"] == 3
