"""Checkpoint manager: atomic directories, ``latest``/``best`` pointers, pruning, fallback order.

The DeepSpeed engine is replaced by a tiny object with the same ``save_checkpoint`` /
``load_checkpoint`` calls that writes a real file (the engine's own format is DeepSpeed's
business; the trainer tests cover it end to end).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sst_dist.train.checkpoint import CheckpointError, CheckpointManager


class FileEngine:
    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        torch.save({"value": self.value}, d / "model.pt")

    def load_checkpoint(self, load_dir, tag, **_):
        f = Path(load_dir) / tag / "model.pt"
        if not f.is_file():
            return None, None
        self.value = torch.load(f)["value"]
        return str(f), {}


def _save(mgr, epoch, value):
    return mgr.save(
        FileEngine(value), epoch, 10 * epoch, {"bank": torch.full((2,), value)}, {"loader": {"e": epoch}}
    )


def test_save_prunes_and_keeps_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for e in range(1, 5):
        path = _save(mgr, e, float(e))
        assert (mgr.root / "latest").read_text().strip() == path.name
        if e == 2:
            mgr.mark_best(path.name)
    names = sorted(p.name for p in mgr.root.iterdir() if p.is_dir())
    assert names == ["epoch_0002", "epoch_0003", "epoch_0004"]  # last 2 + best
    meta = json.loads((mgr.root / "epoch_0004" / "meta.json").read_text())
    assert meta["epoch"] == 4 and meta["step"] == 40 and "sst_state.pt" in meta["files"]
    assert not list(mgr.root.glob(".tmp-*"))


def test_load_restores_rng_and_falls_back_when_latest_is_damaged(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    _save(mgr, 1, 1.0)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    _save(mgr, 2, 2.0)
    (mgr.root / ".tmp-epoch_0003").mkdir()  # a crash while writing epoch 3: ignored

    eng = FileEngine()
    where, meta, sst, rank_state = mgr.load(eng)
    assert where.name == "epoch_0002" and eng.value == 2.0 and torch.equal(sst["bank"], torch.full((2,), 2.0))

    (mgr.root / "epoch_0002" / "engine" / "model.pt").unlink()  # damaged newest checkpoint
    eng = FileEngine()
    where, meta, sst, rank_state = mgr.load(eng)
    assert where.name == "epoch_0001" and eng.value == 1.0 and rank_state["loader"] == {"e": 1}
    got = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert got == expect  # RNG states as they were when epoch 1 was saved

    (mgr.root / "epoch_0001" / "sst_state.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as err:
        mgr.load(FileEngine())
    assert "epoch_0001/sst_state.pt" in str(err.value) and "epoch_0002/engine/model.pt" in str(err.value)


def test_explicit_path_and_empty_run(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep=2)
    assert mgr.load(FileEngine()) is None
    _save(mgr, 1, 1.0)
    _save(mgr, 2, 2.0)
    eng = FileEngine()
    where, *_ = mgr.load(eng, tmp_path / "run" / "checkpoints" / "epoch_0001")
    assert where.name == "epoch_0001" and eng.value == 1.0
    where, *_ = CheckpointManager(tmp_path / "other").load(FileEngine(), tmp_path / "run")
    assert where.name == "epoch_0002"


def test_read_pointer_accepts_only_checkpoint_names_of_its_own_run(tmp_path):
    from sst_dist.train.checkpoint import read_pointer

    mgr = CheckpointManager(tmp_path / "run", keep=5)
    root = mgr.root
    assert read_pointer(root, "latest") is None  # no pointer yet
    _save(mgr, 1, 1.0)
    assert read_pointer(root, "latest") == root / "epoch_0001"
    other = tmp_path / "elsewhere" / "epoch_0009"
    other.mkdir(parents=True)
    (root / "epoch_0008").symlink_to(other, target_is_directory=True)
    bad = ("../elsewhere/epoch_0009", str(other), "epoch_0008", "epoch_0007", "epoch_1", "", "x" * 5000)
    for text in bad:
        (root / "best").write_text(text + "\n")
        with pytest.raises(ValueError, match="pointer file .*best"):
            read_pointer(root, "best")
    (root / "best").unlink()
    (root / "best").symlink_to(root / "latest")  # a linked pointer file is refused too
    with pytest.raises(ValueError, match="pointer file .*best.* link"):
        read_pointer(root, "best")
    # the manager ignores a bad pointer (warning) and resumes the newest complete checkpoint of its run
    (root / "latest").write_text("../elsewhere/epoch_0009\n")
    assert mgr.candidates()[0] == root / "epoch_0001" and mgr.best() is None


def test_checkpoint_files_load_without_pickle_and_hold_the_config(tmp_path):
    from sst_dist.config import load_config
    from sst_dist.safe_load import load_tensors

    cfg = load_config(Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml")
    mgr = CheckpointManager(tmp_path / "run", keep=2)
    np.random.seed(3)
    random.seed(3)
    path = mgr.save(FileEngine(1.0), 1, 10, {"bank": torch.zeros(2)}, {"loader": {"e": 1}}, config=cfg)
    rank = load_tensors(path / "rank_00000.pt")  # weights_only=True: tensors and plain containers
    sst = load_tensors(path / "sst_state.pt")
    assert rank["loader"] == {"e": 1} and torch.equal(sst["bank"], torch.zeros(2))
    assert load_config(path / "config.yaml") == cfg
    meta = json.loads((path / "meta.json").read_text())
    assert "config.yaml" in meta["files"] and meta["sizes"]["sst_state.pt"] > 0
    from sst_dist.train.checkpoint import set_rng_state

    expect = (random.random(), float(np.random.rand()), np.random.randn())
    set_rng_state(rank["rng"])
    assert (random.random(), float(np.random.rand()), np.random.randn()) == expect


def test_newer_complete_checkpoint_beats_a_stale_latest(tmp_path):
    """A crash between the directory rename and the ``latest`` update leaves the pointer one behind;
    resuming the older one would later overwrite the newer, complete checkpoint."""
    mgr = CheckpointManager(tmp_path, keep=5)
    _save(mgr, 1, 1.0)
    _save(mgr, 2, 2.0)
    (mgr.root / "latest").write_text("epoch_0001\n")
    eng = FileEngine()
    where, *_ = mgr.load(eng)
    assert where.name == "epoch_0002" and eng.value == 2.0
